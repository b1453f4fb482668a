"""Shared-prompt packing: one row [prompt, chosen, rejected] per pair instead of two padded sides.

The two sequences of a preference pair share their prompt. Packed, the prompt is computed once: chosen tokens
attend to the prompt and to the chosen tokens before them, rejected tokens to the prompt and to the rejected
tokens before them (never to a chosen token), and the rejected tokens take positions p, p+1, ... as if they
followed the prompt directly. Under causal attention every token then has exactly the hidden state it has in
its own unpacked sequence, so log-probs, their gradients and CHES equal the unpacked batch's, for p + c + r
tokens per pair instead of 2p + c + r (and one padded row instead of two).

Only the response positions reach the LM head: `response_slot_BR` lists, per row, the packed slots whose
hidden state predicts a response token (the last prompt slot predicts the first token of both responses).

Several pairs may share one row (`plan_rows`, `pairs_per_row`): each keeps its own segment of the row, attends
only within it, and takes positions from 0 again, so a row of k pairs costs their summed length instead of k rows
padded to the longest pair (training batches are not sorted by length; this removes most of their padding).

Keys of a packed batch (B rows, T packed slots, R response slots, P pairs):
  packed_input_ids_BT int32, packed_positions_BT int32,
  packed_branch_BT int32: -1 padding, 0 prompt, 1 chosen response, 2 rejected response,
  packed_segment_BT int32: the pair's segment of its row (0, 1, ...; -1 padding),
  response_slot_BR int32, response_label_BR int32 (the token predicted), response_side_BR int32 (0 padding,
  1 chosen, 2 rejected), response_pair_BR int32 (the [P] position of the slot's pair in the jitted batch, -1
  padding: per-pair sums are segment sums over it),
plus every [P] array of the collated batch (index_B, reference log-probs, ...) unchanged. With one pair per row
(`pack_batch`) B = P and row b holds pair b; filler pairs (no loss positions) are all padding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from displacement_jax.data.layout import round_up

PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2
PACKED_KEYS = (
    "packed_input_ids_BT",
    "packed_positions_BT",
    "packed_branch_BT",
    "packed_segment_BT",
    "response_slot_BR",
    "response_label_BR",
    "response_side_BR",
    "response_pair_BR",
)


def is_packed(batch) -> bool:
  """Whether `batch` is in the packed layout (this module) rather than the two-side collated one."""
  return "packed_input_ids_BT" in batch


def _row_parts(batch: dict[str, np.ndarray], b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(prompt, chosen, rejected) token ids of collated row b (any padding side); None for a filler row."""
  parts = []
  for side in ("chosen", "rejected"):
    valid = np.asarray(batch[f"{side}_attention_mask_BT"][b], bool)
    seq = np.asarray(batch[f"{side}_input_ids_BT"][b])[valid]
    loss = np.asarray(batch[f"{side}_loss_mask_BT"][b], bool)[valid]
    if not loss.any():
      return None
    p = int(np.argmax(loss)) + 1
    parts.append((seq[:p], seq[p : p + int(loss.sum())]))
  (prompt, chosen), (prompt_r, rejected) = parts
  if len(prompt) != len(prompt_r) or not np.array_equal(prompt, prompt_r):
    index = int(batch["index_B"][b]) if "index_B" in batch else b
    raise ValueError(
        f"pack_batch: row {b} (pair index {index}) has different prompts on its chosen and rejected "
        "sides; shared-prompt packing needs the same prompt on both"
    )
  return prompt, chosen, rejected


def _longest(rows: list) -> tuple[int, int]:
  """(longest p + c + r, longest c + r) over `_row_parts` results (1, 1 when all are filler rows)."""
  real = [r for r in rows if r is not None]
  return (max([len(p) + len(c) + len(r) for p, c, r in real] or [1]), max([len(c) + len(r) for _, c, r in real] or [1]))


def packed_lengths(batch: dict[str, np.ndarray]) -> tuple[int, int]:
  """(longest packed row p + c + r, longest response-slot count c + r) of a collated batch."""
  return _longest([_row_parts(batch, b) for b in range(next(iter(batch.values())).shape[0])])


