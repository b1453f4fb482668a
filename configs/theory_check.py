"""Does the theory's sign predict the direction on a real model? Every ordered pair of persona tokens, after SFT.

    python -m displacement_jax.train --config=configs/theory_check.py          # SmolLM2-135M-Instruct (packaged)
    python -m displacement_jax.train --config=configs/theory_check.py:tiny     # a tiny random Llama (the tests)

The demo's SFT phase (configs/persona_demo.py, same arg), then for each prompt of `check.prompts` and each of the
C x (C - 1) ordered pairs of single-token candidates: the Theorem 1 rate and the full-network rate at the SFT
model against the measured change of ln pi(y+) after `dpo.num_steps` DPO steps (paper's RMSprop lr 1e-7,
beta 0.1). See displacement_jax/experiments/theory_check.py.
"""

from __future__ import annotations

import ml_collections

from configs import common, persona_demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parsed = common.parse_arg(arg, model=persona_demo.DEFAULT_MODEL, tiny=False)
  config = persona_demo.get_config(arg)
  config.main = "theory_check"
  config.output_dir = "runs/theory_check_tiny" if parsed.tiny else "runs/theory_check"
  config.dpo.num_steps = 10
  config.check = ml_collections.ConfigDict()
  config.check.prompts = (0,)  # rows of data.path, one DPO run per ordered pair on each (56 pairs: ~15 min)
  if parsed.tiny:
    config.sft.num_steps = 20
    config.dpo.num_steps = 3
    config.dpo.candidate_tokens = ("Yes", "No", "Never", "Maybe")
    config.check.prompts = (0,)
  return config
