"""Section 6 (SORRY-Bench): sample, judge, label, train (dpo | dpo_sft | gold | filtered), re-judge (Figure 3).

    python -m displacement_jax.train --config=configs/sorry.py:model=llama3_8b_instruct,variant=all
    python -m displacement_jax.train --config=configs/sorry.py:model=gemma2b_it,variant=filtered
    python -m displacement_jax.train --config=configs/sorry.py:model=smollm2        # in miniature, offline, CPU
    python -m displacement_jax.train --config=configs/sorry.py:model=smollm2,refusing   # from a refusing model
    python -m displacement_jax.train --config=configs/sorry.py:tiny                     # offline, seconds
    python -m displacement_jax.train --config=configs/sorry.py:model=smollm2,tiny   # the miniature's tiny twin
    python -m displacement_jax.report sorry runs/sorry_llama3_8b_instruct

Arg (configs.common.parse_arg): model = gemma2b_it (default; google/gemma-2b-it) | llama3_8b_instruct
(meta-llama/Meta-Llama-3-8B-Instruct) | smollm2 (the packaged SmolLM2-135M-Instruct: Section 6 in miniature, see
below); variant = the method dpo (default) | dpo_sft | gold | filtered, or all
(every method in one process, sharing the generated and judged pairs; the default with tiny); tiny = a random
tiny policy and judge on the shipped SORRY-Bench fixtures (with model=smollm2: a random tiny policy on the mild
requests, judged by the phrase rule).

model=smollm2 (default variant: dpo, dpo_sft and filtered in one process): the project's own 56 mild requests
(`displacement_jax/assets/mild_requests.jsonl`, SORRY-Bench's question layout), two responses each at T=0.7 (at
T=1 this model mostly writes word salad), 64 new tokens per response, the
phrase rule as judge (`judge.REFUSAL_PHRASES`; no judge model), ties broken by seeded coin flips (PairRM needs a
download), RMSprop lr 1e-6 (where DPO displaces this model, docs/results.md), batch 8, 2 epochs; `filtered`
keeps the lowest 5% by LN-CHES (2 of ~48 train pairs). No `gold`: there are no human-judged pairs of these
prompts beyond the hand-checked sample of the phrase rule.

refusing (model=smollm2): the packaged model complies with almost every request, so no pair holds two refusals
(the case Section 6 is about). `refusing` first makes a refusing model: 3 epochs of cross-entropy (RMSprop lr 1e-5,
batch 8) on the 56 requests, each answered by one of the project's 10 refusal texts
(`sorry_bench/refusal_sft.py`), exported to <output_dir>/refusal_sft/hf; the pipeline then runs from that model
(its policy and its reference). Output in runs/sorry_smollm2_refusing.
"""

from __future__ import annotations

import os

import ml_collections

from configs import base, common
from displacement_jax.data import schema
from displacement_jax.experiments.sorry_bench import constants

