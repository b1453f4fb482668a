"""The paper's experiment families as pipelines with `run(config)` (selected by `config.main`).

Entry points (nothing imports them; `python -m displacement_jax.train` hands them their config):
- `persona`: Section 3, single-token persona experiments (SFT, then single-prompt DPO/IPO per seed);
- `quantiles`: Section 5, DPO on quantile windows of CHES and baseline measures;
- `sorry_bench.pipeline`: Section 6, SORRY-Bench unalignment: sample, judge, label, train, re-judge.

What they (and configs/, report) share lives in library modules:
- `common`: deriving a pipeline stage's training config, result file names, the base models;
- `persona_data`: persona token lists and pairs, the SFT / DPO rows;
- `quantiles_plan`: measures, quantiles, seeds, the row sample and the training windows;
- `results`: the per-seed persona summary and the quantile aggregation over seeds (also used by report);
- `sorry_bench.{constants, generation, judge, labels, refusal}`: the Section 6 parts.
"""
