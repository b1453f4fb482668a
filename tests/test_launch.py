"""Sweep expansion and the launch scripts (bash syntax, dry-run commands, run_sweep)."""

import json
import os
import shlex
import subprocess
import sys
import textwrap
import time

import pytest

from displacement_jax.config import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def _write_config(tmp_path, body):
  path = tmp_path / "configs" / "swept.py"
  path.parent.mkdir(exist_ok=True)
  path.write_text(textwrap.dedent(body))
  return str(path)


SWEPT = """
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.output_dir = 'runs/swept_' + (arg or 'x')
  c.seed = 0
  c.optim = ml_collections.ConfigDict({'lr': 1e-3})
  c.tag = 'a'
  return c

def get_sweep():
  return [{'optim.lr': lr, 'seed': s} for lr in (1e-3, 1e-4) for s in (0, 1)] + [{'tag': 'b c'}]
"""


def test_expand_sweep_command_lines(tmp_path):
  path = _write_config(tmp_path, SWEPT)
  cmds = sweep.expand(path + ":big", python="PY")
  assert len(cmds) == 5
  assert cmds[0] == [
      "PY",
      "-m",
      "displacement_jax.train",
      f"--config={path}:big",
      "--config.optim.lr=0.001",
      "--config.seed=0",
      "--config.output_dir=runs/swept_big/lr=0.001_seed=0",
  ]
  assert cmds[3][-3:] == [
      "--config.optim.lr=0.0001",
      "--config.seed=1",
      "--config.output_dir=runs/swept_big/lr=0.0001_seed=1",
  ]
  assert cmds[4][-2:] == ["--config.tag=b c", "--config.output_dir=runs/swept_big/tag=b-c"]
  dirs = [c[-1] for c in cmds]
  assert len(set(dirs)) == len(dirs)
  # the explicit arg wins, extra args go before the output dir
  cmds = sweep.expand(path, "small", extra_args=["--config.num_steps=3"])
  assert cmds[0][3] == f"--config={path}:small" and cmds[0][-2] == "--config.num_steps=3"


def test_expand_without_sweep_and_bad_keys(tmp_path):
  path = _write_config(tmp_path, SWEPT.split("def get_sweep")[0])
  assert sweep.expand(path, python="py") == [
      ["py", "-m", "displacement_jax.train", f"--config={path}", "--config.output_dir=runs/swept_x"]
  ]
  bad = _write_config(tmp_path, SWEPT.replace("'optim.lr'", "'optim.learning_rate'"))
  with pytest.raises(ValueError, match="optim.learning_rate"):
    sweep.expand(bad)
  with pytest.raises(ValueError, match="does not exist"):
    sweep.expand(str(tmp_path / "nope.py"))


def test_quantile_config_sweep_is_45_distinct_runs():
  cmds = sweep.expand(os.path.join(ROOT, "configs", "ches_quantiles.py") + ":dataset=ultrafeedback,tiny")
  assert len(cmds) == 45
  assert len({c[-1] for c in cmds}) == 45
  assert cmds[0][4:] == [
      "--config.quantiles.measure=ches",
      "--config.quantiles.q=0.0",
      "--config.seed=0",
      "--config.output_dir=runs/quantiles_uf_tiny/measure=ches_q=0.0_seed=0",
  ]


