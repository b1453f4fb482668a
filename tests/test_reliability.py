"""No state lost or silently wrong, under real faults: damaged checkpoints, a NaN-making learning rate, kill -9 of a
score run, a full disk during an asynchronous checkpoint, two runs into one directory, bad input files.

The uninterrupted reference is one module-scoped 6-step run of tests/test_train.make_config (checkpoints every 2
steps); `interrupted` is the same run stopped at step 4 (checkpoints 2 and 4), copied before each fault.
"""

import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from displacement_jax.train import checkpoint as checkpoint_lib
from displacement_jax.train import metrics as metrics_lib
from displacement_jax import runtime
from displacement_jax.score import main as score
from displacement_jax.train import export as export_lib
from displacement_jax.train import loop as training
from displacement_jax.train import main as train_lib
from displacement_jax.data import schema
from displacement_jax.models import io as io_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
SCORE_TINY = os.path.join(ROOT, "configs", "score_tiny.py")
DPO_TINY = os.path.join(ROOT, "configs", "dpo_tiny.py")
if TESTS not in sys.path:
  sys.path.insert(0, TESTS)

import test_train  # pylint: disable=wrong-import-position

make_config = test_train.make_config
CONFIG_FILE = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_train

def get_config(arg=None):
  return test_train.make_config({out!r}, {data!r})
"""


def _config_file(tmp_path, out, data):
  """A config file for the CLIs holding make_config(out, data)."""
  path = tmp_path / "cfg_reliability.py"
  path.write_text(CONFIG_FILE.format(root=ROOT, tests=TESTS, out=str(out), data=str(data)))
  return str(path)


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, TESTS]))


def _main(module, argv):
  """(exit status, stdout, stderr) of an in-process CLI call."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = module.main(["prog", *argv])
  return rc, out.getvalue(), err.getvalue()


def _assert_params_equal(got, want, atol=1e-6):
  flat = dict(jax.tree_util.tree_leaves_with_path(got))
  for path, a in jax.tree_util.tree_leaves_with_path(want):
    np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(a), atol=atol, rtol=0, err_msg=str(path))


def _saved_state(step_dir):
  """The arrays of a checkpoint's state item, read with orbax directly (no target)."""
  return ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
  return test_train._write_jsonl(tmp_path_factory.mktemp("data") / "prefs.jsonl", test_train._rows())


@pytest.fixture(scope="module")
def full(tmp_path_factory, data_path):
  """The uninterrupted reference run."""
  return training.run(make_config(tmp_path_factory.mktemp("full"), data_path))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, data_path, full):
  """The same run stopped after step 4: checkpoints 2 and 4 (each with its checksum file)."""
  out = tmp_path_factory.mktemp("interrupted")
  assert full.step == 6  # compiled first: the runs below are cache hits
  training.run(make_config(out, data_path, **{"debug.stop_after_steps": 4}))
  assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
  for step in (2, 4):
    assert checkpoint_lib.verify(str(out / "checkpoints" / str(step))) is None
  return out


def _corrupt(path, how):
  """Flip a byte in the middle of (`how='flip'`) or cut in half (`'truncate'`) the file at `path`; its old size."""
  size = os.path.getsize(path)
  if how == "flip":
    with open(path, "r+b") as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
  else:
    os.truncate(path, size // 2)
  return size


def _damage(step_dir, how):
  """Flip a byte in the middle of / cut in half the largest array file of a checkpoint; its path and sizes."""
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  path = max(files, key=os.path.getsize)
  return os.path.relpath(path, step_dir), _corrupt(path, how)


# ------------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path, data_path, full, interrupted, how):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  rel, size = _damage(str(out / "checkpoints" / "4"), how)
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    result = training.run(make_config(out, data_path), resume=True)
  reason = (
      f"{rel} does not match its checksum" if how == "flip" else f"{rel} has {size // 2} bytes, {size} were written"
  )
  assert f"checkpoint 4 is corrupt ({reason}); resuming from 2\n" in log.getvalue()
  assert "resumed from step 2 " in log.getvalue()
  assert result.step == 6 and not result.stopped_early
  _assert_params_equal(result.params, full.params)
  losses = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(out)) if "loss" in r}
  np.testing.assert_allclose([losses[s] for s in range(1, 7)], full.losses, atol=1e-6)
  assert os.path.isdir(out / "checkpoints_corrupt" / "4")  # moved aside, not deleted
  assert sorted(os.listdir(out / "checkpoints")) == ["4", "6"]  # step 4 written again, verified


