r"""displacement_jax vs the PyTorch way, same weights, same rows, same CPU, one process.

1. CHES scoring: `displacement_jax.score` (length buckets, batched, jitted, no LM head, shared-prompt packed
   rows) vs the official research code's way (HF transformers model, one row and one sequence at a time,
   output_hidden_states).
2. DPO train step: our jitted step (shared-prompt packed rows, LM head on response positions only, chunked
   log-softmax, donated state) vs a TRL-style step (chosen and rejected concatenated, padded to the longest,
   full-vocabulary log-softmax), same batch, same optimizer (torch-default RMSprop).

Each of ours also runs with two-side batches (`data.shared_prompt_packing=False`), reported as an ablation row.

  python -m benchmarks.cpu_vs_torch --shape=cpu --rows=64 --steps=5

Prints a table; `--append=BENCHMARKS.md` appends it with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from benchmarks import flops, shapes, tables
from benchmarks import torch_reference

Row = tuple[list[int], list[int], list[int]]


def random_rows(
    n: int, vocab: int, *, prompt_len: tuple[int, int], response_len: tuple[int, int], seed: int = 0
) -> list[Row]:
  """n (prompt, chosen, rejected) token-id rows with uniformly random lengths; responses end with EOS (2)."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    p = rng.integers(3, vocab, size=rng.integers(*prompt_len, endpoint=True)).tolist()
    sides = []
    for _ in range(2):
      r = rng.integers(3, vocab, size=rng.integers(*response_len, endpoint=True)).tolist()
      sides.append(r[:-1] + [2])
    rows.append((p, sides[0], sides[1]))
  return rows


def build_models(shape: str, seed: int = 0):
  """(torch HF model, our Transformer, our params, our config) with the same random fp32 weights."""
  import transformers  # pylint: disable=g-import-not-at-top

  from displacement_jax.models import convert  # pylint: disable=g-import-not-at-top
  from displacement_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from displacement_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  hf_config = shapes.hf_config(shape)
  tmodel = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
  config = ModelConfig.from_hf(hf_config.to_dict(), dtype="float32", param_dtype="float32")
  state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  params = jax.tree.map(jnp.asarray, convert.state_dict_to_params(state, config))
  return tmodel, Transformer(config), params, config


def pair_batch(rows: Sequence[Row], pad_id: int = 0) -> dict[str, np.ndarray]:
  """Right-padded collated batch (DESIGN.md batch contract); each side padded to its own longest row."""
  out: dict[str, np.ndarray] = {}
  for s, side in enumerate(("chosen", "rejected")):
    seqs = [list(r[0]) + list(r[1 + s]) for r in rows]
    t = max(len(q) for q in seqs)
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), bool)
    labels = np.zeros((len(rows), t), np.int32)
    loss = np.zeros((len(rows), t), bool)
    for i, (row, q) in enumerate(zip(rows, seqs)):
      p = len(row[0])
      ids[i, : len(q)] = q
      mask[i, : len(q)] = True
      labels[i, : len(q) - 1] = q[1:]
      loss[i, p - 1 : len(q) - 1] = True
    out.update(
        {
            f"{side}_input_ids_BT": ids,
            f"{side}_attention_mask_BT": mask,
            f"{side}_labels_BT": labels,
            f"{side}_loss_mask_BT": loss,
        }
    )
  return out


def score_ours(
    model, params, rows: Sequence[Row], batch_size: int, max_length: int, packing: bool = True
) -> tuple[np.ndarray, float, float]:
  """(CHES per row, first-call seconds incl. JIT compile, steady seconds) via displacement_jax.score."""
  from displacement_jax.score import core as scoring  # pylint: disable=g-import-not-at-top
  from displacement_jax.data.tokenize import TokenizedPair  # pylint: disable=g-import-not-at-top

  pairs = [
      TokenizedPair(np.asarray(p, np.int32), np.asarray(c, np.int32), np.asarray(r, np.int32), i)
      for i, (p, c, r) in enumerate(rows)
  ]
  run = lambda: scoring.score_pairs(
      model, params, pairs, batch_size=batch_size, max_length=max_length, packing=packing, progress=False
  )
  t0 = time.perf_counter()
  first = run()
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  result = run()
  steady_s = time.perf_counter() - t0
  ches = np.asarray([r["ches"] for r in result])
  np.testing.assert_allclose([r["ches"] for r in first], ches, rtol=1e-6)
  return ches, first_s, steady_s


