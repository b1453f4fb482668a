"""Real multi-process runs on this machine: 2 processes x 2 CPU devices (launch/local.py, gloo collectives) against
1 process x 4 devices, for training and scoring, plus the failure paths.

One module fixture runs every CLI run once, two at a time where they are independent (a 2-process run leaves a
core idle while its process 1 compiles: only process 0 uses the persistent compilation cache), and the tests read
its outputs:

  fresh1    1 process:   configs/dpo_tiny.py, 6 steps = 2 epochs of 3 batches, checkpoints 3 and 6, HF export:
            the reference run
  resume2   2 processes: --resume of a copy of fresh1 without step 6 (a 1-process checkpoint; the reference
            cache read by process 0 and broadcast) -> steps 4-6 = epoch 1, checkpoints 4 and 6, rows logged per
            process, HF export
  resume1   1 process:   --resume of a copy of resume2 without step 6 (a checkpoint written by 2 processes) -> 5-6
  score2 / score1        configs/score_tiny.py on 2 processes / on 1 process
  killed    2 processes: a fresh training run (the reference pass computed on 2 processes) whose process 1 is
            SIGKILLed once that pass is done

On their own: a 2-process script (placement on a mesh whose batch axes do not span the processes, broadcast, the
reference cache, a Python error on one process). Every spawned process has bounded timeouts, runs under an outer
timeout and is killed (its whole session) on failure; the coordinator listens on 127.0.0.1 only.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from displacement_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.py")
TRAIN = [
    "-m",
    "displacement_jax.train",
    "--config=configs/dpo_tiny.py",
    "--config.num_steps=6",
    "--config.checkpoint.every=3",
    "--config.progress=False",
    "--config.debug.log_rows=True",
]
SCORE = ["-m", "displacement_jax.score", "--config=configs/score_tiny.py", "--config.progress=False"]
RUN_TIMEOUT = 420  # s, per run (a cold 2-process training run takes ~60-100 s on a loaded 2-core machine)
TOL = 1e-5
_MP_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env(devices: int | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in _MP_ENV}
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


class Run:
  """One spawned run (1 process, or launch/local.py with 2), in its own session so that cleanup kills it all."""

  def __init__(self, name: str, args: list[str], out_dir: str, *, processes: int, log_dir: str):
    self.name, self.out_dir = name, out_dir
    os.makedirs(log_dir, exist_ok=True)
    self.stdout = os.path.join(log_dir, f"{name}.out")
    self.process_log = lambda i: os.path.join(log_dir, name, f"process_{i}.log")
    if processes == 1:
      cmd, env = [sys.executable, *args, f"--config.output_dir={out_dir}"], _env(4)
    else:
      cmd = [sys.executable, LOCAL, "-n", str(processes), "-d", "2", "--timeout", str(RUN_TIMEOUT - 20)]
      cmd += ["--log-dir", os.path.join(log_dir, name), "--", sys.executable, *args, f"--config.output_dir={out_dir}"]
      env = _env()
    self.start = time.monotonic()
    with open(self.stdout, "w") as out:
      self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

  def wait(self, *, ok: bool = True) -> "Run":
    try:
      self.proc.wait(timeout=max(1.0, RUN_TIMEOUT - (time.monotonic() - self.start)))
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.name} did not end within {RUN_TIMEOUT} s:\n{self.output()[-3000:]}")
    self.seconds = time.monotonic() - self.start
    if ok:
      assert self.proc.returncode == 0, f"{self.name} failed ({self.proc.returncode}):\n{self.output()[-5000:]}"
    return self

  def kill(self) -> None:
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()

  def output(self) -> str:
    with open(self.stdout, errors="replace") as f:
      return f.read()

  def log(self, i: int) -> str:
    path = self.process_log(i)
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def _kill_process_1_after_the_reference_pass(run: Run) -> dict:
  """SIGKILL process 1 of `run` once process 0 has logged the reference pass; how process 0 ended, and when."""
  while "reference log-probs" not in run.log(0):  # past the first collectives, on to the monitor and training
    assert run.proc.poll() is None, run.output()[-3000:]
    assert time.monotonic() - run.start < RUN_TIMEOUT, "the run did not reach the reference pass"
    time.sleep(0.2)
  os.kill(int(run.output().split("process 1: pid ")[1].split(",")[0]), signal.SIGKILL)
  killed = time.monotonic()
  run.wait(ok=False)
  return {"seconds": time.monotonic() - killed, "status": run.proc.returncode, "log0": run.log(0), "out": run.output()}


def _copy_run(src: str, dst: str, *, drop=()) -> str:
  """A copy of a run directory for a --resume elsewhere: without its logs, export, events and row logs, and
  without the relative paths `drop` (checkpoint steps, the reference cache)."""
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("launch_logs", "hf", "tensorboard", "rows_process*"))
  for rel in drop:
    shutil.rmtree(os.path.join(dst, rel))
  return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("mp")
  logs, out = str(base / "logs"), lambda name: str(base / name)
  started: list[Run] = []

  def start(name, args, processes):
    started.append(Run(name, args, out(name), processes=processes, log_dir=logs))
    return started[-1]

  try:
    fresh1 = start("fresh1", [*TRAIN, "--config.export_hf=True"], 1)
    score2 = start("score2", SCORE, 2)
    fresh1.wait()
    _copy_run(out("fresh1"), out("resume2"), drop=("checkpoints/6",))
    # keep=3: no older step is deleted during the run (checkpoint.py deletes from a background thread, and orbax's
    # delete is a collective: on several processes it must run in the same order everywhere).
    ckpt = ["--config.checkpoint.every=2", "--config.checkpoint.keep=3"]
    resume2 = start("resume2", [*TRAIN, "--config.export_hf=True", *ckpt, "--resume"], 2)
    score2.wait()
    score1 = start("score1", SCORE, 1).wait()
    resume2.wait()
    _copy_run(out("resume2"), out("resume1"), drop=("checkpoints/6",))
    resume1 = start("resume1", [*TRAIN, "--config.export_hf=True", "--resume"], 1)
    killed = start("killed", [*TRAIN, "--config.num_steps=1000", "--config.distributed.peer_timeout=5"], 2)
    killed_result = _kill_process_1_after_the_reference_pass(killed)
    resume1.wait()
  finally:
    for run in started:
      run.kill()
  timings = {r.name: round(r.seconds, 1) for r in started}
  print("multi-process run timings (s):", timings)
  return {"dir": out, "runs": {r.name: r for r in started}, "killed": killed_result, "timings": timings}


def _metrics(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _by_step(rows: list[dict]) -> dict[int, dict]:
  """The training-step rows (those with a loss) by step."""
  return {r["step"]: r for r in rows if "loss" in r}


def _assert_rows_close(got: dict, want: dict, where: str) -> None:
  """Every key equal, floats within 1e-5 relative; a change of a log-prob relative to the log-prob's size (the
  difference of two ~100-nat float32 numbers)."""
  assert set(got) == set(want), where
  logp = max([1.0] + [abs(v) for k, v in want.items() if "logp" in k and "change" not in k and isinstance(v, float)])
  for key, value in want.items():
    if isinstance(value, float) or isinstance(got[key], float):
      scale = max(1.0, abs(value), logp if "change" in key or "margin" in key else 0.0)
      assert abs(got[key] - value) <= TOL * scale, f"{where}: {key} {got[key]} != {value}"
    elif isinstance(value, list) and value and all(isinstance(v, float) for v in value):  # e.g. monitor/fell_changes
      scale = max([1.0, logp] + [abs(v) for v in value])
      assert len(got[key]) == len(value), f"{where}: {key}"
      assert all(abs(g - v) <= TOL * scale for g, v in zip(got[key], value)), f"{where}: {key} {got[key]} != {value}"
    else:
      assert got[key] == value, f"{where}: {key}"


def _hf(run_dir: str) -> dict[str, np.ndarray]:
  return load_file(os.path.join(run_dir, "hf", "model.safetensors"))


def _files(run_dir: str) -> list[str]:
  return sorted(
      os.path.relpath(os.path.join(d, f), run_dir)
      for d, _, files in os.walk(run_dir)
      for f in files
      if "launch_logs" not in d
  )


# ---------------------------------------------------------------------------------------------- training


def test_two_processes_train_and_resume_like_one(runs):
  """resume2 (2 processes, from a 1-process checkpoint) and resume1 (1 process, from a checkpoint written by 2
  processes) continue exactly as the uninterrupted 1-process run: every metric of every step (loss curve,
  monitor) and the final params (HF export) within 1e-5."""
  want = _by_step(_metrics(runs["dir"]("fresh1")))
  assert sorted(want) == [1, 2, 3, 4, 5, 6]
  final = _hf(runs["dir"]("fresh1"))
  for name, recomputed in (("resume2", (4, 5, 6)), ("resume1", (5, 6))):
    rows = _metrics(runs["dir"](name))
    got = _by_step(rows)
    assert sorted(got) == [1, 2, 3, 4, 5, 6], name  # the copied run's rows up to its checkpoint, then its own
    for step in recomputed:
      _assert_rows_close(got[step], want[step], f"{name} step {step}")
    assert [r["event"] for r in rows if r.get("event")] == ["start", "resume"] + ["resume"] * (name == "resume1")
    params = _hf(runs["dir"](name))
    assert sorted(params) == sorted(final)
    for key in final:
      np.testing.assert_allclose(params[key], final[key], rtol=TOL, atol=TOL, err_msg=f"{name}: {key}")


def test_two_process_reference_pass_and_cache(runs):
  """The killed run computed the reference log-probs on 2 processes before its process 1 was killed: the cache
  process 0 wrote equals the 1-process one; resume2 (2 processes) found fresh1's (process 0 read it, process 1 got
  it by broadcast: the resumed steps match)."""
  (one,) = [f for f in _files(runs["dir"]("fresh1")) if f.startswith("reference_cache/")]
  (two,) = [f for f in _files(runs["dir"]("killed")) if f.startswith("reference_cache/")]
  assert one == two
  with np.load(os.path.join(runs["dir"]("fresh1"), one)) as a, np.load(os.path.join(runs["dir"]("killed"), two)) as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      if a[key].dtype.kind == "f":
        np.testing.assert_allclose(b[key], a[key], rtol=TOL, atol=TOL * 100, err_msg=key)  # log-probs ~ -100
  resumes = lambda name: [r for r in _metrics(runs["dir"](name)) if r.get("event") == "resume"]
  assert [r["reference_from_cache"] for r in resumes("resume2")] == [True]
  assert [r["reference_from_cache"] for r in resumes("resume1")] == [True, True]


def test_each_output_file_is_written_once(runs):
  """Process 0 writes metrics, TensorBoard, the reference cache and the HF export (each once: the file sets match
  the 1-process run's); orbax writes one file set per process; only process 0 prints the run's lines."""
  resume2, fresh1 = _files(runs["dir"]("resume2")), _files(runs["dir"]("fresh1"))
  assert len([f for f in resume2 if f.startswith("tensorboard/")]) == 1  # one writer, one events file
  assert not [f for f in resume2 if "tmp" in os.path.basename(f)]
  assert {f for f in resume2 if f.startswith("checkpoints/4/state/ocdbt.process_")} >= {
      "checkpoints/4/state/ocdbt.process_0/manifest.ocdbt",
      "checkpoints/4/state/ocdbt.process_1/manifest.ocdbt",
  }
  assert [f for f in resume2 if f.startswith("reference_cache/")] == [
      f for f in fresh1 if f.startswith("reference_cache/")
  ]
  assert [r["step"] for r in _metrics(runs["dir"]("resume2")) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no repeats
  hf = lambda files: [f for f in files if f.startswith("hf/")]
  assert hf(resume2) == hf(fresh1) and "hf/model.safetensors" in hf(fresh1)
  with open(os.path.join(runs["dir"]("resume2"), "hf", "config.json")) as a:
    with open(os.path.join(runs["dir"]("fresh1"), "hf", "config.json")) as b:
      assert json.load(a) == json.load(b)
  run = runs["runs"]["resume2"]
  assert "resumed from step 3" in run.log(0) and "exported HF model" in run.log(0)
  assert "resumed from step" not in run.log(1) and "exported HF model" not in run.log(1)


def test_per_host_rows_are_disjoint_and_cover_the_epoch(runs):
  """Each process collated only its half of every global batch of epoch 1 (resume2's steps 4-6: 3 batches of 8
  of the 24 pairs): the halves are disjoint, together they are the 1-process batch, and the epoch holds every row
  exactly once."""

  def rows(run: str, process: int) -> dict[tuple[int, int], list[int]]:
    with open(os.path.join(runs["dir"](run), f"rows_process{process}.jsonl")) as f:
      return {(r["epoch"], r["step"]): r["index"] for r in map(json.loads, f) if r["process"] == process}

  one, p0, p1 = rows("fresh1", 0), rows("resume2", 0), rows("resume2", 1)
  assert sorted(p0) == sorted(p1) == [(1, 0), (1, 1), (1, 2)]
  seen = []
  for batch in p0:
    assert len(p0[batch]) == len(p1[batch]) == 4 and not set(p0[batch]) & set(p1[batch])
    assert p0[batch] + p1[batch] == one[batch]  # process 0 holds the first half of the global batch
    seen += p0[batch] + p1[batch]
  assert sorted(seen) == list(range(24))


# ---------------------------------------------------------------------------------------------- scoring


def test_two_processes_score_like_one(runs):
  def scores(name):
    with open(os.path.join(runs["dir"](name), "scores.jsonl")) as f:
      return [json.loads(line) for line in f]

  one, two = scores("score1"), scores("score2")
  assert len(one) == len(two) == 24
  for a, b in zip(two, one):
    _assert_rows_close(a, b, f"score row {b['index']}")
  assert _files(runs["dir"]("score2")) == _files(runs["dir"]("score1"))  # each file once, by process 0
  summary = lambda name: json.load(open(os.path.join(runs["dir"](name), "summary.json")))
  s1, s2 = summary("score1"), summary("score2")
  assert s1["devices"] == s2["devices"] == 4
  assert abs(s2["ln_ches"]["mean"] - s1["ln_ches"]["mean"]) <= TOL * max(1, abs(s1["ln_ches"]["mean"]))
  assert "scored 24 pairs" in runs["runs"]["score2"].log(0) and "scored" not in runs["runs"]["score2"].log(1)


# ---------------------------------------------------------------------------------------------- failures


def test_killed_process_ends_the_other_with_a_clear_message(runs):
  """SIGKILL of process 1 in the middle of a 2-process training run: process 0 stops by itself within seconds
  (status 1, one line naming process 1) instead of waiting in a collective or aborting after the heartbeat
  timeout; the launcher reports both."""
  killed = runs["killed"]
  text = killed["log0"]
  assert "error: process 1 stopped responding" in text and "stopping process 0" in text, text[-3000:]
  assert "Check failure" not in text
  assert "[local] process 0 exited with status 1" in killed["out"]
  assert "[local] process 1 killed by SIGKILL" in killed["out"]
  assert killed["status"] == 128 + signal.SIGKILL  # the launcher: the status of the first process that failed
  assert killed["seconds"] < 30, killed["seconds"]


_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ml_collections, numpy as np, jax
    from jax.experimental import multihost_utils
    from displacement_jax import sharding
    from displacement_jax.train import reference

    out_dir, failing = sys.argv[1], int(sys.argv[2])
    mesh = sharding.mesh_from_config(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}),
                                     ml_collections.ConfigDict({"peer_timeout": 5}))
    me = jax.process_index()
    out = {"count": jax.process_count(), "devices": jax.device_count()}
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    g = sharding.host_local_batch_to_global({"x": full[4 * me : 4 * me + 4]}, mesh)["x"]
    out["per_host"] = bool(np.array_equal(gather(g), full))
    tensor_mesh = sharding.make_mesh(data=1, fsdp=1, tensor=4)  # the batch axes do not span the processes
    try:
      sharding.host_local_batch_to_global({"x": full[4 * me : 4 * me + 4]}, tensor_mesh)
      out["tensor_mesh_error"] = None
    except ValueError as e:
      out["tensor_mesh_error"] = str(e)
    g = sharding.global_batch_to_devices({"x": full}, tensor_mesh)["x"]
    out["global_on_tensor_mesh"] = bool(g.shape == (8, 3) and np.array_equal(gather(g), full))
    sent = {"a": np.arange(5, dtype=np.float32) + 0.5, "b": np.ones((2, 3), np.int32)} if me == 0 else None
    got = sharding.broadcast_from_main(sent)
    out["broadcast"] = [got["a"].tolist(), got["b"].dtype.str, list(got["b"].shape), sharding.broadcast_from_main(None)]
    cache, key = os.path.join(out_dir, "cache"), "k" * 64
    first = reference.cached_reference(cache, key, lambda: {"r": np.full(3, 1.25, np.float32)}, log=lambda m: None)
    multihost_utils.sync_global_devices("cache written")
    second = reference.cached_reference(cache, key, lambda: {"r": np.zeros(3, np.float32)}, log=lambda m: None)
    out["cache"] = [first[1], second[1], second[0]["r"].tolist(), sorted(os.listdir(cache))]
    json.dump(out, open(os.path.join(out_dir, f"result_{me}.json"), "w"))

    def run():
      if me == failing:
        raise ValueError(f"bad input on process {me}")
      multihost_utils.sync_global_devices("the failing process never comes")  # waits for a peer that failed

    sharding.reporting_failures(run)()
""")