def test_no_usable_checkpoint_exits_2(tmp_path, data_path, interrupted):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  rel4, _ = _damage(str(out / "checkpoints" / "4"), "flip")
  rel2, size2 = _damage(str(out / "checkpoints" / "2"), "truncate")
  rc, _, err = _main(train_lib, [f"--config={_config_file(tmp_path, out, data_path)}", "--resume"])
  assert rc == 2
  assert err.strip().splitlines() == [
      f"error: --resume: no usable checkpoint in {out}/checkpoints: checkpoint 4 is corrupt ({rel4} does not match "
      f"its checksum); checkpoint 2 is corrupt ({rel2} has {size2 // 2} bytes, {size2} were written); start "
      "afresh with --config.overwrite=True"
  ]


def test_huge_learning_rate_saves_a_finite_state_and_names_the_quantity(tmp_path):
  """lr=1e38 (RMSprop): step 1's update overflows the params; the step is skipped and step 0 checkpointed.
  The data also has a chosen == rejected row and a duplicate row: warned about and counted in metrics.jsonl."""
  rows = test_train._rows()
  rows[3]["rejected"] = rows[3]["chosen"]
  rows[5] = dict(rows[0])
  data = test_train._write_jsonl(tmp_path / "suspicious.jsonl", rows)
  out = tmp_path / "run"
  config = make_config(out, data, **{"optim.lr": 1e38, "num_steps": 3, "checkpoint.every": 0, "eval.every": 0})
  log = io.StringIO()
  with contextlib.redirect_stdout(log), pytest.raises(training.NonFiniteLossError) as error:
    training.run(config)
  message = str(error.value)
  assert re.match(
      r"non-finite updated params at step 1 \(the loss 0\.693147 and the gradient norm [0-9.e+-]+ were finite; "
      rf"lr=1e\+38, objective=dpo\); stopped, the state before this step \(all params finite\) is "
      rf"checkpointed at step 0 in {re.escape(str(out))}/checkpoints$",
      message,
  ), message
  assert sorted(os.listdir(out / "checkpoints")) == ["0"]
  step_dir = str(out / "checkpoints" / "0")
  assert checkpoint_lib.verify(step_dir) is None
  state = _saved_state(step_dir)
  assert checkpoint_lib.first_nonfinite(state) is None
  _assert_params_equal(state["params"], runtime.load_model(config).params, atol=0)  # the initial params
  assert f"WARNING data {data}: 1 row(s) with chosen == rejected" in log.getvalue() and "rows 3\n" in log.getvalue()
  assert f"WARNING data {data}: 1 exact duplicate row(s): rows 5 (= row 0)" in log.getvalue()
  start = metrics_lib.read_metrics(str(out))[0]
  assert start["data/identical_pairs"] == 1 and start["data/identical_pair_rows"] == [3]
  assert start["data/duplicate_rows"] == 1 and start["data/duplicate_row_pairs"] == [[5, 0]]


def _can_mount_tmpfs(where):
  probe = subprocess.run(
      ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"], capture_output=True, text=True
  )
  return probe.returncode == 0, (probe.stderr or probe.stdout).strip()


@pytest.mark.parametrize("size", ["200k", "900k"])
def test_full_disk_during_a_checkpoint_stops_at_once_in_one_line(tmp_path, data_path, full, size):
  """A tmpfs too small for a checkpoint: 200k fails the save's free-space check, 900k fails inside orbax's
  asynchronous write (the checkpoint is ~1 MB). Either way: exit 1, one stderr line naming the path, long
  before the end of the run."""
  disk = tmp_path / "disk"
  disk.mkdir()
  if shutil.which("unshare") is None:
    pytest.skip("no unshare(1) to mount a private tmpfs")
  ok, why = _can_mount_tmpfs(disk)
  if not ok:
    print(f"skipped: mounting a tmpfs is not permitted here ({why})")
    pytest.skip(f"mounting a tmpfs is not permitted here: {why}")
  cfg = _config_file(tmp_path, disk, data_path)
  script = (
      f"mount -t tmpfs -o size={size} tmpfs {disk} && exec {sys.executable} -m displacement_jax.train --config={cfg}"
  )
  proc = subprocess.run(
      ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300
  )
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  ckpt = re.escape(f"{disk}/checkpoints")
  full_disk = (
      rf"error: checkpoint 2 could not be written to {ckpt} \(No space left on device: it needs at least [0-9.]+ "
      rf"[kM]B, [0-9.]+ [kM]B are free\); training stopped at step 2"
      if size == "200k"
      else rf"error: (checkpoint 2 could not be written to {ckpt} \(No space left on device; orbax's records: "
      rf"{re.escape(str(disk))}/checkpoint_errors.log\); training stopped (at|before) step [2-5]|No space left on device: "
      rf"{re.escape(str(disk))}(/\S+)?)"
  )
  assert re.fullmatch(full_disk, lines[0]), lines[0]
  assert "monitor step 6" not in proc.stdout  # stopped at once, not at the end


