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

from displacement_jax import checkpoint as checkpoint_lib
from displacement_jax import metrics as metrics_lib
from displacement_jax import runtime, score, training
from displacement_jax import train as train_lib
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


def _damage(step_dir, how):
  """Flip a byte in the middle of / cut in half the largest array file of a checkpoint; its path and sizes."""
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  if how == "flip":
    with open(path, "r+b") as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
  else:
    os.truncate(path, size // 2)
  return os.path.relpath(path, step_dir), size


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
  assert "moved the outputs of an earlier run (scores.jsonl, summary.json, ln_ches_hist.png, filtered.jsonl" in stdout
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