def test_run_sweep_dry_run_and_real_run(tmp_path):
  out = subprocess.run(
      [sys.executable, os.path.join(LAUNCH, "run_sweep.py"), _write_config(tmp_path, SWEPT), "--dry-run"],
      capture_output=True,
      text=True,
      check=True,
  )
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 5 and lines[0].endswith("--config.output_dir=runs/swept_x/lr=0.001_seed=0")
  assert "'--config.tag=b c'" in lines[4]
  # a real run with a stand-in trainer module: every command runs (2 at a time), each logs, failures counted
  (tmp_path / "fake_train.py").write_text(
      'import sys\nprint("ran", " ".join(sys.argv[1:]))\nsys.exit(3 if "tag=b" in sys.argv[-1] else 0)\n'
  )
  cfg = _write_config(tmp_path, SWEPT.replace("'runs/swept_'", repr(str(tmp_path / "runs")) + " + '/s_'"))
  proc = subprocess.run(
      [sys.executable, os.path.join(LAUNCH, "run_sweep.py"), cfg, "--parallel", "2", "--module", "fake_train"],
      capture_output=True,
      text=True,
      env=dict(os.environ, PYTHONPATH=str(tmp_path)),
      cwd=str(tmp_path),
  )
  assert proc.returncode == 1, proc.stderr
  assert "1 of 5 runs failed" in proc.stderr and "tag=b-c" in proc.stderr
  logs = sorted((tmp_path / "runs").rglob("launch.log"))
  assert len(logs) == 5
  first = (tmp_path / "runs" / "s_x" / "lr=0.001_seed=0" / "launch.log").read_text()
  assert first.strip() == (
      f"ran --config={cfg} --config.optim.lr=0.001 --config.seed=0 "
      f"--config.output_dir={tmp_path}/runs/s_x/lr=0.001_seed=0"
  )


def test_shell_scripts_parse():
  for name in ("tpu_pod.sh", "gpu_node.sh"):
    subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], check=True)