_TB_FULL = """
import os, sys
from displacement_jax.train import metrics
out = sys.argv[1]
writer = metrics.MetricsWriter(out)
try:  # fill the tensorboard/ disk
  with open(os.path.join(out, "tensorboard", "filler"), "wb") as f:
    while True:
      f.write(b"x" * 4096)
      f.flush()
except OSError:
  pass
for step in range(100000):
  try:
    writer.write(step, {f"m{i}": float(i) for i in range(20)})
  except OSError as e:
    print(f"row {step}: {e}")
    break
writer.close()
"""


def test_full_tensorboard_disk_raises_in_the_writing_thread(tmp_path):
  """Only tensorboard/ is full (a tmpfs mounted there): the row that cannot be written raises OSError naming
  the events file. (tensorboardX's SummaryWriter wrote from its own thread; that thread died of ENOSPC and the
  next rows waited forever on its full queue: the run hung instead of stopping. This test then timed out.)"""
  out = tmp_path / "run"
  (out / "tensorboard").mkdir(parents=True)
  if shutil.which("unshare") is None:
    pytest.skip("no unshare(1) to mount a private tmpfs")
  ok, why = _can_mount_tmpfs(out / "tensorboard")
  if not ok:
    print(f"skipped: mounting a tmpfs is not permitted here ({why})")
    pytest.skip(f"mounting a tmpfs is not permitted here: {why}")
  script = f"mount -t tmpfs -o size=64k tmpfs {out}/tensorboard && exec {sys.executable} -c '{_TB_FULL}' {out}"
  proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=_env(), timeout=60)
  assert proc.returncode == 0, proc.stderr[-3000:]
  match = re.fullmatch(
      rf"row (\d+): \[Errno 28\] No space left on device: '{re.escape(str(out))}/tensorboard/events\.out\.tfevents\.\S+'\n",
      proc.stdout,
  )
  assert match, proc.stdout + proc.stderr[-3000:]
  assert [r["step"] for r in metrics_lib.read_metrics(str(out))] == list(range(int(match[1]) + 1))


# ------------------------------------------------------------------------------------------ one run per directory


def test_second_run_into_a_busy_dir_exits_2_and_the_first_ends_correct(tmp_path, data_path, full):
  out = tmp_path / "busy"
  cfg = _config_file(tmp_path, out, data_path)
  first = subprocess.Popen(
      [sys.executable, "-m", "displacement_jax.train", f"--config={cfg}"],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=_env(),
      cwd=ROOT,
  )
  lock, deadline = out / "run.lock", time.time() + 240
  while time.time() < deadline and first.poll() is None:
    with contextlib.suppress(OSError, ValueError):
      if json.loads(lock.read_text())["pid"] == first.pid:
        break
    time.sleep(0.05)
  assert first.poll() is None, "the first run ended before the second started"
  rc, _, err = _main(train_lib, [f"--config={cfg}"])
  assert rc == 2
  (line,) = err.strip().splitlines()
  assert re.fullmatch(
      rf"error: output_dir {re.escape(str(out))} is in use by another run \(pid {first.pid} on host "
      rf"{re.escape(socket.gethostname())}, started \S+ \(train\); lock file {re.escape(str(lock))}\); wait for it "
      r"to finish or use another output_dir",
      line,
  ), line
  _, first_err = first.communicate(timeout=300)
  assert first.returncode == 0, first_err[-3000:]
  _assert_params_equal(_saved_state(str(out / "checkpoints" / "6"))["params"], full.params)
  assert not lock.exists()  # a clean exit removes the lock file
  # The finished run: a fresh run refuses its checkpoints; --resume says it is complete; a changed optimisation
  # is refused with the differences.
  rc, _, err = _main(train_lib, [f"--config={cfg}"])
  assert (rc, err.strip().splitlines()) == (
      2,
      [
          f"error: output_dir {out} holds the checkpoints of an earlier run (steps 4, 6): pass --resume to continue "
          "it, or --config.overwrite=True to replace it"
      ],
  )
  rc, stdout, err = _main(train_lib, [f"--config={cfg}", "--resume"])
  assert rc == 0, err
  assert f"the run in {out} is already complete (step 6 of 6); nothing to do" in stdout
  rc, _, err = _main(
      train_lib, [f"--config={cfg}", "--resume", "--config.optim.lr=0.01", "--config.loss.objective=ipo"]
  )
  assert (rc, err.strip().splitlines()) == (
      2,
      [
          "error: --resume: the config differs from the one checkpoint 6 was trained with in fields that change the "
          "optimisation: loss.objective 'dpo' -> 'ipo'; optim.lr 0.001 -> 0.01. Use another output_dir, or pass "
          "--config.resume_allow_changes=True to continue anyway"
      ],
  )
  assert sorted(os.listdir(out / "checkpoints")) == ["4", "6"]  # nothing was deleted


