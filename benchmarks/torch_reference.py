"""The PyTorch way, as the baselines for the benchmarks.

* `score_rows_official_way`: CHES scoring as the official research code does it -- an HF transformers model,
  one row at a time, one forward pass per (prompt, response) with output_hidden_states=True.
* `trl_dpo_step`: one DPO optimisation step as TRL does it -- chosen and rejected concatenated along the batch,
  padded to the longest, full-vocabulary log-softmax, gather, sigmoid loss against precomputed reference
  log-probs, backward, optimizer step.

These functions exist only to be timed against displacement_jax; they are not part of the library.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def score_rows_official_way(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
) -> np.ndarray:
  """CHES for (prompt_ids, chosen_ids, rejected_ids) rows, one row and one sequence at a time."""
  scores = []
  for prompt_ids, chosen_ids, rejected_ids in rows:
    sums = []
    for response_ids in (chosen_ids, rejected_ids):
      ids = torch.tensor([list(prompt_ids) + list(response_ids)])
      out = model(input_ids=ids, output_hidden_states=True)
      hidden_TD = out.hidden_states[-1][0].float()
      start = len(prompt_ids) - 1  # the last prompt position predicts the first response token
      stop = start + len(response_ids)  # through the second-to-last response token
      sums.append(hidden_TD[start:stop].sum(0))
    s_pos, s_neg = sums
    scores.append(float(s_pos @ s_neg - s_pos @ s_pos))
  return np.asarray(scores, dtype=np.float32)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
  length = max(len(s) for s in seqs)
  ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
  mask = torch.zeros((len(seqs), length), dtype=torch.long)
  for i, s in enumerate(seqs):
    ids[i, : len(s)] = torch.tensor(list(s))
    mask[i, : len(s)] = 1
  return ids, mask


def build_trl_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
  """Concatenated (chosen first, then rejected) right-padded batch with response-only label masks."""
  seqs, loss_starts = [], []
  for side in (1, 2):
    for row in rows:
      seqs.append(list(row[0]) + list(row[side]))
      loss_starts.append(len(row[0]))
  ids, mask = _pad(seqs, pad_id)
  labels = ids.clone()
  for i, start in enumerate(loss_starts):
    labels[i, :start] = -100
  labels[mask == 0] = -100
  return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def concatenated_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
  """Summed response log-probs of every sequence in the concatenated batch (TRL's concatenated_forward)."""
  logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
  logits = logits[:, :-1].float()
  labels = batch["labels"][:, 1:].clone()
  loss_mask = labels != -100
  labels[~loss_mask] = 0
  per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
  return (per_token * loss_mask).sum(-1)


def trl_dpo_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    ref_logps: torch.Tensor,
    beta: float = 0.1,
) -> float:
  """One DPO step (sigmoid loss) on a concatenated batch; returns the loss."""
  logps = concatenated_logps(model, batch)
  n = logps.shape[0] // 2
  margin = (logps[:n] - ref_logps[:n]) - (logps[n:] - ref_logps[n:])
  loss = -F.logsigmoid(beta * margin).mean()
  optimizer.zero_grad(set_to_none=True)
  loss.backward()
  optimizer.step()
  return float(loss.detach())
