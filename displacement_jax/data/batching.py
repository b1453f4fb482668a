"""Collate tokenized pairs into the batch contract (docs/DESIGN.md) and iterate over them.

`collate` pads both sides to one length T (left or right padding) and builds, per side `s`:
  s_input_ids_BT (int32), s_attention_mask_BT (bool), s_labels_BT (int32, labels[t] = ids[t+1], 0 elsewhere),
  s_loss_mask_BT (bool, True from the last prompt position through the second-to-last response token),
plus index_B (int32; -1 marks filler rows of an incomplete batch, whose loss masks are all False) and
s_ends_eos_B (bool: the response ends with the EOS that tokenization appended, i.e. it was not cut).

`BatchIterator` is deterministic (seeded per epoch), yields one fixed shape per length bucket (to limit
recompiles), resumes from `state()` = {epoch, step}, and gives each host its slice of every global batch.
With `shared_prompt_packing` it yields the packed layout of `data/packing.py` instead (same rows, same order).
"""

from __future__ import annotations

import bisect
import json
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from displacement_jax.data import packing
from displacement_jax.data.layout import bucket_length, round_up

SIDES = ("chosen", "rejected")


def _side_ids(pair: Any, side: str) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(pair.prompt_ids, np.int32).reshape(-1), np.asarray(getattr(pair, f"{side}_ids"), np.int32).reshape(
      -1
  )


def pair_length(pair: Any) -> int:
  """Tokens of the longer side of a pair (prompt + response)."""
  return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def packed_length(pair: Any) -> int:
  """Tokens of a pair's shared-prompt packed row (data/packing.py): prompt + chosen + rejected."""
  return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def collate(
    pairs: Sequence[Any],
    *,
    pad_id: int,
    padding_side: str = "right",
    pad_to: int | None = None,
    pad_rows_to: int | None = None,
    filler: Any = None,
) -> dict[str, np.ndarray]:
  """Batch dict of numpy arrays for TokenizedPairs (see the module docstring).

  pad_to: the sequence length T (default: the longest side); a longer pair raises ValueError.
  pad_rows_to: append filler rows (copies of `filler`, default the first pair, with all-False loss masks and
  index -1) up to B rows; `pairs` may then be empty.
  """
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
  n = len(pairs)
  B = n if pad_rows_to is None else int(pad_rows_to)
  if B < n:
    raise ValueError(f"collate: pad_rows_to={B} is smaller than the number of pairs {n}")
  filler = filler if filler is not None else (pairs[0] if pairs else None)
  if B == 0 or filler is None:
    raise ValueError("collate: no pairs")
  pairs = list(pairs) + [filler] * (B - n)
  longest = max(pair_length(p) for p in pairs)
  T = longest if pad_to is None else int(pad_to)
  if longest > T:
    worst = max(pairs, key=pair_length)
    raise ValueError(f"collate: pair with index {worst.index} has {longest} tokens, more than pad_to={T}")
  out: dict[str, np.ndarray] = {}
  for side in SIDES:
    ids_BT = np.full((B, T), pad_id, np.int32)
    attn_BT = np.zeros((B, T), bool)
    labels_BT = np.zeros((B, T), np.int32)
    loss_BT = np.zeros((B, T), bool)
    for b in range(B):
      prompt, response = _side_ids(pairs[b], side)
      seq = np.concatenate([prompt, response])
      L, P, R = len(seq), len(prompt), len(response)
      if P == 0 or R == 0:
        raise ValueError(f"collate: pair with index {pairs[b].index} has an empty prompt or {side} response")
      off = 0 if padding_side == "right" else T - L
      ids_BT[b, off : off + L] = seq
      attn_BT[b, off : off + L] = True
      labels_BT[b, off : off + L - 1] = seq[1:]
      if b < n:
        loss_BT[b, off + P - 1 : off + P + R - 1] = True
    out[f"{side}_input_ids_BT"] = ids_BT
    out[f"{side}_attention_mask_BT"] = attn_BT
    out[f"{side}_labels_BT"] = labels_BT
    out[f"{side}_loss_mask_BT"] = loss_BT
  out["index_B"] = np.asarray([int(p.index) for p in pairs[:n]] + [-1] * (B - n), np.int32)
  for side in SIDES:
    out[f"{side}_ends_eos_B"] = np.asarray([ends_with_eos(p, side) for p in pairs], bool)
  return out