# ----------------------------------------------------------------------------------------------------- scoring


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_score_killed_at_a_random_batch_then_resumed_equals_uninterrupted(tmp_path):
  data = test_train._write_jsonl(tmp_path / "rows.jsonl", test_train._rows(96, seed=1))
  args = [f"--config={SCORE_TINY}", f"--config.data.path={data}", "--config.data.format=raw"]
  args += ["--config.batch_size=1", "--config.progress=False"]
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  rc, _, err = _main(score, [*args, f"--config.output_dir={ref}"])
  assert rc == 0, err
  target = int(np.random.default_rng().integers(2, 48))  # rows (= batches) finished before the kill
  proc = subprocess.Popen(
      [sys.executable, "-m", "displacement_jax.score", *args, f"--config.output_dir={killed}"],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      env=_env(),
      cwd=ROOT,
  )
  partial, deadline = killed / "scores.partial.jsonl", time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if partial.exists() and partial.read_bytes().count(b"\n") >= target:
      break
    time.sleep(0.002)
  assert proc.poll() is None, f"the run ended before the kill (target {target} rows)"
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate(timeout=60)
  # Nothing claims completion: no scores/summary/histogram, run.json says running, the lock names the dead run.
  assert not any((killed / f).exists() for f in ("scores.jsonl", "summary.json", "ln_ches_hist.png"))
  assert json.loads((killed / "run.json").read_text())["status"] == "running"
  assert json.loads((killed / "run.lock").read_text())["pid"] == proc.pid
  rc, stdout, err = _main(score, [*args, f"--config.output_dir={killed}", "--resume"])
  assert rc == 0, err
  assert f"WARNING taking over the stale lock {killed}/run.lock of a run that is gone (pid {proc.pid} " in stdout
  done = int(re.search(rf"resuming the score run in {re.escape(str(killed))}: (\d+) of 96 rows", stdout).group(1))
  assert target <= done < 96, (target, done)
  assert _read_jsonl(killed / "scores.jsonl") == _read_jsonl(ref / "scores.jsonl")  # exactly
  summary = json.loads((killed / "summary.json").read_text())
  assert summary["resumed_rows"] == done
  assert json.loads((killed / "run.json").read_text())["status"] == "complete"
  assert not partial.exists() and not (killed / "run.lock").exists()
  rc, stdout, _ = _main(score, [*args, f"--config.output_dir={killed}", "--resume"])
  assert rc == 0 and f"the score run in {killed} is already complete (run.json); nothing to do" in stdout
  (ref / "run.json").write_text(json.dumps(dict(json.loads((ref / "run.json").read_text()), status="running")))
  rc, _, err = _main(score, [*args, f"--config.output_dir={ref}", "--resume", "--config.data.max_length=48"])
  assert (rc, err.strip().splitlines()) == (
      2,
      [
          f"error: --resume: the config or data differ from the interrupted run in {ref}: data.max_length 64 -> 48. "
          "Score afresh (without --resume), or pass --config.resume_allow_changes=True to mix them anyway"
      ],
  )


