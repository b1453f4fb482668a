"""rundir: atomic writes (fsynced, nothing half-written under the final name) and verified reads naming the file."""

import json
import os

import numpy as np
import pytest

from displacement_jax import rundir


def test_atomic_write_fsyncs_file_and_directory_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
  path = str(tmp_path / "run.json")
  synced = []
  real_fsync = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
  rundir.write_json(path, {"status": "running"})
  assert len(synced) == 2  # the file, then its directory (after the rename)
  with pytest.raises(TypeError):
    rundir.write_json(path, {"status": object()})  # fails while writing
  assert rundir.read_json(path) == {"status": "running"} and os.listdir(tmp_path) == ["run.json"]


def test_reads_name_the_file(tmp_path):
  cut = tmp_path / "run.json"
  cut.write_text('{"status": "runn')
  with pytest.raises(rundir.CorruptFileError, match=rf"^{cut}: not valid JSON \(Unterminated string"):
    rundir.read_json(str(cut))
  log = tmp_path / "metrics.jsonl"
  log.write_text('{"step": 0}\nnot json\n{"step": 2}\n{"step": 3, "lo')
  assert rundir.salvage_jsonl(str(log)) == ([{"step": 0}, {"step": 2}], [2, 4])
  with pytest.raises(rundir.CorruptFileError, match=rf"^{log}: line 2 is not valid JSON"):
    rundir.read_jsonl(str(log))
  npz = str(tmp_path / "cache.npz")
  rundir.write_npz(npz, {"a": np.arange(1000.0)})
  np.testing.assert_array_equal(rundir.read_npz(npz)["a"], np.arange(1000.0))
  os.truncate(npz, os.path.getsize(npz) // 2)
  with pytest.raises(rundir.CorruptFileError, match=rf"^{npz}: not a readable npz"):
    rundir.read_npz(npz)


def test_sealed_rows_detect_an_edit():
  row = rundir.seal({"pos": 3, "ln_ches": -1.872, "score": float("nan")})
  assert rundir.unseal(json.loads(json.dumps(row)))["ln_ches"] == -1.872
  assert rundir.unseal(dict(row, ln_ches=12345.0)) is None
  assert rundir.unseal({"pos": 3, "ln_ches": -1.872}) is None  # no checksum: not trusted


def test_a_directory_is_complete_only_with_its_verified_manifest(tmp_path):
  d = tmp_path / "hf"
  d.mkdir()
  (d / "config.json").write_text("{}")
  assert rundir.check_digests(str(d), "export.json") == "no export.json: its save never completed"
  rundir.write_digests(str(d), "export.json", params_sha256="abc")
  assert rundir.check_digests(str(d), "export.json") is None
  assert rundir.read_manifest(str(d), "export.json")["params_sha256"] == "abc"
  (d / "config.json").write_text("{ }")
  assert rundir.check_digests(str(d), "export.json") == "config.json has 3 bytes, 2 were written"
