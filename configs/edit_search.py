"""Where DPO displaces the packaged SmolLM2-135M-Instruct: short factual pairs (experiments/edit_pairs.py).

    python -m displacement_jax.train --config=configs/edit_search.py                 # minimal edits: opt x lr x epochs
    python -m displacement_jax.train --config=configs/edit_search.py:grid=kinds      # paraphrase, off-policy pairs
    python -m displacement_jax.train --config=configs/edit_search.py:grid=remedies   # DPO vs DPO+SFT vs DPOP
    python -m displacement_jax.train --config=configs/edit_search.py:grid=audit      # the audit's accuracy vs lr
    python -m displacement_jax.train --config=configs/edit_search.py:grid=proof      # the audit on 256 pairs
    python -m displacement_jax.train --config=configs/edit_search.py:grid=onpolicy   # two sampled responses
    python -m displacement_jax.train --config=configs/edit_search.py:tiny            # tiny random Llama (tests)

`grid=main`: minimal-edit pairs x RMSprop (the paper's, torch defaults) and AdamW (what TRL users run) x lr 1e-7,
1e-6, 5e-6; DPO beta 0.1, batch 8, 48 pairs, measured after epochs 1-3.
`grid=kinds`: the other two kinds (paraphrase, offpolicy) with RMSprop at lr 1e-6, as `main` otherwise.
`grid=remedies`: minimal-edit pairs, RMSprop lr 1e-6, DPO against DPO + SFT term (0.1) and DPOP (lambda 50).
`grid=audit`: minimal-edit pairs (40, the demo's), one epoch, RMSprop and AdamW at lr 1e-8, 1e-7, 1e-6, 5e-6, each run
predicted first by the displacement audit: each order's Spearman and sign agreement against lr.
`grid=proof`: the audit on 256 minimal-edit pairs of three topics (80 capitals, 88 chemical symbols, 88 sums), one
epoch, RMSprop and AdamW at lr 1e-8 .. 5e-6, to second order, next to CHES, LN-CHES, edit distance and the
last-hidden inner product (issue 29's proof; one replay per optimizer serves every lr).
`grid=onpolicy`: pairs of two responses the model itself samples (T=1, up to 48 tokens) to the questions of 32 facts of
each topic; y+ is the response that states the answer when exactly one does, else the first (the table splits the
pairs into right_over_wrong, both_right, both_wrong: two responses of the same kind); RMSprop and AdamW at lr 1e-6 and
5e-6, three epochs, max_length 128.
Every run's row names the top gainers: at the y+ token that fell most, the token that gained most (search.gainers).
The model is an arg (`model=/path/to/hf_dir`, `model=gemma3-270m`); the chat template formats every pair (a model without
one: the paper's <|prompter|>...<|assistant|> format, data.format 'auto').
"""

from __future__ import annotations

import ml_collections

from configs import base
from configs import common

DEFAULT_MODEL = "smollm2-135m-instruct"
VARIANTS = {"dpo": {}, "dpo+sft": {"loss": {"sft_coeff": 0.1}}, "dpop": {"loss": {"objective": "dpop"}}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model=DEFAULT_MODEL, grid="main", tiny=False)
  common.choose("edit_search", "grid", arg.grid, ("main", "kinds", "remedies", "audit", "proof", "onpolicy"))
  config = base.get_base_config()
  config.main = "edit_search"
  config.output_dir = f"runs/edit_search_{arg.grid}" + ("_tiny" if arg.tiny else "")
  config.model.path = arg.model
  # the default model's chat template; another model's format follows its tokenizer (a base model such as
  # model=gemma3-270m: the paper's <|prompter|>...<|assistant|>, its markers added as tokens), as configs/demo.py
  config.data.format = "chat_template" if arg.model == DEFAULT_MODEL else "auto"
  config.data.max_length = 64
  config.logprob_chunk_size = 64
  config.batch_size = 8
  config.num_epochs = 3
  config.progress = False
  config.loss.objective = "dpo"
  config.loss.beta = 0.1

  config.search = ml_collections.ConfigDict()
  config.search.topics = ("capital",)  # edit_pairs.TOPICS: capital (80 facts), symbol (88), sum (88)
  config.search.num_pairs = 48  # the first facts of each topic (0 = all)
  config.search.audit = False  # predict each run with the displacement audit first (Spearman, sign columns)
  config.search.audit_order = 1  # 2: also the second-order term along D (a JVP of the JVP per pair)
  config.search.gainers = True  # per run: at each fallen pair's worst y+ token, the token that gained most
  config.search.temperature = 1.0  # the on-policy kind's sampling (edit_search.onpolicy_rows)
  config.search.max_new_tokens = 48
  config.search.sample_batch_size = 32
  if arg.grid == "onpolicy":
    config.search.kinds = ("onpolicy",)
    config.search.topics = ("capital", "symbol", "sum")
    config.search.num_pairs = 32
    config.search.optimizers = ("rmsprop", "adamw")
    config.search.lrs = (1e-6, 5e-6)
    config.search.variants = {"dpo": VARIANTS["dpo"]}
    config.data.max_length = 128
  elif arg.grid in ("main", "kinds"):
    config.search.kinds = ("edit",) if arg.grid == "main" else ("paraphrase", "offpolicy")
    config.search.optimizers = ("rmsprop", "adamw") if arg.grid == "main" else ("rmsprop",)
    config.search.lrs = (1e-7, 1e-6, 5e-6) if arg.grid == "main" else (1e-6,)
    config.search.variants = {"dpo": VARIANTS["dpo"]}
  elif arg.grid == "remedies":
    config.search.kinds = ("edit",)
    config.search.optimizers = ("rmsprop",)
    config.search.lrs = (1e-6,)
    config.search.variants = VARIANTS
  else:
    config.search.kinds = ("edit",)
    config.search.optimizers = ("rmsprop", "adamw")
    config.search.lrs = (1e-8, 1e-7, 1e-6, 5e-6)
    config.search.variants = {"dpo": VARIANTS["dpo"]}
    config.search.audit = True
    config.search.num_pairs = 40
    config.num_epochs = 1
    if arg.grid == "proof":
      config.search.topics = ("capital", "symbol", "sum")
      config.search.num_pairs = 0
      config.search.audit_order = 2
  if arg.tiny:
    config.model.path = ""
    config.model.tiny = "llama"
    config.search.num_pairs = 16
    config.search.max_new_tokens = 8
    config.num_epochs = 2
    config.search.lrs = tuple(x * 1000 for x in config.search.lrs)
  return config