def pack_batch(
    batch: dict[str, np.ndarray],
    *,
    pad_to: int | None = None,
    response_pad_to: int | None = None,
    pad_id: int = 0,
    multiple: int = 8,
    bucket: Callable[[int], int] | None = None,
) -> dict[str, np.ndarray]:
  """The packed layout (module docstring) of a collated batch (data.batching.collate, either padding side), one
  pair per row.

  pad_to / response_pad_to: T and R (default: the longest row, through `bucket` if given, else rounded up to
  `multiple`); a row that does not fit raises ValueError.
  """
  n = next(iter(batch.values())).shape[0]
  parts = [_row_parts(batch, b) for b in range(n)]
  need_t, need_r = _longest(parts)
  size = bucket or (lambda k: max(round_up(k, multiple), multiple))
  t = int(pad_to) if pad_to is not None else size(need_t)
  rr = int(response_pad_to) if response_pad_to is not None else size(need_r)
  if need_t > t or need_r > rr:
    raise ValueError(
        f"pack_batch: the longest pair needs {need_t} packed slots and {need_r} response slots, "
        f"more than pad_to={t} / response_pad_to={rr}"
    )
  return _fill(batch, parts, [[b] for b in range(n)], t, rr, pad_id, list(range(n)))


def _fill(
    batch: dict[str, np.ndarray],
    parts: list,
    rows: list[list[int]],
    t: int,
    rr: int,
    pad_id: int,
    pair_index: list[int],
) -> dict[str, np.ndarray]:
  """Packed arrays of `rows` (each a list of pair positions in `batch`; `pair_index[i]` is pair i's position in
  the jitted batch, written to response_pair_BR)."""
  g = len(rows)
  ids = np.full((g, t), pad_id, np.int32)
  pos = np.zeros((g, t), np.int32)
  branch = np.full((g, t), PAD, np.int32)
  segment = np.full((g, t), PAD, np.int32)
  slot = np.zeros((g, rr), np.int32)
  label = np.zeros((g, rr), np.int32)
  side = np.zeros((g, rr), np.int32)
  pair = np.full((g, rr), PAD, np.int32)
  for b, members in enumerate(rows):
    start, rstart = 0, 0
    for seg, i in enumerate(members):
      if parts[i] is None:
        continue
      prompt, chosen, rejected = parts[i]
      p, c, r = len(prompt), len(chosen), len(rejected)
      cols, rcols = slice(start, start + p + c + r), slice(rstart, rstart + c + r)
      ids[b, cols] = np.concatenate([prompt, chosen, rejected])
      pos[b, cols] = np.concatenate([np.arange(p + c), p + np.arange(r)])
      branch[b, cols] = np.concatenate([np.full(p, PROMPT), np.full(c, CHOSEN), np.full(r, REJECTED)])
      segment[b, cols] = seg
      slot[b, rcols] = start + np.concatenate([p - 1 + np.arange(c), [p - 1], p + c + np.arange(r - 1)])
      label[b, rcols] = np.concatenate([chosen, rejected])
      side[b, rcols] = np.concatenate([np.full(c, CHOSEN), np.full(r, REJECTED)])
      pair[b, rcols] = pair_index[i]
      start, rstart = start + p + c + r, rstart + c + r
  out = {k: v for k, v in batch.items() if np.ndim(v) == 1}
  out.setdefault("index_B", np.arange(len(parts), dtype=np.int32))  # [P]: sizes the per-pair sums
  out.update(
      packed_input_ids_BT=ids,
      packed_positions_BT=pos,
      packed_branch_BT=branch,
      packed_segment_BT=segment,
      response_slot_BR=slot,
      response_label_BR=label,
      response_side_BR=side,
      response_pair_BR=pair,
  )
  return out


# ------------------------------------------------------------------------------------- several pairs per row


def first_fit_decreasing(sizes: Sequence[int], rows: int, capacity: int) -> list[list[int]] | None:
  """Item sizes into `rows` rows of `capacity`, largest first, each into the first row with room; None when they
  do not fit. Each row lists its item positions in ascending order."""
  bins: list[list[int]] = [[] for _ in range(rows)]
  used = [0] * rows
  for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
    for b in range(rows):
      if used[b] + sizes[i] <= capacity:
        bins[b].append(i)
        used[b] += sizes[i]
        break
    else:
      return None
  return [sorted(members) for members in bins]