@pytest.mark.parametrize("failing", [1, 0])
def test_placement_broadcast_cache_and_a_failing_process(tmp_path, failing):
  """The failing process names its error, every other one stops within seconds naming it (no hang, no abort)."""
  script = tmp_path / "script.py"
  script.write_text(_SCRIPT)
  cmd = [sys.executable, LOCAL, "-n", "2", "-d", "2", "--timeout", "120", "--log-dir", str(tmp_path / "logs")]
  start = time.monotonic()
  proc = subprocess.run(
      [*cmd, "--", sys.executable, str(script), str(tmp_path), str(failing)],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=180,
  )
  seconds = time.monotonic() - start
  assert proc.returncode == 1, proc.stderr
  for i in range(2):
    out = json.load(open(tmp_path / f"result_{i}.json"))
    assert out["count"] == 2 and out["devices"] == 4
    assert out["per_host"] and out["global_on_tensor_mesh"]
    assert "does not split the batch over the 2 processes" in out["tensor_mesh_error"]
    assert out["broadcast"] == [[0.5, 1.5, 2.5, 3.5, 4.5], "<i4", [2, 3], None]
    assert out["cache"] == [False, True, [1.25] * 3, ["reference_" + "k" * 32 + ".npz"]]
  other = 1 - failing
  log = lambda i: (tmp_path / "logs" / f"process_{i}.log").read_text()
  assert f"ValueError: bad input on process {failing}" in log(failing)
  # the other one names the cause (its own collective error, if it noticed the peer leave first, in brackets)
  assert f"error: process {failing} failed: ValueError: bad input on process {failing}" in log(other)
  assert f"stopping process {other}" in log(other)
  assert "SIGABRT" not in proc.stderr and "Check failure" not in log(0) + log(1)
  assert f"[local] process {other} exited with status 1" in proc.stderr
  assert seconds < 90, seconds


