"""Re-generate the refusal-rate responses of a finished `configs/sorry.py:model=smollm2` run, to read them by hand.

The pipeline stores refusal rates, not the responses they were measured on. This regenerates them (one response
per prompt at sorry.eval_temperature, the pipeline's seeds: TRAIN_SEED on the train prompts, TEST_SEED on the test
prompts) from the start model or a method's final checkpoint, and writes each with the phrase rule's verdict:

    python examples/sorry_recheck.py runs/sorry_smollm2 initial   # the model before training
    python examples/sorry_recheck.py runs/sorry_smollm2 dpo       # <run>/dpo/checkpoints, newest step
    python examples/sorry_recheck.py runs/sorry_smollm2_refusing dpo   # a `refusing` run starts from its SFT export

Writes <run>/recheck_<which>.jsonl and prints how many responses the rule flags. The flagged counts reproduce the
run's result.json when the code and seeds are unchanged (checked on 2026-12-07: initial 3/48, 0/8; dpo 6/48, 1/8).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import sorry
from displacement_jax import rundir
from displacement_jax.experiments import short_runs
from displacement_jax.experiments.sorry_bench import judge, pipeline


def checkpoint_params(directory: str, like: dict) -> dict:
  """The params of the newest checkpoint in `directory`, cast and shaped like `like`."""
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  step = manager.latest_step()
  if step is None:
    print(f"sorry_recheck: no checkpoint in {directory}", file=sys.stderr)
    sys.exit(2)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return jax.tree.map(lambda ref, x: np.asarray(x, ref.dtype).reshape(ref.shape), like, state["params"])


def main(run_dir: str, which: str) -> None:
  config = sorry.get_config("model=smollm2")
  config.output_dir = os.path.join(run_dir, "recheck")
  refusing = os.path.join(run_dir, "refusal_sft", "hf")
  if os.path.isdir(refusing):  # a `refusing` run: its start is the refusal SFT's export
    config.model.path = refusing
  session = short_runs.Session(config)
  loaded = session.loaded
  params = loaded.params if which == "initial" else checkpoint_params(f"{run_dir}/{which}/checkpoints", loaded.params)
  policy = pipeline.policy_generator(loaded, params, config, None)
  rows = []
  for split, seed in (("train", pipeline.TRAIN_SEED), ("test", pipeline.TEST_SEED)):
    pairs = rundir.read_jsonl(os.path.join(run_dir, f"{split}.jsonl"))
    questions = [p["prompt"] for p in pairs]
    sc = config.sorry
    responses = policy(
        questions, temperature=float(sc.eval_temperature), max_new_tokens=int(sc.max_new_tokens), seed=seed
    )
    for pair, question, response in zip(pairs, questions, responses):
      score, phrase = judge.phrase_score(response)
      rows.append(
          {
              "split": split,
              "question_id": pair["meta"]["question_id"],
              "prompt": question,
              "response": response,
              "phrase_score": score,
              "phrase": phrase,
          }
      )
    flagged = sum(r["phrase_score"] == 0 for r in rows if r["split"] == split)
    print(f"{which} {split}: the phrase rule flags {flagged} of {len(questions)}", flush=True)
  with open(os.path.join(run_dir, f"recheck_{which}.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    print("usage: python examples/sorry_recheck.py RUN_DIR initial|dpo|dpo_sft|filtered", file=sys.stderr)
    sys.exit(2)
  main(sys.argv[1], sys.argv[2])