def rows_per_group(pairs: int, pairs_per_row: int) -> int:
  """Rows that hold a group of `pairs` pairs at up to `pairs_per_row` per row."""
  return max(-(-int(pairs) // max(int(pairs_per_row), 1)), 1)


def plan_pair_rows(
    slots: Sequence[int],
    responses: Sequence[int],
    *,
    pairs_per_row: int,
    bucket: Callable[[int], int],
    groups: int = 1,
    micro_batches: int = 1,
) -> tuple[list[list[int]], int, int]:
  """(rows, T, R): the rows of `pack_pairs` (lists of pair positions) for pairs of `slots` packed slots and
  `responses` response slots each (0 for a filler pair), from the lengths alone."""
  n = len(slots)
  per_group = n // (groups * micro_batches) if groups * micro_batches else 0
  if per_group < 1 or n != per_group * groups * micro_batches:
    raise ValueError(
        f"pack_pairs: {n} pairs do not split into {groups} device block(s) x {micro_batches} micro-batch(es)"
    )
  block = n // groups
  members = [
      [d * block + m + micro_batches * j for j in range(per_group)] for d in range(groups) for m in range(micro_batches)
  ]
  k = rows_per_group(per_group, pairs_per_row)
  t = bucket(max(max(slots), -(-sum(slots) // (k * len(members))), 1))
  while True:  # the smallest bucket at which every group fits (one pair per row always does)
    plans = [first_fit_decreasing([slots[i] for i in group], k, t) for group in members]
    if all(plan is not None for plan in plans):
      break
    t = bucket(t + 1)
  rows: list[list[int]] = [[] for _ in range(k * len(members))]
  for d in range(groups):
    for m in range(micro_batches):
      for j, row in enumerate(plans[d * micro_batches + m]):
        rows[d * k * micro_batches + m + micro_batches * j] = [members[d * micro_batches + m][i] for i in row]
  r = bucket(max(max(sum(responses[i] for i in row) for row in rows), 1))
  return rows, t, r


def pack_pairs(
    batch: dict[str, np.ndarray],
    *,
    pairs_per_row: int,
    bucket: Callable[[int], int],
    groups: int = 1,
    micro_batches: int = 1,
    pair_offset: int = 0,
    pad_id: int = 0,
    min_shape: tuple[int, int] = (0, 0),
) -> dict[str, np.ndarray]:
  """The packed layout of a collated batch of P pairs with up to `pairs_per_row` pairs per row.

  The rows are planned so that training's data-parallel sharding and gradient accumulation stay local: the P
  pairs are cut into `groups` contiguous blocks (one per data-parallel device of this host), block d's pairs
  with position i % micro_batches == m form one group (gradients.split_micro_batches' strided micro-batch m), and
  each group is packed (first-fit decreasing, `plan_pair_rows`) into its own rows_per_group(...) rows, laid out
  in the same block / stride pattern. T and R are the smallest `bucket` values at which every group fits. A
  pair's response_pair_BR is its position in its micro-batch's [P / micro_batches] arrays once this host's
  batch sits at `pair_offset` of the global batch: (pair_offset + i) // micro_batches. `min_shape`: (T, R) at
  least this large (every process of a multi-host run pads to the largest of all processes' shapes).
  """
  n = next(iter(batch.values())).shape[0]
  parts = [_row_parts(batch, b) for b in range(n)]
  rows, t, r = plan_pair_rows(
      [0 if q is None else len(q[0]) + len(q[1]) + len(q[2]) for q in parts],
      [0 if q is None else len(q[1]) + len(q[2]) for q in parts],
      pairs_per_row=pairs_per_row,
      bucket=bucket,
      groups=groups,
      micro_batches=micro_batches,
  )
  t, r = max(t, int(min_shape[0])), max(r, int(min_shape[1]))
  return _fill(batch, parts, rows, t, r, pad_id, [(pair_offset + i) // micro_batches for i in range(n)])