def test_score_moves_an_earlier_runs_outputs_aside_and_warns_about_suspicious_rows(tmp_path):
  rows = [{"prompt": f"q{i}", "chosen": f"a {i}", "rejected": f"b {i}"} for i in range(6)]
  rows[1]["rejected"] = rows[1]["chosen"]
  rows[2] = dict(rows[0])
  rows[3]["index"] = 0
  data = test_train._write_jsonl(tmp_path / "rows.jsonl", rows)
  out = tmp_path / "out"
  args = [f"--config={SCORE_TINY}", f"--config.data.path={data}", "--config.data.format=raw"]
  args += ["--config.progress=False", f"--config.output_dir={out}"]
  rc, stdout, err = _main(score, [*args, "--config.filter.mode=lowest_k", "--config.filter.k=2"])
  assert rc == 0, err
  assert (out / "filtered.jsonl").exists()
  assert f"WARNING data {data}: 1 row(s) with chosen == rejected" in stdout
  assert f"WARNING data {data}: 1 exact duplicate row(s): rows 2 (= row 0)" in stdout
  assert f"WARNING data {data}: 1 index value(s) used by several rows: index 0 at rows 0, 3" in stdout
  checks = json.loads((out / "summary.json").read_text())["data_checks"]
  assert checks["identical_pairs"] == 1 and checks["identical_pair_rows"] == [1]
  assert checks["duplicate_rows"] == 1 and checks["repeated_indices"] == 1
  assert checks["repeated_index_rows"] == {"0": [0, 3]}
  rc, stdout, err = _main(score, args)  # an unfiltered run into the same directory
  assert rc == 0, err
  assert not (out / "filtered.jsonl").exists() and not (out / "filtered_indices.json").exists()
  assert (out / "previous" / "filtered.jsonl").exists() and (out / "previous" / "scores.jsonl").exists()
  assert (
      "moved the outputs of an earlier run (scores.jsonl, summary.json, ln_ches_hist.png, risky.jsonl, filtered.jsonl"
      in stdout
  )
  assert json.loads((out / "run.json").read_text())["status"] == "complete"
  assert not [f for f in os.listdir(out) if ".tmp" in f]


# ------------------------------------------------------------------------------------------------- bad input


def _bad_utf8(tmp_path):
  good = "".join(json.dumps(r) + "\n" for r in test_train._rows(4)).encode()
  line = b'{"prompt": "caf\xff", "chosen": "a", "rejected": "b"}\n'
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(good + line)
  return str(path), 4, len(good) + line.index(b"\xff")


def test_invalid_utf8_names_file_row_and_byte_offset(tmp_path):
  path, row, offset = _bad_utf8(tmp_path)
  rc, _, err = _main(
      train_lib, [f"--config={DPO_TINY}", f"--config.output_dir={tmp_path}", f"--config.data.path={path}"]
  )
  assert (rc, err.strip().splitlines()) == (
      1,
      [
          f"error: file '{path}', row {row} (0-based; line {row + 1}): invalid UTF-8 at byte offset {offset} (byte 0xff); the file must be UTF-8"
      ],
  )


def test_bom_is_accepted_and_invalid_json_reads_well(tmp_path):
  rows = test_train._rows(3)
  plain = test_train._write_jsonl(tmp_path / "plain.jsonl", rows)
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + open(plain, "rb").read())
  fields = lambda ex: (ex.index, ex.prompt, ex.chosen, ex.rejected, ex.meta, ex.row)
  assert [fields(ex) for ex in schema.load_preference_data(str(bom))] == [
      fields(ex) for ex in schema.load_preference_data(plain)
  ]
  bad = tmp_path / "cut.jsonl"
  bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "cut short')
  with pytest.raises(ValueError) as e:
    schema.load_preference_data(str(bad))
  assert (
      str(e.value) == f"file '{bad}', row 1 (0-based; line 2): invalid json at column 12: Unterminated string starting"
  )


