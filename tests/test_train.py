"""displacement_jax.train end to end on a tiny random Llama: metrics, learning, resume, cache, mesh, bad input.

One module-scoped uninterrupted run (6 steps, 8-pair batches) is the reference for the resume test
(killed at step 3 via debug.stop_after_steps, then --resume) and for the 8-simulated-device subprocess run.
"""

import contextlib
import glob
import io
import json
import math
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from displacement_jax.train import metrics as metrics_lib
from displacement_jax import rundir, runtime
from displacement_jax.train import loop as training
from displacement_jax.train import main as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
DPO_TINY = os.path.join(ROOT, "configs", "dpo_tiny.py")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

STEPS = 6
WORDS = "the cat sat on a mat and then it ran to the big red door while a dog barked at birds".split()
# TRL's names (DPOTrainer + transformers Trainer), plus the Definition-1 share.
STEP_KEYS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "num_tokens",
    "epoch",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/chosen_change",
    "logps/rejected_change",
    "logits/chosen",
    "logits/rejected",
    "share_preferred_fell",
)
DROPPED_DUPLICATES = ("chosen_logps", "rejected_logps", "reward_accuracy", "preferred_change", "dispreferred_change")
MONITOR_KEYS = (
    "monitor/loss",
    "monitor/preferred_logprob_change",
    "monitor/dispreferred_logprob_change",
    "monitor/share_preferred_fell",
    "monitor/margin_change",
)


def _rows(n=16, seed=0):
  """A learnable preference set: varied prompts, chosen and rejected drawn from disjoint word pools."""
  rng = np.random.default_rng(seed)
  text = lambda pool, lo, hi: " ".join(rng.choice(pool, int(rng.integers(lo, hi))))
  return [
      {"prompt": text(WORDS, 2, 7), "chosen": text(WORDS[:8], 1, 5), "rejected": text(WORDS[8:], 1, 5)}
      for _ in range(n)
  ]


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def make_config(out_dir, data_path, **overrides):
  """The shared test config (also rebuilt inside the 8-device subprocess)."""
  from configs import base

  c = base.get_base_config()
  c.output_dir = str(out_dir)
  c.model.tiny = "llama"
  c.data.path = str(data_path)
  c.data.format = "raw"
  c.data.max_length = 32
  c.optim.name = "rmsprop"
  c.optim.lr = 1e-3
  c.batch_size = 8
  c.num_steps = STEPS
  c.eval.every = 2
  c.eval.max_samples = 8
  c.checkpoint.every = 2
  c.checkpoint.keep = 2
  c.logprob_chunk_size = 16
  c.progress = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
  return _write_jsonl(tmp_path_factory.mktemp("data") / "prefs.jsonl", _rows())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_path):
  out = tmp_path_factory.mktemp("full")
  return training.run(make_config(out, data_path, export_hf=True))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_path):
  """Killed at step 3 (debug.stop_after_steps), then resumed with the same config: (first, second, log)."""
  out = tmp_path_factory.mktemp("resume")
  first = training.run(make_config(out, data_path, **{"debug.stop_after_steps": 3}))
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    second = training.run(make_config(out, data_path), resume=True)
  return first, second, log.getvalue()