def ends_with_eos(pair: Any, side: str) -> bool:
  """Whether a pair's `side` response ends with the EOS tokenization appended (TokenizedPair.ends_with_eos;
  pairs built by hand without that method count as ending with EOS)."""
  method = getattr(pair, "ends_with_eos", None)
  return bool(method(side)) if method is not None else True


def length_buckets(pairs: Sequence[Any], boundaries: Sequence[int]) -> list[list[int]]:
  """Positions of the pairs in each bucket: bucket i holds lengths in (boundaries[i-1], boundaries[i]].

  A pair longer than the last boundary raises ValueError (add a boundary or raise max_length).
  """
  bounds = [int(b) for b in boundaries]
  if not bounds or bounds != sorted(set(bounds)) or bounds[0] <= 0:
    raise ValueError(f"boundaries must be strictly increasing positive ints, got {list(boundaries)}")
  buckets: list[list[int]] = [[] for _ in bounds]
  for i, p in enumerate(pairs):
    n = pair_length(p)
    k = bisect.bisect_left(bounds, n)
    if k == len(bounds):
      raise ValueError(f"pair {i} (index {p.index}) has {n} tokens, more than the last bucket boundary {bounds[-1]}")
    buckets[k].append(i)
  return buckets


class BatchIterator:
  """Deterministic, resumable iterator of collated batches (this host's rows of each global batch).

  Epoch e: each bucket's rows are permuted with rng(seed, e) (when shuffle), cut into global batches of
  `batch_size`, and the batches of all buckets are interleaved in a seeded order. Each batch is padded to its
  bucket's length (boundary, or the longest pair rounded up to pad_to_multiple without buckets). The last
  incomplete batch of a bucket is dropped (drop_last) or filled with filler rows (index -1, no loss).
  Iterates forever over epochs unless num_epochs is set. `rows_log`: a jsonl file to which every batch appends
  {"epoch", "step", "process", "index"} (this host's dataset rows; per-host data can be checked from it).
  """

  def __init__(
      self,
      pairs: Sequence[Any],
      batch_size: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      bucket_boundaries: Sequence[int] | None = None,
      drop_last: bool = False,
      pad_to_multiple: int = 8,
      pad_id: int = 0,
      padding_side: str = "right",
      num_epochs: int | None = None,
      process_index: int = 0,
      process_count: int = 1,
      shared_prompt_packing: bool = False,
      pairs_per_row: int = 1,
      data_shards: int = 1,
      micro_batches: int = 1,
      rows_log: str | None = None,
  ):
    if not pairs:
      raise ValueError("BatchIterator: no pairs")
    if batch_size <= 0 or pad_to_multiple <= 0:
      raise ValueError(f"batch_size and pad_to_multiple must be positive, got {batch_size}, {pad_to_multiple}")
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} must be divisible by process_count={process_count}")
    self.pairs = list(pairs)
    self.batch_size, self.seed, self.shuffle, self.drop_last = int(batch_size), int(seed), bool(shuffle), drop_last
    self.pad_id, self.padding_side, self.num_epochs = int(pad_id), padding_side, num_epochs
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.rows_log = rows_log
    if bucket_boundaries:
      self.buckets = length_buckets(self.pairs, bucket_boundaries)
      self.lengths = [int(b) for b in bucket_boundaries]
    else:
      self.buckets = [list(range(len(self.pairs)))]
      self.lengths = [round_up(max(pair_length(p) for p in self.pairs), pad_to_multiple)]
    self.packing = None
    if shared_prompt_packing:  # [prompt, chosen, rejected] segments, up to pairs_per_row per row (data/packing.py)
      per = self.batch_size // self.process_count
      if pairs_per_row < 1 or per % (data_shards * micro_batches):
        raise ValueError(
            f"BatchIterator: {per} pairs per process do not split into data_shards={data_shards} x "
            f"micro_batches={micro_batches} groups (pairs_per_row={pairs_per_row})"
        )
      self.packing = dict(
          pairs_per_row=int(pairs_per_row),
          bucket=packed_bucket,
          groups=int(data_shards),
          micro_batches=int(micro_batches),
      )
    self.epoch, self.step = 0, 0
    self.steps_per_epoch = len(self._plan(0))
    if self.steps_per_epoch == 0:
      raise ValueError(f"BatchIterator: {len(self.pairs)} pairs give no batch of {batch_size} with drop_last")

  def _plan(self, epoch: int) -> list[tuple[int, list[int]]]:
    """(bucket, global row positions) of every batch of `epoch`, in order."""
    rng = np.random.default_rng([self.seed, epoch])
    batches = []
    for k, rows in enumerate(self.buckets):
      order = [rows[i] for i in rng.permutation(len(rows))] if self.shuffle else list(rows)
      for s in range(0, len(order), self.batch_size):
        chunk = order[s : s + self.batch_size]
        if len(chunk) < self.batch_size and self.drop_last:
          continue
        batches.append((k, chunk))
    if self.shuffle:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def state(self) -> dict[str, int]:
    """Where the iterator is: the next batch is batch `step` of epoch `epoch`."""
    return {"epoch": self.epoch, "step": self.step}

  def restore(self, state: Mapping[str, int]) -> "BatchIterator":
    epoch, step = int(state["epoch"]), int(state["step"])
    if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
      raise ValueError(f"bad iterator state {dict(state)} (steps_per_epoch={self.steps_per_epoch})")
    self.epoch, self.step = epoch, step
    return self

  @classmethod
  def from_state(
      cls, state: Mapping[str, int], pairs: Sequence[Any], batch_size: int, **kwargs: Any
  ) -> "BatchIterator":
    """A fresh iterator (same arguments as the saved one) positioned at `state`."""
    return cls(pairs, batch_size, **kwargs).restore(state)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= self.steps_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    bucket, global_rows = self._plan(self.epoch)[self.step]
    per = self.batch_size // self.process_count
    filler = self.pairs[global_rows[0]]  # the same filler on every host: hosts' slices concatenate to the global batch
    rows = global_rows[self.process_index * per : (self.process_index + 1) * per]
    if self.rows_log:
      with open(self.rows_log, "a") as f:
        f.write(
            json.dumps(
                {
                    "epoch": self.epoch,
                    "step": self.step,
                    "process": self.process_index,
                    "index": [int(self.pairs[i].index) for i in rows],
                }
            )
            + "\n"
        )
    self.step += 1
    batch = collate(
        [self.pairs[i] for i in rows],
        pad_id=self.pad_id,
        padding_side=self.padding_side,
        pad_to=self.lengths[bucket],
        pad_rows_to=per,
        filler=filler,
    )
    if self.packing is None:
      return batch
    _, t, r = self._packed_shape(global_rows)
    return packing.pack_pairs(
        batch, pad_id=self.pad_id, pair_offset=self.process_index * per, min_shape=(t, r), **self.packing
    )

  def _packed_shape(self, rows: Sequence[int]) -> tuple[int, int, int]:
    """(rows per process, T, R) of the packed global batch of dataset `rows`: every process plans its own slice
    (from the lengths alone) and all pad to the largest T and R, so all processes run one compiled shape."""
    per = self.batch_size // self.process_count
    shapes = []
    for process in range(self.process_count):
      mine = list(rows[process * per : (process + 1) * per])
      mine = mine + [None] * (per - len(mine))  # filler pairs of an incomplete batch
      slots = [0 if i is None else packed_length(self.pairs[i]) for i in mine]
      responses = [0 if i is None else len(self.pairs[i].chosen_ids) + len(self.pairs[i].rejected_ids) for i in mine]
      plan, t, r = packing.plan_pair_rows(slots, responses, **self.packing)
      shapes.append((len(plan), t, r))
    return shapes[0][0], max(s[1] for s in shapes), max(s[2] for s in shapes)

  def packed_shapes(self, epoch: int = 0) -> list[tuple[int, int, int]]:
    """The distinct packed (rows per process, T, R) shapes of the batches of `epoch` (from the lengths alone,
    nothing is collated): the jitted train step compiles once for each."""
    if self.packing is None:
      return []
    return sorted({self._packed_shape(rows) for _, rows in self._plan(epoch)})


def packed_bucket(length: int) -> int:
  """The padded length of a packed training row (or its response slots): layout.bucket_length's ladder (16, 32,
  64, 128, then multiples of 64), never capped, so a run's shapes come from a short, bounded list."""
  return bucket_length(length, length + 64)