def test_repeated_index_in_training_data_names_the_rows(tmp_path):
  rows = test_train._rows(6)
  rows[2]["index"], rows[4]["index"] = 7, 7
  path = test_train._write_jsonl(tmp_path / "dup_index.jsonl", rows)
  rc, _, err = _main(
      train_lib, [f"--config={DPO_TINY}", f"--config.output_dir={tmp_path}", f"--config.data.path={path}"]
  )
  assert (rc, err.strip().splitlines()) == (
      1,
      [
          f"error: file '{path}', row 4 (0-based; line 5), field 'index': index 7 is also the index of row 2; indices must be unique"
      ],
  )


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
  config = make_config(tmp_path, "unused")
  loaded = runtime.load_model(config)
  model_dir = str(tmp_path / "model")
  io_lib.save_pretrained(jax.device_get(loaded.params), loaded.model_config, model_dir, progress=False)
  file = os.path.join(model_dir, "model.safetensors")
  header, data_start = io_lib.read_safetensors_header(file)
  cut = os.path.getsize(file) // 2
  os.truncate(file, cut)
  name, info = next((n, i) for n, i in header.items() if data_start + i["data_offsets"][1] > cut)
  rc, _, err = _main(
      train_lib,
      [
          f"--config={DPO_TINY}",
          f"--config.output_dir={tmp_path}",
          "--config.model.tiny=",
          f"--config.model.path={model_dir}",
      ],
  )
  assert (rc, err.strip().splitlines()) == (
      1,
      [
          f"error: {file}: tensor {name!r} ends at byte {data_start + info['data_offsets'][1]} but the file has "
          f"only {cut} bytes (truncated: an interrupted download or copy?)"
      ],
  )


def test_config_errors_come_before_any_model_is_loaded(tmp_path):
  missing = str(tmp_path / "no_such_model")  # loading it would fail: the config error must come first
  for flag, message in [
      ("--config.optim.lr=-1", "config.optim.lr must be > 0, got -1.0"),
      ("--config.loss.beta=0", "config.loss.beta must be > 0, got 0.0"),
      ("--config.checkpoint.keep=0", "config.checkpoint.keep must be an integer >= 1, got 0"),
      ("--config.num_steps=-1", "config.num_steps must be an integer >= 0, got -1"),
      (
          "--config.data.truncation=cut",
          "config.data.truncation must be one of ('error', 'truncate_response'), got 'cut'",
      ),
  ]:
    args = [
        f"--config={DPO_TINY}",
        f"--config.output_dir={tmp_path}",
        "--config.model.tiny=",
        f"--config.model.path={missing}",
    ]
    rc, _, err = _main(train_lib, [*args, flag])
    assert (rc, err.strip().splitlines()) == (1, [f"error: {message}"]), flag
  rc, _, err = _main(score, [f"--config={SCORE_TINY}", f"--config.output_dir={tmp_path}", "--config.batch_size=0"])
  assert (rc, err.strip().splitlines()) == (1, ["error: config.batch_size must be an integer >= 1, got 0"])


# ------------------------------------------------------------------ the run directory: what is read back is verified


def test_overwrite_then_resume_exports_this_runs_params_not_the_earlier_ones(tmp_path, data_path, full):
  """Run A exports into D; run B replaces it (overwrite, another lr): A's hf/ and TensorBoard events go with its
  checkpoints, and B's --resume with export_hf exports B's params (A's hf/ would not verify against them)."""
  out = tmp_path / "run"
  training.run(make_config(out, data_path, export_hf=True, num_steps=2))
  events_a = set(glob.glob(str(out / "tensorboard" / "*")))
  stale_hf = tmp_path / "hf_of_a"
  shutil.copytree(out / "hf", stale_hf)
  overwrite_log = io.StringIO()
  with contextlib.redirect_stdout(overwrite_log):
    b = training.run(make_config(out, data_path, overwrite=True, num_steps=2, **{"optim.lr": 2e-3}))
  removed = not (out / "hf").exists() and not events_a & set(glob.glob(str(out / "tensorboard" / "*")))
  if not (out / "hf").exists():
    shutil.copytree(stale_hf, out / "hf")  # an earlier run's export left behind (as an older version did)
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    done = training.run(make_config(out, data_path, export_hf=True, num_steps=2, **{"optim.lr": 2e-3}), resume=True)
  assert done.step == 2
  _, params, _ = io_lib.from_pretrained(str(out / "hf"), progress=False)
  _assert_params_equal(params, b.params, atol=0)  # B's params, not A's
  assert f"{out}/hf: it holds other params than this run's (an earlier run's export); exporting" in log.getvalue()
  assert export_lib.export_problem(str(out / "hf"), b.params) is None
  assert removed
  assert (
      f"removing the earlier run's checkpoints in {out}/checkpoints and its hf/, tensorboard/"
      in overwrite_log.getvalue()
  )