def _tensorboard_scalars(path):
  """(step, tag, value) of every scalar in a TensorBoard events file, each record's CRCs checked (TFRecord
  framing and the Event proto, as tensorboardX defines them)."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c

  data, out, at = open(path, "rb").read(), [], 0
  while at < len(data):
    header = data[at : at + 8]
    (n,) = struct.unpack("Q", header)
    assert struct.unpack("I", data[at + 8 : at + 12])[0] == masked_crc32c(header)
    record = data[at + 12 : at + 12 + n]
    assert struct.unpack("I", data[at + 12 + n : at + 16 + n])[0] == masked_crc32c(record)
    event = event_pb2.Event.FromString(record)
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    at += 16 + n
  return out


def test_metrics_written_and_loss_decreases(full_run):
  rows = metrics_lib.read_metrics(full_run.output_dir)
  steps = [r for r in rows if "loss" in r and r["step"] > 0]
  assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
  for r in steps:
    assert set(STEP_KEYS) <= set(r), sorted(set(STEP_KEYS) - set(r))
    assert not set(DROPPED_DUPLICATES) & set(r)
  # TRL progress keys: the rate each step used, cumulative tokens, fractional epoch (16 pairs / batch 8 = 2 steps).
  assert [r["learning_rate"] for r in steps] == [pytest.approx(1e-3)] * STEPS
  assert [r["epoch"] for r in steps] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
  tokens = [r["num_tokens"] for r in steps]
  assert all(b > a for a, b in zip(tokens, tokens[1:])) and tokens[0] > 8 * 2
  # Step 1 runs on the initial params = the reference model: DPO loss is exactly ln 2, no change yet.
  assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert steps[0]["logps/chosen_change"] == pytest.approx(0.0, abs=1e-5)
  evals = [r for r in rows if "monitor/loss" in r]
  assert [r["step"] for r in evals] == [0, 2, 4, 6]
  for r in evals:
    assert set(MONITOR_KEYS) <= set(r)
  assert evals[0]["monitor/loss"] == pytest.approx(math.log(2), abs=1e-6)
  # Before any update nothing has moved: the monitor compares the batch with its own baseline (same function,
  # same shapes), so the Definition-1 share and the change are exactly 0, not float noise.
  assert evals[0]["monitor/share_preferred_fell"] == 0.0 and evals[0]["monitor/preferred_logprob_change"] == 0.0
  assert steps[0]["share_preferred_fell"] == 0.0  # step 1's metrics are taken at the initial params
  assert not any("monitor/warning" in r for r in evals[:1])
  assert evals[-1]["monitor/loss"] < evals[0]["monitor/loss"] - 0.05  # learnable: chosen/rejected pools differ
  # The monitor's Definition-1 share recomputed from its own mean change is consistent with the result.
  assert 0.0 <= evals[-1]["monitor/share_preferred_fell"] <= 1.0
  assert full_run.step == STEPS and full_run.losses[0] == pytest.approx(math.log(2), abs=1e-6)
  (events,) = glob.glob(os.path.join(full_run.output_dir, "tensorboard", "events.out.tfevents.*"))
  scalars = lambda row: {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
  want = [(r["step"], k, pytest.approx(v)) for r in rows for k, v in scalars(r).items() if k != "step"]
  assert _tensorboard_scalars(events) == want
  ckpt_steps = sorted(int(d) for d in os.listdir(os.path.join(full_run.output_dir, "checkpoints")) if d.isdigit())
  assert ckpt_steps == [4, 6]  # every 2 steps, keep 2


def test_export_hf_reloads_same_params(full_run):
  from displacement_jax.models import io as io_lib

  assert full_run.hf_dir == os.path.join(full_run.output_dir, "hf")
  _, params, config = io_lib.from_pretrained(full_run.hf_dir, progress=False)
  assert config.vocab_size == 512 and config.model_type == "llama"
  got = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, a in jax.tree_util.tree_leaves_with_path(full_run.params):
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(a), err_msg=str(path))
  assert os.path.exists(os.path.join(full_run.hf_dir, "tokenizer.json"))


def test_kill_and_resume_matches_uninterrupted(full_run, resumed):
  first, second, log = resumed
  assert first.stopped_early and first.step == 3
  assert "resumed from step 3" in log
  assert second.step == STEPS and not second.stopped_early
  flat_a = jax.tree_util.tree_leaves_with_path(full_run.params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(second.params))
  for path, a in flat_a:
    np.testing.assert_allclose(np.asarray(flat_b[path]), np.asarray(a), atol=1e-6, rtol=0, err_msg=str(path))
  # the resumed run's metrics.jsonl holds the same per-step losses as the uninterrupted one
  loss_a = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(full_run.output_dir) if "loss" in r}
  loss_b = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(second.output_dir) if "loss" in r}
  assert sorted(loss_b) == sorted(loss_a)
  np.testing.assert_allclose([loss_b[s] for s in sorted(loss_a)], [loss_a[s] for s in sorted(loss_a)], atol=1e-6)


def test_reference_cache_reused(full_run, resumed):
  first, second, log = resumed
  assert not first.reference_from_cache and second.reference_from_cache
  assert "reference log-probs: reusing cache" in log
  # the cached arrays are the ones an independent run computed from scratch
  (a,), (b,) = (
      glob.glob(os.path.join(d, "reference_cache", "*.npz")) for d in (full_run.output_dir, second.output_dir)
  )
  with np.load(a) as za, np.load(b) as zb:
    assert str(za["__key__"]) == str(zb["__key__"])
    np.testing.assert_array_equal(za["chosen_ref_logps"], zb["chosen_ref_logps"])


_SUBPROCESS = r"""
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
assert jax.device_count() == {devices}, jax.devices()
import test_train
from displacement_jax.train import loop as training
res = training.run(test_train.make_config({out!r}, {data!r}, **{overrides!r}))
print('LOSSES=' + json.dumps(res.losses))
"""


@pytest.mark.parametrize(
    "devices,overrides",
    [
        (8, {"mesh.data": 4, "mesh.fsdp": 2}),  # one pair per device: one pair per row
        # 2 devices x 2 micro-batches, 2 pairs per row: rows planned per device and strided micro-batch
        (2, {"mesh.data": 2, "optim.grad_accum": 2, "data.pairs_per_row": 2}),
    ],
)
def test_devices_and_micro_batches_same_loss_curve(tmp_path, full_run, data_path, devices, overrides):
  """The full run (1 device, 8 pairs in 4 packed rows of 2) and runs on meshes of several devices, with gradient
  accumulation, give the same losses: packed rows never mix pairs of two devices or micro-batches."""
  assert full_run.metrics and make_config(tmp_path, data_path).data.pairs_per_row == 2
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  code = _SUBPROCESS.format(
      root=ROOT, tests=TESTS, out=str(tmp_path / "mesh"), data=data_path, devices=devices, overrides=overrides
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("LOSSES=")][-1]
  losses = json.loads(line[len("LOSSES=") :])
  assert len(losses) == STEPS
  np.testing.assert_allclose(losses, full_run.losses, atol=1e-5, rtol=0)


def test_two_side_batches_same_loss_curve(tmp_path, full_run, data_path):
  """data.shared_prompt_packing=False (each side run separately) trains to the same losses as packed rows."""
  assert full_run.metrics and make_config(tmp_path, data_path).data.shared_prompt_packing  # full_run packs
  result = training.run(make_config(tmp_path / "two_side", data_path, **{"data.shared_prompt_packing": False}))
  np.testing.assert_allclose(result.losses, full_run.losses, atol=1e-5, rtol=0)
  np.testing.assert_allclose(
      result.monitor["monitor/preferred_logprob_change"],
      full_run.monitor["monitor/preferred_logprob_change"],
      atol=5e-4,  # sums of ~-100 log-probs in another summation order, after 10 chaotic RMSprop steps at lr 1e-3
  )


def _main(argv):
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    rc = train_lib.main(["train"] + argv)
  return rc, err.getvalue()


def test_cli_main_dpo_tiny(tmp_path):
  out = tmp_path / "cli"
  rows = _rows(8)
  rows[3]["chosen"] = " ".join(WORDS * 2)  # response longer than max_length: cut and counted (documented policy)
  data_path = _write_jsonl(tmp_path / "long.jsonl", rows)
  rc, err = _main(
      [
          f"--config={DPO_TINY}",
          f"--config.output_dir={out}",
          f"--config.data.path={data_path}",
          "--config.data.format=raw",
          "--config.num_steps=2",
          "--config.eval.every=1",
          "--config.checkpoint.every=0",
          "--config.progress=False",
          "--config.optim.lr=1e-7",
          "--config.optim.grad_accum=2",
      ]
  )
  assert rc == 0, err
  rows = metrics_lib.read_metrics(str(out))
  step_rows = [r for r in rows if "loss" in r and r["step"] > 0]
  assert [r["step"] for r in step_rows] == [1, 2]
  assert step_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  start = rows[0]
  assert start["event"] == "start" and start["total_steps"] == 2 and start["reference_from_cache"] is False
  assert start["data/num_pairs"] == 8 and start["data/truncated_pairs"] == 1 and start["data/truncated_chosen"] == 1
  assert start["data/max_total_tokens"] == 64  # dpo_tiny's data.max_length


def test_nonfinite_loss_stops_with_checkpoint(tmp_path, data_path):
  out = tmp_path / "nan"
  rc, err = _main(
      [
          f"--config={DPO_TINY}",
          f"--config.output_dir={out}",
          f"--config.data.path={data_path}",
          "--config.data.format=raw",
          "--config.num_steps=4",
          "--config.optim.name=sgd",
          "--config.optim.lr=1e30",
          "--config.checkpoint.every=0",
          "--config.progress=False",
          "--config.eval.every=0",
      ]
  )
  assert rc == 1
  assert "non-finite loss" in err
  step = int(err.split("non-finite loss")[1].split("at step ")[1].split()[0])
  saved = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
  assert saved == [step - 1]
  assert not math.isfinite(float([r for r in metrics_lib.read_metrics(str(out)) if r["step"] == step][-1]["loss"]))


@pytest.mark.parametrize(
    "row,field",
    [
        ({"prompt": "the cat", "rejected": "a dog"}, "chosen"),
        ({"prompt": "the cat", "chosen": "", "rejected": "a dog"}, "chosen"),
        ({"prompt": "the cat", "chosen": "a mat", "rejected": 7}, "rejected"),
    ],
)
def test_bad_row_names_file_row_field(tmp_path, row, field):
  rows = _rows(4)
  rows.insert(2, row)
  path = _write_jsonl(tmp_path / "bad.jsonl", rows)
  rc, err = _main(
      [
          f"--config={DPO_TINY}",
          f'--config.output_dir={tmp_path / "out"}',
          f"--config.data.path={path}",
          "--config.data.format=raw",
          "--config.progress=False",
      ]
  )
  assert rc == 1
  assert path in err and "row 2" in err and f"field '{field}'" in err, err


def test_prompt_longer_than_max_length_names_row(tmp_path):
  rows = _rows(4)
  rows[1]["prompt"] = " ".join(WORDS * 3)  # > 32 tokens: no room for a response
  path = _write_jsonl(tmp_path / "long_prompt.jsonl", rows)
  rc, err = _main(
      [
          f"--config={DPO_TINY}",
          f'--config.output_dir={tmp_path / "out"}',
          f"--config.data.path={path}",
          "--config.data.format=raw",
          "--config.data.max_length=32",
          "--config.progress=False",
      ]
  )
  assert rc == 1
  assert path in err and "row 1" in err and "field 'prompt'" in err, err


def test_tokenizer_model_vocab_mismatch(tmp_path, data_path):
  from displacement_jax.models import tiny

  n_tok = len(tiny.build_tiny_tokenizer())
  rc, err = _main(
      [
          f"--config={DPO_TINY}",
          f'--config.output_dir={tmp_path / "out"}',
          f"--config.data.path={data_path}",
          "--config.data.format=raw",
          "--config.model.tiny_vocab_size=300",
          "--config.progress=False",
      ]
  )
  assert rc == 1
  assert "vocabulary mismatch" in err and "vocab_size is 300" in err and f"({n_tok} tokens)" in err, err


def test_single_token_monitor(tmp_path):
  """Single-token mode: monitor values equal a direct recomputation from the trained and initial params."""
  from displacement_jax import forward
  from displacement_jax import displacement as monitor

  questions = ["Is it good to lie?", "Would you say the ends justify the means?"]
  rows = [{"prompt": q, "chosen": "Yes", "rejected": "No"} for q in questions]
  path = _write_jsonl(tmp_path / "single.jsonl", rows)
  config = make_config(
      tmp_path / "out",
      path,
      **{
          "data.single_token": True,
          "batch_size": 2,
          "num_steps": 2,
          "eval.every": 2,
          "eval.top_k": 5,
          "checkpoint.every": 0,
      },
  )
  res = training.run(config)
  mon = res.monitor
  loaded = runtime.load_model(config)  # the same initial params (model.seed)
  dataset = runtime.load_data(config, loaded.tokenizer, loaded.model_config.vocab_size)
  batch = {k: jax.numpy.asarray(v) for k, v in runtime.collate(dataset.pairs, dataset.pad_id, config).items()}
  yes, no = (loaded.tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No"))
  # reference: full logits of our Transformer at the last prompt position (not the chunked path)
  logits_fn = jax.jit(
      lambda p: loaded.model.apply(
          {"params": p}, batch["chosen_input_ids_BT"], batch["chosen_attention_mask_BT"]
      ).logits_BTV
  )

  def probs(params):
    pos = np.argmax(np.asarray(batch["chosen_loss_mask_BT"]), axis=-1)
    logits = np.asarray(logits_fn(params), np.float64)[np.arange(len(pos)), pos]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)

  p_ref, p_now = probs(loaded.params), probs(jax.tree.map(jax.numpy.asarray, res.params))
  assert mon["monitor/preferred_prob"] == pytest.approx(p_now[:, yes].mean(), rel=1e-4)
  expected = monitor.top_k_gainers(p_now.mean(0), p_ref.mean(0), 5, exclude=(yes, no))
  assert mon["monitor/top_k_gainers"] == [int(t) for t in expected]
  assert mon["monitor/top_k_gainers_tokens"] == loaded.tokenizer.convert_ids_to_tokens([int(t) for t in expected])
  W_VD = np.asarray(res.params["lm_head"]["kernel"], np.float64).T
  assert mon["monitor/w_pos_norm"] == pytest.approx(np.linalg.norm(W_VD[yes]), rel=1e-5)
  assert mon["monitor/w_pos_dot_w_neg"] == pytest.approx(W_VD[yes] @ W_VD[no], rel=1e-4, abs=1e-6)
  # predicted ranking: the theory's rates on (W, h) of the trained model, h = last prompt hidden state
  nt = jax.jit(lambda p, b: forward.next_token_outputs(loaded.model, p, b))(res.params, batch)
  n = len(questions)
  predicted = monitor.predicted_gainers(
      W_VD, np.asarray(nt["h_BD"]), np.full(n, yes), np.full(n, no), np.asarray(nt["prob_BV"]), 5
  )
  assert mon["monitor/top_k_predicted"] == [int(t) for t in predicted]
  assert yes not in predicted and no not in predicted
  overlap = len(set(predicted.tolist()) & set(mon["monitor/top_k_gainers"])) / 5
  assert mon["monitor/top_k_overlap"] == pytest.approx(overlap)


def test_batch_must_split_over_micro_batches(tmp_path, data_path):
  config = make_config(tmp_path, data_path, **{"batch_size": 6, "optim.grad_accum": 4})
  with pytest.raises(ValueError, match="batch_size=6 must be a .*multiple of .*grad_accum=4"):
    training.run(config)


def test_reference_cache_key_and_counter(tmp_path):
  from displacement_jax.train import reference
  from displacement_jax.data.tokenize import TokenizedPair

  calls = []

  def compute():
    calls.append(1)
    return {"chosen_ref_logps": np.array([-1.5, -2.0], np.float32)}

  pair = lambda i, c: TokenizedPair(np.array([1, 5], np.int32), np.array(c, np.int32), np.array([7, 2], np.int32), i)
  key = reference.cache_key(model={"tiny": "llama", "seed": 0}, data=rundir.hash_pairs([pair(0, [4, 2])]))
  a, hit_a = reference.cached_reference(str(tmp_path), key, compute, log=lambda _: None)
  b, hit_b = reference.cached_reference(str(tmp_path), key, compute, log=lambda _: None)
  assert (hit_a, hit_b, len(calls)) == (False, True, 1)
  np.testing.assert_array_equal(b["chosen_ref_logps"], [-1.5, -2.0])
  # any change of a token id, of the model seed or of the row index gives a new key (recomputed)
  keys = {
      key,
      reference.cache_key(model={"tiny": "llama", "seed": 0}, data=rundir.hash_pairs([pair(0, [4, 3])])),
      reference.cache_key(model={"tiny": "llama", "seed": 1}, data=rundir.hash_pairs([pair(0, [4, 2])])),
      reference.cache_key(model={"tiny": "llama", "seed": 0}, data=rundir.hash_pairs([pair(1, [4, 2])])),
  }
  assert len(keys) == 4
  reference.cached_reference(str(tmp_path), sorted(keys - {key})[0], compute, log=lambda _: None)
  assert len(calls) == 2


def test_pipeline_dispatch_names():
  assert train_lib.resolve_main("demo").__module__ == "displacement_jax.experiments.demo"
  with pytest.raises(ValueError, match="config.main='nope' is not a registered pipeline"):
    train_lib.resolve_main("nope")


def test_model_path_continues_from_export(tmp_path, full_run, data_path):
  """model.path: the exported HF dir (weights + tokenizer) loads back; its step-0 log-probs are the final ones.
  Exporting again writes what the source had: its generation_config.json, its tokenizer files, nothing local."""
  import shutil  # pylint: disable=g-import-not-at-top

  source = str(tmp_path / "source")
  shutil.copytree(full_run.hf_dir, source)
  generation = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "temperature": 0.6, "do_sample": True}
  with open(os.path.join(source, "generation_config.json"), "w") as f:
    json.dump(generation, f)
  config = make_config(
      tmp_path / "run",
      data_path,
      **{
          "model.tiny": "",
          "model.path": source,
          "num_steps": 1,
          "eval.every": 0,
          "checkpoint.every": 0,
          "export_hf": True,
      },
  )
  res = training.run(config)
  step0 = [r for r in metrics_lib.read_metrics(str(tmp_path / "run")) if r["step"] == 0 and "monitor/loss" in r][0]
  for key in ("monitor/preferred_logprob", "monitor/dispreferred_logprob"):
    assert step0[key] == pytest.approx(full_run.monitor[key], abs=1e-4)
  assert res.losses[0] == pytest.approx(math.log(2), abs=1e-6)
  with open(os.path.join(res.hf_dir, "generation_config.json")) as f:
    assert json.load(f) == generation
  src_tok, out_tok = (json.load(open(os.path.join(d, "tokenizer_config.json"))) for d in (source, res.hf_dir))
  assert "local_files_only" not in out_tok and out_tok == src_tok


def test_cli_missing_config_file_is_a_clear_error(capsys):
  from displacement_jax.score import main as score
  from displacement_jax.train import main as train

  assert train.main(["train", "--config=configs/does_not_exist.py"]) == 2
  assert score.main(["score", "--config=configs/does_not_exist.py:tiny"]) == 2
  err = capsys.readouterr().err
  assert err.count("config file 'configs/does_not_exist.py' does not exist") == 2


def test_help_lists_config_fields_and_pipelines(capsys):
  from displacement_jax.score import main as score
  from displacement_jax.train import main as train

  assert train.main(["train", "--help"]) == 0
  out = capsys.readouterr().out
  assert "usage: python -m displacement_jax.train" in out and "--resume" in out
  assert "optim.lr" in out and "1e-7" in out and "peak learning rate" in out  # field, default, doc
  assert "demo -> displacement_jax.experiments.demo" in out and "model.freeze_pad_embedding" in out
  assert score.main(["score", "-h"]) == 0
  out = capsys.readouterr().out
  assert "filter.fraction" in out and "measures.include_eos" in out and "quantile_window" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.optim.lrr=1"], "error: --config.optim.lrr: optim has no field 'lrr'; did you mean 'optim.lr'?"),
        (["--config.optm.lr=1"], "error: --config.optm.lr: the config has no field 'optm'; did you mean 'optim'?"),
    ],
)
def test_unknown_override_is_one_line_with_a_suggestion(capsys, args, message):
  assert train_lib.main(["train", f"--config={DPO_TINY}", *args]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [message]


def test_bad_config_arg_is_one_line(capsys):
  assert train_lib.main(["train", f'--config={os.path.join(ROOT, "configs", "persona.py")}:olmo1b']) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: --config=") and "unknown key 'olmo1b'" in line


def test_every_base_config_field_has_a_help_line():
  from configs import base  # pylint: disable=g-import-not-at-top
  from displacement_jax.config import flags as cli  # pylint: disable=g-import-not-at-top

  def leaves(node, prefix=""):
    for k, v in node.items():
      yield from leaves(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]

  documented = {name for name, _, _ in cli.config_field_docs()}
  assert set(leaves(base.get_base_config())) <= documented, sorted(set(leaves(base.get_base_config())) - documented)
