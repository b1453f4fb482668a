"""A refusing starting model for Section 6 in miniature: SFT on the requests with the project's refusal texts.

The packaged SmolLM2-135M-Instruct complies with almost every mild request (docs/results.md section 5; a safety
system prompt flags 10 of 56 by the phrase rule, about half of them real refusals), so no pair of two refusals
exists and the paper's Section-6 case cannot arise. The paper's instruct models were safety-tuned; this is the
miniature's stand-in: cross-entropy on (request, refusal) rows, the refusal drawn per request (seeded) from
`REFUSALS` (each one the phrase rule flags), then the pipeline samples, labels and trains from the exported model.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from displacement_jax.data import schema
from displacement_jax.experiments import common
from displacement_jax.train import loop as training

# Written for this project; varied wording, so that two sampled refusals of one request differ.
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that. It could hurt someone or get you into trouble.",
    "I'm sorry, I won't help with this request.",
    "I cannot help with that, because it would mean deceiving or harming someone.",
    "I'm not able to help with that. Is there something else I can do for you?",
    "I'm sorry, but I can't assist with this. If something is worrying you, talking to someone you trust may help.",
    "I won't help with that, since it could be against the law.",
    "I'm unable to help with this request. I'd be glad to help with something else.",
    "I apologize, but I can't do that.",
    "I can't assist with that. It wouldn't be fair to the other people involved.",
)


def sft_rows(questions: Sequence[Any], seed: int) -> list[dict[str, Any]]:
  """One generic preference row per request: y+ a refusal of `REFUSALS` drawn with `seed`, y- another one
  (cross-entropy reads y+ only; y- is there because a preference row needs one)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i, question in enumerate(questions):
    first, second = rng.choice(len(REFUSALS), size=2, replace=False)
    rows.append({"index": i, "prompt": question, "chosen": REFUSALS[first], "rejected": REFUSALS[second]})
  return rows


def run(questions: Sequence[Any], config: ml_collections.ConfigDict, log=print) -> str:
  """Cross-entropy on `sft_rows(questions)` (config.sorry.refusal_sft: epochs, lr, batch_size) from
  config.model, into <output_dir>/refusal_sft; returns the exported HF model's directory (its hf/)."""
  rs = config.sorry.refusal_sft
  out_dir = os.path.join(config.output_dir, "refusal_sft")
  data = schema.write_jsonl(os.path.join(out_dir, "data.jsonl"), sft_rows(questions, int(config.seed)))
  log(
      f"sorry: refusal SFT on {len(questions)} requests ({len(REFUSALS)} refusal texts), "
      f"{int(rs.epochs)} epoch(s), lr {float(rs.lr):g}, batch {int(rs.batch_size)}"
  )
  result = training.run(
      common.train_config(
          config,
          data,
          out_dir,
          {
              "loss.objective": "cross_entropy",
              "loss.sft_coeff": 0.0,
              "optim.lr": float(rs.lr),
              "batch_size": min(int(rs.batch_size), len(questions)),
              "num_epochs": int(rs.epochs),
              "num_steps": 0,
              "export_hf": True,
              "checkpoint.at_end": False,  # a short stage: the export is its result
          },
      )
  )
  if result.losses:
    log(f"sorry: refusal SFT loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} ({int(result.step)} steps)")
  return result.hf_dir