MILD_REQUESTS = os.path.join(common.ROOT, "displacement_jax", "assets", "mild_requests.jsonl")  # model=smollm2
MILD_REQUEST_LABELS = os.path.join(common.ROOT, "displacement_jax", "assets", "mild_requests_labels.jsonl")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = common.parse_arg(arg, model="gemma2b_it", variant="", tiny=False, refusing=False)
  model = common.choose("sorry", "model", arg.model, constants.MODEL_IDS)
  variant = common.choose(
      "sorry",
      "variant",
      arg.variant or ("all" if arg.tiny or model == "smollm2" else "dpo"),
      constants.VARIANTS + ("all",),
  )
  config = base.get_base_config()
  config.main = "sorry_bench"
  config.output_dir = f"runs/sorry_{model}" + ("_refusing" if arg.refusing else "") + ("_tiny" if arg.tiny else "")
  config.model.path = constants.MODEL_IDS[model]
  config.data.path = ""  # set by the pipeline (its generated preference pairs)
  config.data.format = "chat_template"
  config.data.max_length = 1024
  config.optim.lr = 5e-6  # DPO, beta 0.1, batch 32, one epoch: the base defaults
  config.eval.every = 0
  config.sorry = ml_collections.ConfigDict()
  config.sorry.variants = constants.VARIANTS if variant == "all" else (variant,)
  config.sorry.prompts_path = schema.SORRY_PROMPTS_ID
  config.sorry.human_judgments_path = schema.SORRY_HUMAN_ID
  config.sorry.num_prompts = 0  # > 0: use only the first N prompts
  config.sorry.sample_temperature = 1.0  # the two responses per prompt that are labelled
  config.sorry.eval_temperature = 0.7  # responses whose refusal rate is reported
  config.sorry.max_new_tokens = 512
  config.sorry.gen_batch_size = 16
  config.sorry.judge_path = constants.JUDGE_ID
  config.sorry.judge_tiny = ""  # a models.tiny preset instead of judge_path (tests)
  config.sorry.judge_max_new_tokens = 4
  config.sorry.judge_max_length = 2048
  config.sorry.judge_mode = "generate"  # 'generate' (greedy text, parsed) | 'logits' ('0' vs '1' logit; tiny)
  config.sorry.tie_breaker = "pairrm"  # 'pairrm' (needs llm-blender; else random, logged) | 'random'
  config.sorry.test_fraction = 0.15
  config.sorry.split_seed = 0
  config.sorry.sft_coeff = 1.0  # dpo_sft: loss += sft_coeff * (-mean preferred log-prob)
  config.sorry.gold_lr = 1e-6
  config.sorry.filter_k = 19  # filtered: the k pairs with the lowest LN-CHES
  config.sorry.refusal_sft = ml_collections.ConfigDict()  # a refusing start first (sorry_bench/refusal_sft.py)
  config.sorry.refusal_sft.epochs = 0  # 0: none (the instruct model as it is); `refusing` in the arg sets 3
  config.sorry.refusal_sft.lr = 1e-5
  config.sorry.refusal_sft.batch_size = 8
  if arg.refusing:
    config.sorry.refusal_sft.epochs = 3
  if model == "smollm2":
    if variant == "all":
      config.sorry.variants = ("dpo", "dpo_sft", "filtered")
    config.sorry.prompts_path = MILD_REQUESTS
    config.sorry.human_judgments_path = MILD_REQUEST_LABELS  # variant=gold only: the hand-labelled responses
    config.sorry.judge_path = ""
    config.sorry.judge_mode = "phrases"
    config.sorry.tie_breaker = "random"
    config.sorry.sample_temperature = 0.7  # at 1.0 this model mostly writes word salad (docs/results.md)
    config.sorry.max_new_tokens = 64
    config.sorry.gen_batch_size = 8
    config.sorry.filter_k = 2  # 5% of ~48 train pairs
    config.data.max_length = 128  # prompt (chat template, ~60 tokens) + 64 response tokens
    config.logprob_chunk_size = 64
    config.optim.lr = 1e-6
    config.batch_size = 8
    config.num_epochs = 2
    config.progress = False
  if arg.tiny and model != "smollm2":  # model=smollm2,tiny keeps its prompts and the phrase judge
    config.sorry.prompts_path = os.path.join(common.FIXTURES, "sorry-bench-202406")
    config.sorry.human_judgments_path = os.path.join(common.FIXTURES, "sorry-bench-human-judgment-202406")
    config.sorry.judge_path = ""
    config.sorry.judge_tiny = "llama"
    config.sorry.judge_max_new_tokens = 2
    config.sorry.judge_max_length = 256
    config.sorry.judge_mode = "logits"  # a random tiny judge rarely writes a parsable score
  if arg.tiny:
    config.sorry.refusal_sft.lr = 1e-3
    config.sorry.refusal_sft.epochs = min(int(config.sorry.refusal_sft.epochs), 1)
    config.sorry.tie_breaker = "random"
    config.sorry.max_new_tokens = 6
    config.sorry.gen_batch_size = 8
    config.sorry.filter_k = 2
    config.sorry.gold_lr = 1e-3
    config.data.format = "raw"
    config.batch_size = 2
    config.num_epochs = 0
    config.num_steps = 2
    common.tiny(config)
  return config