# ---------------------------------------------------------------------------------------------- units


def test_distributed_args_from_the_environment():
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert sharding.distributed_args(env) == {
      "coordinator_address": "127.0.0.1:1234",
      "num_processes": 2,
      "process_id": 1,
  }
  assert sharding.distributed_args({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {"coordinator_address": "h:1"}
  assert sharding.distributed_args({}) == {}
  for bad, match in [
      (dict(env, JAX_NUM_PROCESSES="two"), "JAX_NUM_PROCESSES='two' is not an integer"),
      (dict(env, JAX_PROCESS_ID="2"), r"JAX_PROCESS_ID=2 must lie in \[0, JAX_NUM_PROCESSES=2\)"),
      ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "needs JAX_COORDINATOR_ADDRESS"),
      ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "must be set together"),
  ]:
    with pytest.raises(ValueError, match=match):
      sharding.distributed_args(bad)


def test_distributed_timeouts_from_the_config():
  assert sharding.distributed_timeouts(None) == sharding.DISTRIBUTED_DEFAULTS
  got = sharding.distributed_timeouts(ml_collections.ConfigDict({"peer_timeout": 0, "heartbeat_timeout": 10}))
  assert got == dict(sharding.DISTRIBUTED_DEFAULTS, peer_timeout=0.0, heartbeat_timeout=10.0)
  with pytest.raises(ValueError, match="config.distributed.init_timeout=0: only peer_timeout may be 0"):
    sharding.distributed_timeouts(ml_collections.ConfigDict({"init_timeout": 0}))
  with pytest.raises(ValueError, match="config.distributed.shutdown_timeout='x' must be a number"):
    sharding.distributed_timeouts(ml_collections.ConfigDict({"shutdown_timeout": "x"}))