def score_torch(tmodel, rows: Sequence[Row]) -> tuple[np.ndarray, float]:
  t0 = time.perf_counter()
  ches = torch_reference.score_rows_official_way(tmodel, rows)
  return ches, time.perf_counter() - t0


def train_layout(rows: Sequence[Row], pairs_per_row: int) -> dict[str, np.ndarray]:
  """The batch `train.loop.run` steps on: packed rows of up to `pairs_per_row` pairs (data.pairs_per_row), lengths
  bucketed like the training iterator's; pairs_per_row=0: the two-side collated batch (no packing)."""
  from displacement_jax.data import batching, packing  # pylint: disable=g-import-not-at-top

  batch = pair_batch(rows)
  if not pairs_per_row:
    return batch
  return packing.pack_pairs(batch, pairs_per_row=pairs_per_row, bucket=batching.packed_bucket)


def trl_step_flops(shape: str, rows: Sequence[Row]) -> float:
  """Hardware FLOPs of the TRL-style step: 2P sequences padded to the longest, the LM head at every slot, each
  query scored against every key slot (a padding mask makes SDPA run the full square)."""
  n, t = torch_reference.build_trl_batch(rows, pad_id=0)["input_ids"].shape
  return flops.step_flops(slots=n * t, head_positions=n * t, attention_pairs=n * t * t, **shapes.flops_shape(shape))


def our_step_flops(shape: str, batch: dict[str, np.ndarray], chunk_size: int = 128) -> float:
  """Hardware FLOPs of our packed step on `batch` as it runs: every packed slot, the causal query blocks against
  the keys up to each block's end, the LM head on the live chunks only (logprobs.chunked_token_logprobs), and the
  backward pass's recomputation of the head's logits and of the attention scores."""
  from displacement_jax.models import transformer  # pylint: disable=g-import-not-at-top

  b, t = batch["packed_input_ids_BT"].shape
  block = transformer.query_block(t)
  pairs = b * sum((min(s + block, t) - s) * min(s + block, t) for s in range(0, t, block))
  rb, r = batch["response_side_BR"].shape
  chunk = min(chunk_size * rb, rb * r)
  head = -(-int((batch["response_side_BR"] > 0).sum()) // chunk) * chunk
  return flops.step_flops(
      slots=b * t,
      head_positions=head,
      attention_pairs=pairs,
      head_recomputed=True,
      scores_recomputed=True,
      **shapes.flops_shape(shape),
  )


def dpo_ours(
    model, params, rows: Sequence[Row], steps: int, lr: float, pairs_per_row: int = 2
) -> tuple[float, float, np.ndarray]:
  """(first-step seconds incl. compile, steady seconds per step, log-probs after `steps` steps) on
  `train_layout(rows, pairs_per_row)`."""
  from displacement_jax import forward  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import optim  # pylint: disable=g-import-not-at-top
  from displacement_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  batch = train_layout(rows, pairs_per_row)
  ref = forward.pair_logps(model, params, batch, chunk_size=128)
  jbatch = jax.device_put(
      dict(batch, chosen_ref_logps_B=ref["chosen_logps_B"], rejected_ref_logps_B=ref["rejected_logps_B"])
  )
  loss_cfg = ml_collections.ConfigDict(dict(objective="dpo", beta=0.1, sft_coeff=0.0, label_smoothing=0.0))
  optimizer = optim.make_optimizer(ml_collections.ConfigDict(dict(name="rmsprop", lr=lr)), steps)
  step = jax.jit(step_lib.make_train_step(step_lib.make_loss_fn(model, loss_cfg, 128), optimizer, 1), donate_argnums=0)
  state = step_lib.TrainState(
      params=jax.tree.map(jnp.copy, params),
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.key_data(jax.random.key(0)),
  )
  t0 = time.perf_counter()
  state, metrics = step(state, jbatch)
  jax.block_until_ready(metrics["loss"])
  first_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps - 1):
    state, metrics = step(state, jbatch)
  jax.block_until_ready(metrics["loss"])
  steady_s = (time.perf_counter() - t0) / max(steps - 1, 1)
  after = forward.pair_logps(model, state.params, batch, chunk_size=128)
  return first_s, steady_s, np.asarray(after["chosen_logps_B"])