def test_torn_last_metrics_line_is_cut_on_resume(tmp_path, data_path, full, interrupted):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "loss": "0.69')  # what kill -9 mid-write leaves
  lines = len((out / "metrics.jsonl").read_text().splitlines())
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    result = training.run(make_config(out, data_path), resume=True)
  assert f"{out}/metrics.jsonl: dropped line(s) {lines}, cut short or not valid JSON\n" in log.getvalue()
  _assert_params_equal(result.params, full.params)
  losses = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(out)) if "loss" in r}
  np.testing.assert_allclose([losses[s] for s in range(1, 7)], full.losses, atol=1e-6)


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
  """A failure while metrics.jsonl is rewritten on resume leaves the old file whole (it was rewritten in place)."""
  rows = [{"step": s, "loss": 0.5} for s in range(4)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  real, calls = json.dumps, []

  def failing_dumps(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    return real(*args, **kwargs)

  monkeypatch.setattr(json, "dumps", failing_dumps)
  with pytest.raises(OSError):
    metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, truncate_after_step=2)
  monkeypatch.undo()
  assert metrics_lib.read_metrics(str(path)) == rows
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_reference_cache_is_recomputed(tmp_path, data_path, full, interrupted, how):
  out = tmp_path / "run"
  shutil.copytree(interrupted, out)
  (cache,) = glob.glob(str(out / "reference_cache" / "*.npz"))
  size = _corrupt(cache, how)
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    result = training.run(make_config(out, data_path), resume=True)
  assert re.search(
      rf"reference log-probs: the cache {re.escape(cache)}: not a readable npz \([^\n]+\); computing them again\n",
      log.getvalue(),
  ), log.getvalue()
  assert not result.reference_from_cache
  _assert_params_equal(result.params, full.params)
  assert os.path.getsize(cache) == size  # written again, whole


def test_an_export_that_fails_is_not_complete_and_resume_exports_again(tmp_path, data_path, monkeypatch):
  """The export fails after config.json is written: one line, exit 1, no hf/ claiming completion; --resume
  exports again (tokenizer included)."""
  out = tmp_path / "run"
  args = [f"--config={_config_file(tmp_path, out, data_path)}", "--config.export_hf=True", "--config.num_steps=2"]
  real = export_lib.io_lib.save_pretrained

  def save_then_fail(*a, **k):
    real(*a, **k)
    raise RuntimeError("the disk went away")

  monkeypatch.setattr(export_lib.io_lib, "save_pretrained", save_then_fail)
  rc, _, err = _main(train_lib, args)
  assert (rc, err.strip().splitlines()) == (
      1,
      [
          f"error: the HF export to {out}/hf failed (RuntimeError: the disk went away); the checkpoints are kept: "
          "--resume exports again"
      ],
  )
  assert not (out / "hf").exists()
  monkeypatch.undo()
  rc, stdout, err = _main(train_lib, [*args, "--resume"])
  assert rc == 0, err
  assert "already complete (step 2 of 2)" in stdout and f"{out}/hf: no export; exporting this run's params" in stdout
  assert (out / "hf" / "tokenizer.json").exists() and (out / "hf" / export_lib.EXPORT_MANIFEST).exists()
  assert not (out / "hf.partial").exists()


SIGNAL_CONFIG = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_train
from displacement_jax.train import fns as fns_lib

_make_fns = fns_lib.make_fns


def _signalling_fns(*args, **kwargs):  # sends {signum} to this process while step {at} runs
  fns = _make_fns(*args, **kwargs)
  step, calls = fns.train_step, []

  def train_step(state, batch):
    calls.append(1)
    if len(calls) == {at}:
      os.kill(os.getpid(), {signum})
    return step(state, batch)

  fns.train_step = train_step
  return fns


fns_lib.make_fns = _signalling_fns


def get_config(arg=None):
  return test_train.make_config({out!r}, {data!r})
"""


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_sigint_checkpoints_the_step_and_resumes_exact(tmp_path, data_path, full, signum, status):
  """The signal arrives during step 3 (checkpoints every 2): the step finishes, checkpoint 3 is written, one line,
  exit 128 + signal; --resume ends with the uninterrupted run's params."""
  out = tmp_path / "run"
  cfg = tmp_path / "cfg_signal.py"
  cfg.write_text(
      SIGNAL_CONFIG.format(root=ROOT, tests=TESTS, out=str(out), data=str(data_path), signum=int(signum), at=3)
  )
  proc = subprocess.run(
      [sys.executable, "-m", "displacement_jax.train", f"--config={cfg}"],
      capture_output=True,
      text=True,
      env=_env(),
      cwd=ROOT,
      timeout=300,
  )
  assert proc.returncode == status, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      f"stopped by {signal.Signals(signum).name} after step 3 of 6: checkpoint 3 is written in {out}/checkpoints; "
      "continue with --resume"
  ]
  assert sorted(os.listdir(out / "checkpoints")) == ["2", "3"]
  assert checkpoint_lib.verify(str(out / "checkpoints" / "3")) is None
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    result = training.run(make_config(out, data_path), resume=True)
  assert "resumed from step 3 " in log.getvalue()
  _assert_params_equal(result.params, full.params)
  losses = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(out)) if "loss" in r}
  np.testing.assert_allclose([losses[s] for s in range(1, 7)], full.losses, atol=1e-6)


