"""Scoring preference pairs by CHES and the baseline measures (the library; the CLI is displacement_jax.score).

For every row, with the exact positions and ids of the authors' code (compute_preference_similarity_per_example.py):
  ches, ln_ches              Definitions 2-3: final-norm hidden states (the LM-head input) summed in float32 over
                             the positions that predict a response token, i.e. the last prompt token .. the last
                             response token (the one that predicts EOS); |y| counts the appended EOS.
  minus_normalized_edit_distance
                             -Levenshtein(ids of y+, ids of y-) / max(|y+|, |y-|) on the response token ids
                             WITHOUT the appended EOS.
  last_hidden_inner_product  <h, h'> of the final-norm hidden states at the LAST RESPONSE TOKEN of (x, y+) and of
                             (x, y-), the positions that predict EOS (EOS itself never enters the input there).
A response cut by truncation has no EOS; then its last kept token is used. `measures_include_eos=True`
(`config.measures.include_eos`) gives the EOS-inclusive variants instead (ids with EOS; hidden state at the
EOS position). Also the response / sequence lengths.

Each pair is one shared-prompt packed row [prompt, chosen, rejected] (data/packing.py: the prompt runs once;
`data.shared_prompt_packing=False` runs the two sides separately, same scores). Rows are sorted by length and
scored in length buckets (each batch padded to its own bucket length, not the
global maximum), with one jitted function sharded over the mesh's batch axes ('data', 'fsdp'); each batch is
padded to a fixed multiple of the device count and the padding rows are dropped.

"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from displacement_jax import ches as ches_lib
from displacement_jax import forward, runtime, sharding
from displacement_jax.data import batching, tokenize
from displacement_jax.data import packing as packing_lib
from displacement_jax.data.layout import bucket_length, fill_rows, pad_id_of, plan_batches, round_up

MEASURES = ("ches", "ln_ches", "minus_normalized_edit_distance", "last_hidden_inner_product")
SIDES = ("chosen", "rejected")
# [B] bool batch keys: drop the appended EOS from the last-hidden measure's positions (see the module docstring).
DROP_EOS = {side: f"{side}_ends_eos_B" for side in SIDES}


def trim_sides(batch: dict[str, np.ndarray], max_length: int, padding_side: str) -> dict[str, np.ndarray]:
  """Cut each side's [B, T] arrays to the bucket of that side's longest row (chosen and rejected differ).

  `collate` pads both sides to one T; the model runs each side separately, so the shorter side need not
  carry the other side's padding.
  """
  out = dict(batch)
  for side in SIDES:
    t = batch[f"{side}_attention_mask_BT"].shape[1]
    longest = int(np.asarray(batch[f"{side}_attention_mask_BT"]).sum(axis=1).max())
    keep = min(bucket_length(longest, max_length), t)
    cols = slice(0, keep) if padding_side == "right" else slice(t - keep, t)
    for key in batch:
      if key.startswith(f"{side}_") and key.endswith("_BT"):
        out[key] = batch[key][:, cols]
  return out


# ------------------------------------------------------------------------------------------------ core


def score_batch(model: Any, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-row [B] float32 CHES, LN-CHES, last-hidden inner product and mask counts of a collated batch
  (two-side, or shared-prompt packed: then `score_packed_batch`)."""
  if packing_lib.is_packed(batch):
    return score_packed_batch(model, params, batch)

  h_pos_BTD, h_neg_BTD = (
      forward.forward_hidden(model, params, batch[f"{side}_input_ids_BT"], batch[f"{side}_attention_mask_BT"])
      for side in SIDES
  )
  comps = ches_lib.ches_components(h_pos_BTD, h_neg_BTD, batch["chosen_loss_mask_BT"], batch["rejected_loss_mask_BT"])
  lhip_B = ches_lib.last_hidden_inner_product(
      h_pos_BTD,
      h_neg_BTD,
      ches_lib.without_last_position(batch["chosen_attention_mask_BT"], batch[DROP_EOS["chosen"]]),
      ches_lib.without_last_position(batch["rejected_attention_mask_BT"], batch[DROP_EOS["rejected"]]),
  )
  return {
      "ches": comps["ches"],
      "ln_ches": comps["ln_ches"],
      "last_hidden_inner_product": lhip_B,
      "chosen_len": comps["chosen_len"],
      "rejected_len": comps["rejected_len"],
  }