def dpo_torch(tmodel, rows: Sequence[Row], steps: int, lr: float) -> tuple[float, np.ndarray]:
  """(seconds per TRL-style step, chosen log-probs after `steps` steps)."""
  batch = torch_reference.build_trl_batch(rows, pad_id=0)
  with torch.no_grad():
    ref = torch_reference.concatenated_logps(tmodel, batch)
  tmodel.train()
  opt = torch.optim.RMSprop(tmodel.parameters(), lr=lr)
  torch_reference.trl_dpo_step(tmodel, opt, batch, ref)  # warm-up (allocator), counted as step 1
  t0 = time.perf_counter()
  for _ in range(steps - 1):
    torch_reference.trl_dpo_step(tmodel, opt, batch, ref)
  seconds = (time.perf_counter() - t0) / max(steps - 1, 1)
  tmodel.eval()
  with torch.no_grad():
    after = torch_reference.concatenated_logps(tmodel, batch)
  return seconds, after[: len(rows)].numpy()


def machine() -> str:
  return (
      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
  )


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", choices=tuple(shapes.SHAPES), default="cpu")
  p.add_argument("--rows", type=int, default=64, help="rows scored")
  p.add_argument("--batch_size", type=int, default=16, help="scoring batch size (ours)")
  p.add_argument("--prompt_len", type=int, nargs=2, default=(16, 96))
  p.add_argument("--response_len", type=int, nargs=2, default=(8, 192))
  p.add_argument("--dpo_rows", type=int, default=8, help="rows in the DPO batch")
  p.add_argument("--pairs_per_row", type=int, default=2, help="data.pairs_per_row of our DPO step")
  p.add_argument("--steps", type=int, default=5, help="DPO steps timed (after the first)")
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--append", default=None, help="append the table to this markdown file")
  a = p.parse_args(argv)

  tmodel, model, params, config = build_models(a.shape)
  rows = random_rows(a.rows, config.vocab_size, prompt_len=tuple(a.prompt_len), response_len=tuple(a.response_len))
  tokens = sum(len(r[0]) * 2 + len(r[1]) + len(r[2]) for r in rows)

  ches_t, torch_s = score_torch(tmodel, rows)
  max_length = max(len(r[0]) + max(len(r[1]), len(r[2])) for r in rows)
  ches_j, first_s, steady_s = score_ours(model, params, rows, a.batch_size, max_length)
  rel = float(np.max(np.abs(ches_j - ches_t) / np.maximum(np.abs(ches_t), 1e-6)))
  ches_2, _, steady2_s = score_ours(model, params, rows, a.batch_size, max_length, packing=False)
  rel2 = float(np.max(np.abs(ches_2 - ches_t) / np.maximum(np.abs(ches_t), 1e-6)))

  dpo = rows[: a.dpo_rows]
  dpo_tokens = sum(len(r[0]) * 2 + len(r[1]) + len(r[2]) for r in dpo)
  torch_step_s, logps_t = dpo_torch(tmodel, dpo, a.steps + 1, a.lr)
  jax_first_s, jax_step_s, logps_j = dpo_ours(model, params, dpo, a.steps + 1, a.lr, a.pairs_per_row)
  dpo_diff = float(np.max(np.abs(logps_j - logps_t)))
  _, jax1_step_s, logps_1 = dpo_ours(model, params, dpo, a.steps + 1, a.lr, pairs_per_row=1)
  dpo_diff1 = float(np.max(np.abs(logps_1 - logps_t)))
  _, jax2_step_s, logps_2 = dpo_ours(model, params, dpo, a.steps + 1, a.lr, pairs_per_row=0)
  dpo_diff2 = float(np.max(np.abs(logps_2 - logps_t)))
  trl_flops = trl_step_flops(a.shape, dpo)
  our_flops = our_step_flops(a.shape, train_layout(dpo, a.pairs_per_row)) if a.pairs_per_row else float("nan")

  today = datetime.date.today().isoformat()
  cmd = "python -m benchmarks.cpu_vs_torch " + " ".join(argv if argv is not None else sys.argv[1:])
  lines = [
      f"### CPU: displacement_jax vs PyTorch ({today})",
      "",
      f"Command: `{cmd.strip()}`  ",
      f"Machine: {machine()}; jax {jax.__version__}, torch {torch.__version__}; shape `{a.shape}` "
      f"(d={config.hidden_size}, layers={config.num_layers}, V={config.vocab_size}), fp32.",
      "",
      "| benchmark | PyTorch way | displacement_jax | ratio (ours / torch) | check |",
      "|---|---|---|---|---|",
      f"| CHES scoring, {a.rows} rows, {tokens} tokens (steady) | {a.rows / torch_s:.2f} rows/s, "
      f"{tokens / torch_s:.0f} tok/s | {a.rows / steady_s:.2f} rows/s, {tokens / steady_s:.0f} tok/s | "
      f"**{torch_s / steady_s:.2f}x** | max rel. CHES diff {rel:.1e} |",
      f"| ablation: CHES scoring, two-side batches (no packing) | | {a.rows / steady2_s:.2f} rows/s, "
      f"{tokens / steady2_s:.0f} tok/s | {torch_s / steady2_s:.2f}x | max rel. CHES diff {rel2:.1e} |",
      f"| CHES scoring incl. JIT compile (first call) | {a.rows / torch_s:.2f} rows/s | {a.rows / first_s:.2f} rows/s "
      f"| {torch_s / first_s:.2f}x | |",
      f"| DPO step, {a.dpo_rows} pairs ({a.pairs_per_row} per packed row), {dpo_tokens} tokens, RMSprop | "
      f"{1 / torch_step_s:.2f} steps/s "
      f"({dpo_tokens / torch_step_s:.0f} tok/s) | {1 / jax_step_s:.2f} steps/s ({dpo_tokens / jax_step_s:.0f} tok/s) | "
      f"**{torch_step_s / jax_step_s:.2f}x** | max abs. log-prob diff after {a.steps + 1} steps {dpo_diff:.1e} |",
      f"| ablation: DPO step, one pair per packed row | | {1 / jax1_step_s:.2f} steps/s "
      f"({dpo_tokens / jax1_step_s:.0f} tok/s) | {torch_step_s / jax1_step_s:.2f}x | max abs. log-prob diff "
      f"{dpo_diff1:.1e} |",
      f"| ablation: DPO step, two-side batches (no packing) | | {1 / jax2_step_s:.2f} steps/s "
      f"({dpo_tokens / jax2_step_s:.0f} tok/s) | {torch_step_s / jax2_step_s:.2f}x | max abs. log-prob diff "
      f"{dpo_diff2:.1e} |",
      f"| DPO first step incl. JIT compile | | {jax_first_s:.2f} s | | |",
      f"| DPO step hardware FLOPs as laid out (`flops.step_flops`) | {trl_flops / 1e9:.0f} GFLOP, "
      f"{trl_flops / torch_step_s / 1e9:.0f} GFLOP/s | {our_flops / 1e9:.0f} GFLOP, {our_flops / jax_step_s / 1e9:.0f} "
      f"GFLOP/s | {trl_flops / our_flops:.2f}x at equal FLOP/s | |",
      "",
  ]
  table = tables.emit(lines, a.append)
  return dict(
      table=table,
      score_ratio=torch_s / steady_s,
      dpo_ratio=torch_step_s / jax_step_s,
      ches_max_rel_diff=rel,
      dpo_logp_max_abs_diff=dpo_diff,
      ches_ours=ches_j,
      ches_torch=ches_t,
      ches_two_side=ches_2,
      dpo_two_side_logp_max_abs_diff=dpo_diff2,
      dpo_ratio_one_pair_per_row=torch_step_s / jax1_step_s,
      score_ratio_two_side=torch_s / steady2_s,
      dpo_ratio_two_side=torch_step_s / jax2_step_s,
      dpo_flops_ratio=trl_flops / our_flops,
  )


if __name__ == "__main__":
  main()