def test_config_file_whose_get_config_raises_is_one_line_exit_2(tmp_path):
  cfg = tmp_path / "cfg_raises.py"
  cfg.write_text("def get_config(arg=None):\n  raise RuntimeError('no such sweep point')\n")
  for module in (train_lib, score):
    rc, _, err = _main(module, [f"--config={cfg}"])
    assert (rc, err.strip().splitlines()) == (
        2,
        [f"error: --config={cfg}: loading the config raised RuntimeError: no such sweep point"],
    ), module.__name__


def _killed_score_run(tmp_path, monkeypatch, args, batches):
  """A score run that stops (as a kill would) after `batches` finished batches: its scores.partial.jsonl."""
  real, seen = score.outputs.Progress.append, []

  def append_then_die(self, batch):
    real(self, batch)
    seen.append(1)
    if len(seen) == batches:
      raise RuntimeError("killed")

  monkeypatch.setattr(score.outputs.Progress, "append", append_then_die)
  with pytest.raises(RuntimeError, match="killed"):
    _main(score, args)
  monkeypatch.undo()


def test_score_resume_recomputes_tampered_or_torn_partial_rows(tmp_path, monkeypatch):
  data = test_train._write_jsonl(tmp_path / "rows.jsonl", test_train._rows(12, seed=2))
  args = [f"--config={SCORE_TINY}", f"--config.data.path={data}", "--config.data.format=raw"]
  args += ["--config.batch_size=1", "--config.progress=False"]
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  rc, _, err = _main(score, [*args, f"--config.output_dir={ref}"])
  assert rc == 0, err
  _killed_score_run(tmp_path, monkeypatch, [*args, f"--config.output_dir={killed}"], batches=6)
  partial = killed / "scores.partial.jsonl"
  lines = partial.read_text().splitlines()
  assert len(lines) == 6
  row = json.loads(lines[1])
  row["ln_ches"] = 12345.0  # edited by hand: its checksum no longer matches
  lines[1] = json.dumps(row)
  partial.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])  # the last row cut by a kill
  rc, stdout, err = _main(score, [*args, f"--config.output_dir={killed}", "--resume"])
  assert rc == 0, err
  assert _read_jsonl(killed / "scores.jsonl") == _read_jsonl(ref / "scores.jsonl")
  assert f"{partial}: 2 row(s) cut short or not matching their checksum; they are scored again" in stdout
  assert f"resuming the score run in {killed}: 4 of 12 rows already scored" in stdout


def test_score_resume_with_a_cut_run_json_is_one_line_naming_it(tmp_path):
  data = test_train._write_jsonl(tmp_path / "rows.jsonl", test_train._rows(4, seed=2))
  out = tmp_path / "out"
  out.mkdir()
  (out / "run.json").write_text('{"status": "running", "config": {"model.ti')
  rc, _, err = _main(
      score,
      [f"--config={SCORE_TINY}", f"--config.data.path={data}", "--config.data.format=raw", f"--config.output_dir={out}"]
      + ["--resume"],
  )
  assert (rc, err.strip().splitlines()) == (
      2,
      [
          f"error: --resume: {out}/run.json: not valid JSON (Unterminated string starting at: line 1 column 34 (char "
          "33)); cannot tell which run it was: score afresh (without --resume)"
      ],
  )
