"""Shared defaults for every training config: `get_base_config()` with every field documented.

Other configs start from it and override what they need:

    from configs import base
    def get_config(arg=None):
      config = base.get_base_config()
      config.model.tiny = 'llama'
      ...
      return config

Defaults follow the paper's experiments (torch RMSprop defaults, no schedule, no clipping, fp32 weights,
DPO beta 0.1, batch 32, one epoch). Any field can be overridden on the command line, e.g.
`--config.optim.lr=1e-7`.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """The default training config; every field is documented inline."""
  config = ml_collections.ConfigDict()

  config.main = ""  # what train runs: '' = train.loop.run; a pipeline (demo, persona, quantiles, sorry_bench)
  config.seed = 0  # data order, dropout-free training rng, special-token init
  config.output_dir = "runs/default"  # metrics.jsonl, TensorBoard events, checkpoints/, reference cache, hf/
  config.batch_size = 32  # global batch (all hosts, all micro-batches) in preference pairs
  config.num_epochs = 1  # passes over the data; ignored when num_steps > 0
  config.num_steps = 0  # > 0: train exactly this many optimizer steps (data repeats as needed)
  config.export_hf = False  # save the trained model in HF format to output_dir/hf at the end
  config.log_every = 1  # metrics.jsonl / TensorBoard row every N steps (1 = every step)
  config.progress = True  # tqdm progress bar (loss, preferred log-prob change)
  config.overwrite = False  # True: a fresh run may replace the checkpoints of an earlier run in output_dir
  config.resume_allow_changes = False  # True: --resume continues even if loss/optim/model/data/batch/seed changed

  config.model = ml_collections.ConfigDict()
  config.model.path = ""  # HF dir, hub id, .gguf file or packaged name ('smollm2-135m-instruct'); models.load
  config.model.tiny = ""  # or: a tiny random model of this family (models.tiny preset, e.g. 'llama')
  config.model.tiny_vocab_size = 0  # > 0: vocab size of the tiny model (0 = the models.tiny default, 512)
  config.model.tokenizer = ""  # tokenizer dir/id; '' = the model dir (or the tiny tokenizer)
  config.model.seed = 0  # init seed of a tiny model (Transformer.init)
  config.model.dtype = "float32"  # compute dtype ('float32' | 'bfloat16')
  config.model.param_dtype = "float32"  # parameter dtype (the paper trains fp32 weights)
  config.model.remat = False  # rematerialise each decoder layer (saves activation memory)
  config.model.freeze_pad_embedding = False  # True: no input-embedding gradient for the pad token (HF padding_idx, TRL)
  config.model.lora = ml_collections.ConfigDict()  # LoRA (PEFT's): only adapters are trained (docs: train.md)
  config.model.lora.rank = 0  # r; 0 = full fine-tuning (TRL/PEFT lora_r, LlamaFactory lora_rank)
  config.model.lora.alpha = 16.0  # scaling alpha / r (PEFT lora_alpha)
  config.model.lora.dropout = 0.0  # dropout on the adapter input in training (PEFT lora_dropout)
  config.model.lora.target_modules = "all-linear"  # PEFT names, comma-separated, or 'all-linear' (LlamaFactory 'all')
  config.model.lora.rslora = False  # scaling alpha / sqrt(r) (PEFT use_rslora)
  config.model.lora.path = ""  # a PEFT adapter directory to start from (its r/alpha/targets replace the fields above)
  config.model.lora.merge = False  # export_hf: also write the merged model (merge_and_unload) to output_dir/hf/merged

  config.data = ml_collections.ConfigDict()
  config.data.path = ""  # preference jsonl file or a supported HF dataset id
  config.data.split = "train"  # split of an HF dataset id
  config.data.schema = "auto"  # 'auto' (from the path) | 'generic' | 'ultrafeedback' | 'alpaca_farm' | 'persona'
  config.data.format = "raw"  # 'raw' | 'prompter_assistant' | 'chat_template' | 'persona' | 'auto' (tokenizer's)
  config.data.single_token = False  # responses are single vocabulary tokens (persona experiments)
  config.data.max_length = 512  # prompt + response tokens; longer pairs are truncated and counted
  config.data.truncation = "truncate_response"  # too-long response: 'truncate_response' (cut + counted) | 'error'
  config.data.limit = 0  # > 0: use `limit` rows drawn at random with `seed` (kept in dataset order)
  config.data.add_special_tokens = False  # add <|prompter|>/<|assistant|>/pad and resize (seeded init)
  config.data.shuffle = True  # reshuffle every epoch with `seed`
  config.data.padding_side = "right"  # 'right' | 'left'; results do not depend on it
  config.data.shared_prompt_packing = True  # one [prompt, chosen, rejected] row per pair: prompt run once (exact)
  config.data.pairs_per_row = 2  # packed training rows hold up to this many pairs (less padding; exact)
  config.data.tokenization = "separate"  # 'separate' (prompt, response + EOS apart) | 'trl' (TRL's rule)

  config.loss = ml_collections.ConfigDict()
  config.loss.objective = "dpo"  # 'dpo' | 'ipo' | 'cross_entropy' | 'slic' | 'dpop' | 'gpo'
  config.loss.beta = 0.1  # KL coefficient (DPO/IPO/GPO/DPOP)
  config.loss.sft_coeff = 0.0  # adds sft_coeff * (-mean preferred log-prob)
  config.loss.label_smoothing = 0.0  # conservative DPO (cDPO) epsilon
  config.loss.slic_delta = 1.0  # SLiC hinge margin
  config.loss.dpop_lambda = 50.0  # DPOP penalty weight on max(0, s_w_ref - s_w)
  config.loss.gpo_fn = "logistic"  # GPO convex function: 'logistic' | 'hinge' | 'squared' | 'exponential'

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "rmsprop"  # 'rmsprop' (torch defaults) | 'adamw' | 'sgd'
  config.optim.lr = 1e-7  # peak learning rate
  config.optim.schedule = "constant"  # 'constant' | 'linear' (warmup then linear decay) | 'cosine'
  config.optim.warmup_steps = 0  # linear warmup steps for 'linear' / 'cosine' (and 'constant')
  config.optim.clip = 0.0  # > 0: clip gradients to this global norm
  config.optim.grad_accum = 1  # micro-batches per step; gradients are AVERAGED over them
  # 'state' checks loss, gradient, new params and optimizer state (the returned state is always the last good one);
  # 'gradients' checks loss and gradient before the update (cheaper for a memory-bound step; step.make_train_step)
  config.optim.guard = "state"  # NaN/inf guard of the step: 'state' | 'gradients'
  config.optim.weight_decay = 0.0  # adamw decoupled weight decay
  config.optim.momentum = 0.0  # sgd / rmsprop momentum (torch default 0)
  config.optim.b1 = 0.9  # adamw
  config.optim.b2 = 0.999  # adamw
  config.optim.eps = 1e-8  # rmsprop / adamw epsilon (added outside the sqrt, like torch)
  config.optim.decay = 0.99  # rmsprop squared-gradient decay (torch alpha)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel axis size (-1: all remaining devices)
  config.mesh.fsdp = 1  # parameter-sharded data-parallel axis size
  config.mesh.tensor = 1  # tensor-parallel axis size

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 0  # > 0: orbax checkpoint every N steps (and always at the end)
  config.checkpoint.keep = 1  # keep the newest N checkpoints (1: what --resume needs; each is params + optimizer state)
  config.checkpoint.at_end = True  # also save the final state (what --resume or a continued run starts from)
  config.checkpoint.async_save = True  # save in the background while training continues

  config.eval = ml_collections.ConfigDict()
  config.eval.every = 1  # displacement monitor every N steps (0: only at the end)
  config.eval.top_k = 10  # single-token mode: top-k tokens by probability gain
  config.eval.max_samples = 256  # monitor on at most this many training pairs (fixed subset)
  config.eval.warning_nats = 0.01  # displacement WARNING: mean y+ log-prob this far below its reference, and falling
  config.eval.warning_share = 0.25  # displacement WARNING: this share of monitored pairs has y+ below its reference
  config.eval.warning_drop_nats = 1.0  # displacement WARNING: mean y+ change this many nats below its peak so far
  config.eval.show_fell = 5  # the monitor line and metrics name the rows of the k pairs whose y+ fell most
  config.eval.audit = False  # audit the run first (one replay at the initial params); log predicted vs measured

  config.audit = ml_collections.ConfigDict()  # python -m displacement_jax.audit (docs/theory.md)
  config.audit.top_k = 10  # print the k pairs predicted to fall most
  config.audit.order = 2  # 1: first order and the model at theta0 + D; 2: also the second-order term along D
  config.audit.decompose = True  # who pushes whom: per-pair contributions to each pair's first order (decompose.py)
  config.audit.subspace = "all"  # the parameters of the decomposition's inner products: all | head_and_last_layers
  config.audit.last_layers = 2  # head_and_last_layers: the LM head, the final norm and this many last layers
  config.audit.sketch = "count_sketch"  # unbiased projection of per-pair gradients: none | rademacher | count_sketch
  config.audit.sketch_dim = 4096  # k, the projected dimension (error ~ 1/sqrt(k))
  config.audit.sketch_seed = 0  # seed of the projection (signs and buckets)
  config.audit.top_contributors = 5  # per pair, the pairs pushing its ln pi(y+) down most
  config.audit.pair_chunk = 8  # per-pair gradients taken this many pairs at a time (memory: ~ 3 x chunk x subspace)
  config.audit.filter = (
      ml_collections.ConfigDict()
  )  # filtered.jsonl of the audited data (displacement_jax.score.filtering)
  config.audit.filter.mode = "none"  # 'none' | 'drop_highest_k' | 'drop_highest_fraction' (or any filtering.MODES)
  config.audit.filter.measure = "audit_others_fall"  # 'audit_fall' | 'audit_own_fall' | 'audit_others_fall'
  config.audit.filter.k = 0  # drop_highest_k: drop the k pairs predicted to fall most
  config.audit.filter.fraction = 0.0  # drop_highest_fraction: drop round(fraction * N) of them

  config.reference = ml_collections.ConfigDict()
  config.reference.cache = True  # cache reference log-probs on disk (npz) and reuse on a key match
  config.reference.cache_dir = ""  # '' = output_dir/reference_cache
  config.reference.batch_size = 0  # reference pass batch size (0 = batch_size // grad_accum)

  config.logprob_chunk_size = 128  # sequence chunk of the chunked LM head + log-softmax

  config.measures = ml_collections.ConfigDict()
  config.measures.include_eos = False  # scoring: edit distance / last hidden incl. the appended EOS

  config.distributed = ml_collections.ConfigDict()
  config.distributed.init_timeout = 300  # s: every process must join jax.distributed.initialize within this
  config.distributed.heartbeat_timeout = 100  # s: jax counts a silent process as dead, the others then abort
  config.distributed.shutdown_timeout = 300  # s: at exit a process waits this long for the others (jax's barrier)
  config.distributed.peer_timeout = 60  # s: another process without a heartbeat this long ends this one (0: off)

  config.debug = ml_collections.ConfigDict()
  config.debug.stop_after_steps = 0  # > 0: stop (after checkpointing) once this step is reached, to test resume
  config.debug.log_rows = False  # each process appends its batches' dataset rows to output_dir/rows_process<i>.jsonl

  return config
