"""Shared-prompt packing: one row [prompt, chosen, rejected] per pair instead of two padded sides.

The two sequences of a preference pair share their prompt. Packed, the prompt is computed once: chosen tokens
attend to the prompt and to the chosen tokens before them, rejected tokens to the prompt and to the rejected
tokens before them (never to a chosen token), and the rejected tokens take positions p, p+1, ... as if they
followed the prompt directly. Under causal attention every token then has exactly the hidden state it has in
its own unpacked sequence, so log-probs, their gradients and CHES equal the unpacked batch's, for p + c + r
tokens per pair instead of 2p + c + r (and one padded row instead of two).

Only the response positions reach the LM head: `response_slot_BR` lists, per row, the packed slots whose
hidden state predicts a response token (the last prompt slot predicts the first token of both responses).

Keys of a packed batch (B rows, T packed slots, R response slots):
  packed_input_ids_BT int32, packed_positions_BT int32,
  packed_branch_BT int32: -1 padding, 0 prompt, 1 chosen response, 2 rejected response,
  response_slot_BR int32, response_label_BR int32 (the token predicted), response_side_BR int32 (0 padding,
  1 chosen, 2 rejected),
plus every [B] array of the collated batch (index_B, reference log-probs, ...) unchanged. Filler rows (no
loss positions) are all padding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from displacement_jax.data.layout import round_up

PAD, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2
PACKED_KEYS = (
    "packed_input_ids_BT",
    "packed_positions_BT",
    "packed_branch_BT",
    "response_slot_BR",
    "response_label_BR",
    "response_side_BR",
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
  """The packed layout (module docstring) of a collated batch (data.batching.collate, either padding side).

  pad_to / response_pad_to: T and R (default: the longest row, through `bucket` if given, else rounded up to
  `multiple`); a row that does not fit raises ValueError.
  """
  n = next(iter(batch.values())).shape[0]
  rows = [_row_parts(batch, b) for b in range(n)]
  need_t, need_r = _longest(rows)
  size = bucket or (lambda k: max(round_up(k, multiple), multiple))
  t = int(pad_to) if pad_to is not None else size(need_t)
  rr = int(response_pad_to) if response_pad_to is not None else size(need_r)
  if need_t > t or need_r > rr:
    raise ValueError(
        f"pack_batch: the longest pair needs {need_t} packed slots and {need_r} response slots, "
        f"more than pad_to={t} / response_pad_to={rr}"
    )
  ids = np.full((n, t), pad_id, np.int32)
  pos = np.zeros((n, t), np.int32)
  branch = np.full((n, t), PAD, np.int32)
  slot = np.zeros((n, rr), np.int32)
  label = np.zeros((n, rr), np.int32)
  side = np.zeros((n, rr), np.int32)
  for b, parts in enumerate(rows):
    if parts is None:
      continue
    prompt, chosen, rejected = parts
    p, c, r = len(prompt), len(chosen), len(rejected)
    ids[b, : p + c + r] = np.concatenate([prompt, chosen, rejected])
    pos[b, : p + c + r] = np.concatenate([np.arange(p + c), p + np.arange(r)])
    branch[b, : p + c + r] = np.concatenate([np.full(p, PROMPT), np.full(c, CHOSEN), np.full(r, REJECTED)])
    slot[b, :c] = p - 1 + np.arange(c)
    slot[b, c : c + r] = np.concatenate([[p - 1], p + c + np.arange(r - 1)])
    label[b, : c + r] = np.concatenate([chosen, rejected])
    side[b, :c] = CHOSEN
    side[b, c : c + r] = REJECTED
  out = {k: v for k, v in batch.items() if np.ndim(v) == 1}
  out.update(
      packed_input_ids_BT=ids,
      packed_positions_BT=pos,
      packed_branch_BT=branch,
      response_slot_BR=slot,
      response_label_BR=label,
      response_side_BR=side,
  )
  return out