def score_packed_batch(model: Any, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`score_batch` of a shared-prompt packed batch (data/packing.py): one forward per pair, prompt once."""
  hidden_BTD = forward.packed_forward_hidden(model, params, batch)
  h_BRD = forward.response_hidden(hidden_BTD, batch)
  side_BR, branch_BT = batch["response_side_BR"], batch["packed_branch_BT"]
  chosen, rejected, prompt = packing_lib.CHOSEN, packing_lib.REJECTED, packing_lib.PROMPT
  comps = ches_lib.ches_components(h_BRD, h_BRD, side_BR == chosen, side_BR == rejected)
  lhip_B = ches_lib.last_hidden_inner_product(
      hidden_BTD,
      hidden_BTD,
      ches_lib.without_last_position((branch_BT == prompt) | (branch_BT == chosen), batch[DROP_EOS["chosen"]]),
      ches_lib.without_last_position((branch_BT == prompt) | (branch_BT == rejected), batch[DROP_EOS["rejected"]]),
  )
  return {
      "ches": comps["ches"],
      "ln_ches": comps["ln_ches"],
      "last_hidden_inner_product": lhip_B,
      "chosen_len": comps["chosen_len"],
      "rejected_len": comps["rejected_len"],
  }


def make_score_fn(model: Any) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """score_fn(params, batch) -> per-row [B] float32 CHES, LN-CHES, last-hidden inner product, mask counts."""
  return functools.partial(score_batch, model)


def sharded_score_fn(
    model: Any, param_sh: Any, mesh: Any
) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
  """`make_score_fn(model)` jitted on `mesh`: params by `param_sh`, batch rows over ('data', 'fsdp'), outputs
  replicated (what `score_pairs` runs, and what benchmarks/memory_plan.py compiles)."""
  return jax.jit(
      make_score_fn(model),
      in_shardings=(param_sh, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
  )


# The model (a hashable flax module) is a static argument, so repeated scoring calls with the same model reuse
# the compiled executables (one per bucket length) instead of recompiling.
_score_batch_jit = jax.jit(score_batch, static_argnums=0)


def measure_ids(pair: Any, side: str, include_eos: bool = False) -> np.ndarray:
  """The response ids the edit distance compares: without the appended EOS (the authors' ids) unless
  `include_eos`."""
  ids = np.asarray(getattr(pair, f"{side}_ids"))
  return ids[:-1] if not include_eos and batching.ends_with_eos(pair, side) else ids


def tokenize_examples(
    examples: Sequence[Any],
    tokenizer: Any,
    *,
    max_length: int,
    format: str,
    single_token: bool = False,
    truncation: str = "truncate_response",
    tokenization: str = "separate",
) -> list[Any]:
  """data.tokenize.TokenizedPair per example (bad rows raise DataError naming file/row/field; a too-long pair
  follows `truncation`, as in training)."""
  return [
      tokenize.tokenize_example(
          tokenizer,
          ex,
          max_length=max_length,
          format=format,
          single_token=single_token,
          truncation=truncation,
          tokenization=tokenization,
      )
      for ex in examples
  ]


def score_examples(
    model: Any,
    params: Any,
    config: ml_collections.ConfigDict,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    batch_size: int,
    max_length: int | None = None,
    format: str | None = None,
    mesh: Any = None,
    bucketed: bool = True,
    packing: bool | None = None,
    progress: bool | None = None,
    measures_include_eos: bool | None = None,
    done: Mapping[int, dict[str, Any]] | None = None,
    on_batch: Callable[[list[tuple[int, dict[str, Any]]]], None] | None = None,
) -> list[dict[str, Any]]:
  """Score every example; returns one dict per example, in the order of `examples`.

  Keys: index (the example's dataset index), ches, ln_ches, minus_normalized_edit_distance,
  last_hidden_inner_product, chosen_len / rejected_len (response tokens incl. EOS), chosen_total_len /
  rejected_total_len (prompt + response), chosen_truncated / rejected_truncated. `config` supplies
  data.single_token, data.truncation, data.tokenization, data.padding_side and (unless given)
  data.max_length, data.format, progress, data.shared_prompt_packing and measures.include_eos.
  With `mesh`, batches are sharded over ('data', 'fsdp') and params by `sharding.param_shardings`.
  `done` / `on_batch`: resuming a long run, see `score_pairs`.
  """
  if not examples:
    raise ValueError("score_examples: no examples to score")
  data_cfg = config.get("data", ml_collections.ConfigDict())
  single = bool(data_cfg.get("single_token", False))
  max_length = int(data_cfg.max_length if max_length is None else max_length)
  format = data_cfg.format if format is None else format
  progress = bool(config.get("progress", True) if progress is None else progress)
  pairs = tokenize_examples(
      examples,
      tokenizer,
      max_length=max_length,
      format=format,
      single_token=single,
      truncation=data_cfg.get("truncation", "truncate_response"),
      tokenization=data_cfg.get("tokenization", "separate"),
  )
  pad_id = pad_id_of(tokenizer)
  with_index = lambda p, r: dict(r, index=int(getattr(examples[p], "index", r["index"])))  # the dataset's index
  results = score_pairs(
      model,
      params,
      pairs,
      batch_size=batch_size,
      max_length=max_length,
      pad_id=pad_id,
      padding_side=data_cfg.get("padding_side", "right"),
      mesh=mesh,
      bucketed=bucketed,
      packing=bool(data_cfg.get("shared_prompt_packing", True)) if packing is None else packing,
      progress=progress,
      measures_include_eos=(
          bool(config.get("measures", {}).get("include_eos", False))
          if measures_include_eos is None
          else measures_include_eos
      ),
      done=done,
      on_batch=None if on_batch is None else (lambda batch: on_batch([(p, with_index(p, r)) for p, r in batch])),
  )
  for result, example in zip(results, examples):
    result["index"] = int(getattr(example, "index", result["index"]))
  return results


def score_pairs(
    model: Any,
    params: Any,
    pairs: Sequence[Any],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int = 0,
    padding_side: str = "right",
    mesh: Any = None,
    bucketed: bool = True,
    packing: bool = True,
    progress: bool = True,
    measures_include_eos: bool = False,
    done: Mapping[int, dict[str, Any]] | None = None,
    on_batch: Callable[[list[tuple[int, dict[str, Any]]]], None] | None = None,
) -> list[dict[str, Any]]:
  """Score already tokenized pairs (`data.tokenize.TokenizedPair`); one dict per pair, in input order.

  The work of `score_examples` after tokenization: length buckets, one jitted call per batch, sharded over
  the mesh's batch axes when `mesh` is given. `index` is the pair's own `index`. packing: one shared-prompt
  packed row per pair (data/packing.py; the prompt is run once), else the two sides separately.
  measures_include_eos: the EOS-inclusive edit distance / last-hidden variants (module docstring).
  done: {position: result} of pairs scored by an earlier, interrupted run; batches of the (deterministic) plan
  whose rows are all done are skipped and their results reused. on_batch([(position, result), ...]) is called
  after every scored batch (the score CLI appends them to its progress file).
  """
  if not pairs:
    raise ValueError("score_pairs: no pairs to score")
  fn, params, put, dp = placed_score_fn(model, params, mesh)
  rows_per_batch = round_up(batch_size, dp)  # fixed batch dim: one compile per bucket length

  # Sort and bucket by the row length the model runs: the packed row p + c + r, or the longer side.
  length_of = batching.packed_length if packing else batching.pair_length
  cap = 2 * int(max_length) if packing else int(max_length)
  plan = plan_batches([length_of(p) for p in pairs], rows_per_batch, cap, bucketed=bucketed)
  build = batch_builder(
      pairs, rows_per_batch, cap, int(max_length), pad_id, padding_side, bucketed, packing, measures_include_eos
  )

  done = {int(p): r for p, r in (done or {}).items()}
  results: list[dict[str, Any] | None] = [done.get(i) for i in range(len(pairs))]
  plan = [(rows, pad_to) for rows, pad_to in plan if not all(int(r) in done for r in rows)]
  for rows, batch, out in runtime.batched_pass(fn, params, plan, build, put, desc="score", progress=progress):
    for j, row in enumerate(rows):  # rows past len(rows) are padding and are dropped here
      results[row] = result_row(pairs[row], int(row), batch, out, j, measures_include_eos)
    if on_batch is not None:
      on_batch([(int(row), results[row]) for row in rows])
  return results  # type: ignore[return-value]


def placed_score_fn(model: Any, params: Any, mesh: Any) -> tuple[Callable, Any, Callable, int]:
  """(fn, params, put, data-parallel size): the scoring function jitted with the mesh's shardings and the params
  placed on it (a plain jit without a mesh), and how a host batch goes to the device(s)."""
  if mesh is None:
    return functools.partial(_score_batch_jit, model), params, lambda b: {k: jnp.asarray(v) for k, v in b.items()}, 1
  param_sh = sharding.param_shardings(params, mesh)
  fn = sharded_score_fn(model, param_sh, mesh)
  put = lambda b: sharding.global_batch_to_devices(b, mesh)
  return fn, jax.device_put(params, param_sh), put, sharding.data_parallel_size(mesh)


def batch_builder(
    pairs: Sequence[Any],
    rows_per_batch: int,
    cap: int,
    max_length: int,
    pad_id: int,
    padding_side: str,
    bucketed: bool,
    packing: bool,
    measures_include_eos: bool,
) -> Callable[[np.ndarray, int], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
  """`build(rows, pad_to) -> (host batch, device batch)` of `score_pairs`: the rows filled to `rows_per_batch`,
  collated, then packed (one shared-prompt row per pair) or trimmed to their bucket."""

  def build(rows: np.ndarray, pad_to: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    batch_pairs = [pairs[i] for i in fill_rows(rows, rows_per_batch)]
    if packing:
      batch = batching.collate(batch_pairs, pad_id=pad_id, padding_side=padding_side)
      size = (lambda n: bucket_length(n, cap)) if bucketed else (lambda n: cap)
      device = {
          k: v
          for k, v in packing_lib.pack_batch(batch, pad_id=pad_id, bucket=size).items()
          if k in packing_lib.PACKED_KEYS
      }
    else:
      batch = batching.collate(batch_pairs, pad_id=pad_id, padding_side=padding_side, pad_to=pad_to)
      if bucketed:
        batch = trim_sides(batch, max_length, padding_side)
      device = {k: v for k, v in batch.items() if k.endswith("_BT")}
    for key in DROP_EOS.values():
      device[key] = batch[key] & (not measures_include_eos)
    return batch, device

  return build


def result_row(
    pair: Any, row: int, batch: Mapping[str, Any], out: Mapping[str, Any], j: int, measures_include_eos: bool
) -> dict[str, Any]:
  """The result of `pair` (position `row`) from row `j` of a scored batch and its outputs."""
  ids_pos = measure_ids(pair, "chosen", measures_include_eos)
  ids_neg = measure_ids(pair, "rejected", measures_include_eos)
  return {
      "index": int(getattr(pair, "index", row)),
      "ches": float(out["ches"][j]),
      "ln_ches": float(out["ln_ches"][j]),
      "minus_normalized_edit_distance": float(ches_lib.minus_normalized_edit_distance(ids_pos, ids_neg)),
      "last_hidden_inner_product": float(out["last_hidden_inner_product"][j]),
      "chosen_len": int(out["chosen_len"][j]),
      "rejected_len": int(out["rejected_len"][j]),
      "chosen_total_len": int(np.asarray(batch["chosen_attention_mask_BT"][j]).sum()),
      "rejected_total_len": int(np.asarray(batch["rejected_attention_mask_BT"][j]).sum()),
      "chosen_truncated": bool(getattr(pair, "chosen_cut", False)),
      "rejected_truncated": bool(getattr(pair, "rejected_cut", False)),
  }