def test_tpu_pod_dry_run_prints_every_gcloud_command():
  cmd = [
      os.path.join(LAUNCH, "tpu_pod.sh"),
      "--dry-run",
      "--project",
      "proj",
      "--zone",
      "us-east5-a",
      "--accelerator-type",
      "v5litepod-16",
      "--tpu-name",
      "dj",
      "--gcs",
      "gs://bucket/runs",
      "--delete",
      "--",
      "python",
      "-m",
      "displacement_jax.train",
      "--config=configs/dpo_tiny.py",
      "--config.output_dir=/tmp/out",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  lines = [l[2:] for l in out.splitlines() if l.startswith("+ ")]
  common = "--zone=us-east5-a --project=proj"
  assert lines[0] == f"gcloud compute tpus tpu-vm describe dj {common}"
  assert lines[1] == (
      f"gcloud compute tpus tpu-vm create dj {common} --accelerator-type=v5litepod-16 " "--version=tpu-ubuntu2204-base"
  )
  assert lines[3] == f"gcloud compute tpus tpu-vm scp /tmp/displacement_jax_src.tar.gz dj:~/ {common} --worker=all"
  run_line = [l for l in lines if "displacement_jax.train" in l]
  assert len(run_line) == 1 and "--worker=all" in run_line[0]
  assert "--config.output_dir=/tmp/out" in run_line[0]
  assert shlex.split(lines[-2])[-1] == "--command=gsutil -m rsync -r /tmp/out gs://bucket/runs/out"
  assert lines[-1] == f"gcloud compute tpus tpu-vm delete dj {common} --quiet"


def test_tpu_pod_requires_command_and_project():
  proc = subprocess.run([os.path.join(LAUNCH, "tpu_pod.sh"), "--dry-run"], capture_output=True, text=True)
  assert proc.returncode == 2 and "no command given" in proc.stderr
  proc = subprocess.run(
      [os.path.join(LAUNCH, "tpu_pod.sh"), "--", "true"],
      capture_output=True,
      text=True,
      env={k: v for k, v in os.environ.items() if k != "TPU_PROJECT"},
  )
  assert proc.returncode == 2 and "--project" in proc.stderr


def test_gpu_node_dry_run():
  out = subprocess.run(
      [
          os.path.join(LAUNCH, "gpu_node.sh"),
          "--dry-run",
          "--",
          "python",
          "-m",
          "displacement_jax.score",
          "--config=configs/score_tiny.py",
      ],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.splitlines()
  assert out[0] == "+ python -m pip install -q -U 'jax[cuda12]'"
  assert out[1] == f"+ python -m pip install -q -e {ROOT}"
  assert any(l.startswith("+ export XLA_FLAGS=") and "latency_hiding_scheduler" in l for l in out)
  assert out[-1] == "+ python -m displacement_jax.score --config=configs/score_tiny.py"


# ------------------------------------------------------------------------ launch/local.py (pod rehearsal)

LOCAL_PY = os.path.join(LAUNCH, "local.py")
POD_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def test_local_dry_run_prints_each_process_environment():
  cmd = ["python", "-m", "displacement_jax.train", "--config=configs/dpo_tiny.py", "--config.output_dir=/tmp/o"]
  out = subprocess.run(
      [sys.executable, LOCAL_PY, "-n", "3", "-d", "2", "--port", "12345", "--dry-run", "--", *cmd],
      capture_output=True,
      text=True,
      check=True,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
  )
  lines = out.stdout.splitlines()
  assert len(lines) == 3
  assert lines[1] == (
      "+ JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=3 "
      "JAX_PROCESS_ID=1 JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 "
      + " ".join(cmd)
      + " > /tmp/o/launch_logs/process_1.log 2>&1 &"
  )
  assert "3 processes x 2 devices, coordinator 127.0.0.1:12345" in out.stderr
  # no --port: a free port of the loopback address, the same for every process
  out = subprocess.run(
      [sys.executable, LOCAL_PY, "--dry-run", "--", "true"], capture_output=True, text=True, check=True
  )
  ports = {line.split("JAX_COORDINATOR_ADDRESS=127.0.0.1:")[1].split()[0] for line in out.stdout.splitlines()}
  assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
  assert "runs/local_logs/process_0.log" in out.stdout
  proc = subprocess.run([sys.executable, LOCAL_PY, "-n", "0", "--", "true"], capture_output=True, text=True)
  assert proc.returncode == 2 and "--num-processes" in proc.stderr


_FAKE_WORKER = """
import json, os, sys, time
env = {k: os.environ.get(k) for k in %r + ("JAX_PLATFORMS", "XLA_FLAGS")}
print(json.dumps(env), flush=True)
if sys.argv[1] == "fail" and env["JAX_PROCESS_ID"] == "1":
  print("error: boom on process 1", file=sys.stderr)
  sys.exit(3)
if sys.argv[1] == "hang":
  time.sleep(60)
""" % (POD_VARS,)


def test_local_runs_every_process_with_the_pod_environment(tmp_path):
  worker = tmp_path / "worker.py"
  worker.write_text(_FAKE_WORKER)
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8")

  def launch(mode, *flags):
    cmd = [sys.executable, LOCAL_PY, "-n", "2", "-d", "3", "--log-dir", str(tmp_path / mode), *flags, "--"]
    return subprocess.run(
        [*cmd, sys.executable, str(worker), mode], capture_output=True, text=True, env=env, timeout=60
    )

  proc = launch("ok")
  assert proc.returncode == 0, proc.stderr
  assert "[local] all 2 processes finished" in proc.stderr
  envs = [json.loads((tmp_path / "ok" / f"process_{i}.log").read_text()) for i in range(2)]
  assert json.loads(proc.stdout) == envs[0]  # process 0's output is also on the terminal
  port = envs[0]["JAX_COORDINATOR_ADDRESS"].split(":")[1]
  for i, e in enumerate(envs):
    assert e == {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": str(i),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=3",
    }
  # a failing process: its status, and its error line in the summary
  proc = launch("fail")
  assert proc.returncode == 3
  assert "[local] process 1 exited with status 3: error: boom on process 1" in proc.stderr
  # --timeout ends every process (the others are terminated, status 124)
  start = time.monotonic()
  proc = launch("hang", "--timeout", "1")
  assert proc.returncode == 124 and "--timeout=1 s reached" in proc.stderr
  assert time.monotonic() - start < 30
