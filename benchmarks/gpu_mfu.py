r"""Model FLOPs utilisation and peak memory of the DPO train step and of CHES scoring on one accelerator.

Random weights at a named shape (benchmarks/shapes.py), synthetic token batches, bf16 params and compute,
per-layer remat, donated train state. Model FLOPs follow benchmarks/flops.py (PaLM convention: forward +
backward = 3 forward passes, remat not counted); MFU = model FLOPs/s / the device's dense bf16 peak.

  python -m benchmarks.gpu_mfu --task=dpo   --shape=olmo-1b --seq=512 --batch=8
  python -m benchmarks.gpu_mfu --task=score --shape=olmo-1b --seq=512 --batch=32
  python -m benchmarks.gpu_mfu --task=fit   --shape=llama3-8b --seq=512     # largest DPO batch that fits

Runs on CPU too (`--shape=tiny`), which is how the test suite checks this script; MFU is only reported when
the device's peak is known (or given with --peak_tflops).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks import flops as flops_lib
from benchmarks import shapes


def device_peak_tflops(device: Any) -> float | None:
  """Dense bf16 peak of `device` from benchmarks.flops.BF16_PEAK_TFLOPS, matched on its device_kind."""
  kind = getattr(device, "device_kind", "")
  for name, peak in flops_lib.BF16_PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def synthetic_batch(
    batch: int, seq: int, vocab: int, seed: int = 0, prompt: int | None = None
) -> dict[str, np.ndarray]:
  """A collated preference batch (DESIGN.md batch contract): prompt = the first `prompt` tokens (default half;
  the same on both sides), response = the rest of the `seq` tokens of each side."""
  rng = np.random.default_rng(seed)
  out: dict[str, np.ndarray] = {}
  prompt = seq // 2 if prompt is None else int(prompt)
  prompt_ids = rng.integers(3, vocab, size=(batch, prompt), dtype=np.int32)
  for side in ("chosen", "rejected"):
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int32)
    ids[:, :prompt] = prompt_ids
    labels = np.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, prompt - 1 : seq - 1] = True
    out[f"{side}_input_ids_BT"] = ids
    out[f"{side}_attention_mask_BT"] = np.ones((batch, seq), bool)
    out[f"{side}_labels_BT"] = labels
    out[f"{side}_loss_mask_BT"] = loss_mask
    out[f"{side}_ref_logps_B"] = np.full((batch,), -float(seq - prompt) * np.log(vocab), np.float32)
    out[f"{side}_ends_eos_B"] = np.ones((batch,), bool)
  out["index_B"] = np.arange(batch, dtype=np.int32)
  return out


def init_params_on_device(config: Any, seed: int = 0) -> Any:
  """Random params created directly on the default device (no host copy of a large model)."""
  from displacement_jax.models.transformer import init_params  # pylint: disable=g-import-not-at-top

  return jax.jit(lambda key: init_params(config, key))(jax.random.PRNGKey(seed))


def _time(fn, n: int) -> float:
  start = time.perf_counter()
  for _ in range(n):
    fn()
  return (time.perf_counter() - start) / n


def peak_memory_bytes(device: Any) -> int | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def packed_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """`synthetic_batch` in the shared-prompt packed layout: rows of 1.5 seq slots, seq response slots."""
  from displacement_jax.data import packing  # pylint: disable=g-import-not-at-top

  return packing.pack_batch(synthetic_batch(batch, seq, vocab), multiple=1)


def model_flops_of(shape: str, data: dict[str, np.ndarray], seq: int, train: bool) -> float:
  """Model FLOPs of one DPO step (train) or scoring call on `data` (two-side or packed layout).

  Two-side: 2 * batch * seq tokens (LM head on all of them when training). Packed: batch * T slots at context
  T, plus (training) the LM head on the batch * R response slots only. Scoring never runs the LM head.
  """
  from displacement_jax.data import packing  # pylint: disable=g-import-not-at-top

  s = shapes.flops_shape(shape)
  if not packing.is_packed(data):
    tokens = 2 * data["chosen_input_ids_BT"].shape[0] * seq
    per = flops_lib.forward_flops_per_token(seq_len=seq, lm_head=train, **s)
    return (3.0 if train else 1.0) * per * tokens
  b, t = data["packed_input_ids_BT"].shape
  body = flops_lib.forward_flops_per_token(seq_len=t, lm_head=False, **s) * b * t
  if not train:
    return body
  head = 2.0 * s["hidden_size"] * s["vocab_size"] * data["response_slot_BR"].size
  return 3.0 * (body + head)


def bench_dpo(
    shape: str,
    seq: int,
    batch: int,
    steps: int,
    dtype: str,
    remat: bool,
    chunk_size: int,
    attention: str | None = None,
    packing: bool = False,
) -> dict[str, Any]:
  """Seconds per DPO train step (RMSprop, donated state) and its model FLOPs."""
  from displacement_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from displacement_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top

  config = shapes.model_config(shape, dtype=dtype, remat=remat, attention_impl=attention)
  model = Transformer(config)
  params = init_params_on_device(config)
  loss_config = ml_collections.ConfigDict(dict(objective="dpo", beta=0.1, sft_coeff=0.0))
  optimizer = optax.rmsprop(1e-7, decay=0.99, eps=1e-8, eps_in_sqrt=False)
  loss_fn = step_lib.make_loss_fn(model, loss_config, chunk_size)
  step_fn = jax.jit(step_lib.make_train_step(loss_fn, optimizer, 1), donate_argnums=0)
  state = step_lib.TrainState(
      params=params,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.PRNGKey(0)),
  )
  host = (packed_batch if packing else synthetic_batch)(batch, seq, config.vocab_size)
  data = jax.device_put(host)
  box = {"state": state}

  def one():
    box["state"], metrics = step_fn(box["state"], data)
    jax.block_until_ready(metrics["loss"])

  t0 = time.perf_counter()
  one()
  compile_s = time.perf_counter() - t0
  one()
  seconds = _time(one, steps)
  tokens = 2 * batch * seq  # pair tokens (prompt counted on both sides) whatever the layout
  return dict(
      task="dpo",
      shape=shape,
      seq=seq,
      batch=batch,
      dtype=dtype,
      remat=remat,
      seconds=seconds,
      compile_s=compile_s,
      tokens_per_s=tokens / seconds,
      packing=packing,
      model_flops=model_flops_of(shape, host, seq, train=True),
  )


def bench_score(
    shape: str,
    seq: int,
    batch: int,
    steps: int,
    dtype: str,
    remat: bool,
    attention: str | None = None,
    packing: bool = False,
) -> dict[str, Any]:
  """Seconds per CHES scoring batch (final hidden states of both sides + ches_scores) and its model FLOPs."""
  from displacement_jax import ches  # pylint: disable=g-import-not-at-top
  from displacement_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top

  config = shapes.model_config(shape, dtype=dtype, remat=False, attention_impl=attention)
  model = Transformer(config)
  params = init_params_on_device(config)

  @jax.jit
  def score(params, b):
    if packing:
      from displacement_jax.score import core as scoring  # pylint: disable=g-import-not-at-top

      return scoring.score_packed_batch(model, params, b)["ln_ches"]
    hidden = {}
    for side in ("chosen", "rejected"):
      out = model.apply(
          {"params": params},
          b[f"{side}_input_ids_BT"],
          b[f"{side}_attention_mask_BT"],
          return_logits=False,
          return_hidden=True,
      )
      hidden[side] = out.hidden_BTD
    return ches.ches_scores(
        hidden["chosen"],
        hidden["rejected"],
        b["chosen_loss_mask_BT"],
        b["rejected_loss_mask_BT"],
        length_normalized=True,
    )

  host = (packed_batch if packing else synthetic_batch)(batch, seq, config.vocab_size)
  data = jax.device_put(host)
  one = lambda: jax.block_until_ready(score(params, data))
  t0 = time.perf_counter()
  one()
  compile_s = time.perf_counter() - t0
  seconds = _time(one, steps)
  tokens = 2 * batch * seq  # pair tokens (prompt counted on both sides) whatever the layout
  return dict(
      task="score",
      shape=shape,
      seq=seq,
      batch=batch,
      dtype=dtype,
      remat=False,
      seconds=seconds,
      compile_s=compile_s,
      tokens_per_s=tokens / seconds,
      rows_per_s=batch / seconds,
      packing=packing,
      model_flops=model_flops_of(shape, host, seq, train=False),
  )


def largest_fitting_batch(
    shape: str, seq: int, dtype: str, remat: bool, max_batch: int, timeout: int, attention: str | None = None
) -> dict[str, Any]:
  """Largest DPO batch whose train step runs (each trial in a fresh subprocess; doubling, then bisection)."""

  def fits(batch: int) -> bool:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_mfu",
        "--task=dpo",
        f"--shape={shape}",
        f"--seq={seq}",
        f"--batch={batch}",
        "--steps=1",
        f"--dtype={dtype}",
        f"--remat={int(remat)}",
    ]
    if attention:
      cmd.append(f"--attention={attention}")
    try:
      ok = subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
      ok = False
    print(f"  batch {batch}: {'fits' if ok else 'does not fit'}", flush=True)
    return ok

  lo, hi = 0, 1
  while hi <= max_batch and fits(hi):
    lo, hi = hi, hi * 2
  hi = min(hi, max_batch + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return dict(task="fit", shape=shape, seq=seq, dtype=dtype, remat=remat, largest_batch=lo)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--task", choices=("dpo", "score", "fit"), default="dpo")
  p.add_argument("--shape", choices=tuple(shapes.SHAPES), default="olmo-1b")
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", type=int, default=1)
  p.add_argument("--chunk_size", type=int, default=128, help="LM-head chunk (positions) of the log-prob pass")
  p.add_argument("--max_batch", type=int, default=256)
  p.add_argument("--timeout", type=int, default=600)
  p.add_argument("--peak_tflops", type=float, default=None)
  p.add_argument(
      "--attention",
      default=None,
      choices=(None, "xla", "cudnn"),
      help="jax.nn.dot_product_attention implementation (default: JAX chooses)",
  )
  p.add_argument(
      "--packing",
      type=int,
      default=0,
      help="1: shared-prompt packed rows (data/packing.py) instead of two-side batches",
  )
  p.add_argument("--json", default=None, help="also write the result to this file")
  p.add_argument("--append", default=None, help="append a markdown table row to this file (BENCHMARKS.md)")
  a = p.parse_args(argv)
  device = jax.devices()[0]
  if a.task == "fit":
    result = largest_fitting_batch(a.shape, a.seq, a.dtype, bool(a.remat), a.max_batch, a.timeout, a.attention)
  elif a.task == "dpo":
    result = bench_dpo(
        a.shape, a.seq, a.batch, a.steps, a.dtype, bool(a.remat), a.chunk_size, a.attention, bool(a.packing)
    )
  else:
    result = bench_score(a.shape, a.seq, a.batch, a.steps, a.dtype, bool(a.remat), a.attention, bool(a.packing))
  result["device"] = getattr(device, "device_kind", str(device))
  result["attention"] = a.attention
  if a.task != "fit":
    peak = a.peak_tflops or device_peak_tflops(device)
    result["peak_tflops"] = peak
    result["mfu"] = flops_lib.mfu(result["model_flops"], result["seconds"], peak) if peak else None
    result["peak_memory_bytes"] = peak_memory_bytes(device)
  print(json.dumps(result, indent=1))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1)
  if a.append:
    with open(a.append, "a") as f:
      f.write(
          markdown_row(result, "python -m benchmarks.gpu_mfu " + " ".join(argv if argv is not None else sys.argv[1:]))
          + "\n"
      )
  return result


def markdown_row(r: dict[str, Any], command: str) -> str:
  """| date | device | task | shape | seq | batch | tokens/s | MFU | peak memory | command | (see BENCHMARKS.md)."""
  import datetime  # pylint: disable=g-import-not-at-top

  if r["task"] == "fit":
    cells = [r["device"], "largest DPO batch", r["shape"], r["seq"], r["largest_batch"], "", "", ""]
  else:
    mem = r.get("peak_memory_bytes")
    task = r["task"] + (" (packed)" if r.get("packing") else "")
    cells = [
        r["device"],
        task,
        r["shape"],
        r["seq"],
        r["batch"],
        f"{r['tokens_per_s']:.0f}",
        f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
        f"{mem / 2**30:.1f} GiB" if mem else "n/a",
    ]
  return "| " + " | ".join(str(c) for c in [datetime.date.today().isoformat(), *cells, f"`{command.strip()}`"]) + " |"


if __name__ == "__main__":
  main()