def test_peer_watch_verdict():
  """The decision of PeerWatch from the key-value store's contents (no processes needed)."""
  watch = sharding.PeerWatch.__new__(sharding.PeerWatch)
  watch.me, watch.n, watch.peer_timeout, watch._seen, watch._dead, watch._started = 0, 3, 5.0, {}, set(), 0.0
  alive = {"alive": {0: "a", 1: "a", 2: "a"}}
  assert watch.verdict(alive, 1.0, 5.0) is None
  assert watch.verdict({**alive, "failed": {0: "mine"}}, 1.0, 5.0) is None  # its own failure: the main thread's job
  assert watch.verdict({**alive, "failed": {2: "ValueError: x"}}, 1.0, 5.0) == "process 2 failed: ValueError: x"
  assert watch.verdict({**alive, "stopped": {1: "after y"}}, 1.0, 5.0) == "process 1 stopped after y"
  assert watch.verdict({"alive": {0: "b", 1: "b", 2: "a"}}, 4.0, 5.0) is None  # 1 beat again; 2 quiet for 3 s
  assert watch.verdict({"alive": {0: "c", 1: "c", 2: "a"}}, 7.0, 5.0).startswith("process 2 stopped responding")
  assert watch._dead == {2}
  assert watch.verdict({"alive": {0: "d", 1: "d", 2: "a"}, "done": {2: "1"}}, 20.0, 5.0) is None  # 2 finished
  assert watch.verdict({"alive": {0: "d", 1: "d", 2: "a"}}, 20.0, 0) is None  # timeout 0: heartbeats not checked
