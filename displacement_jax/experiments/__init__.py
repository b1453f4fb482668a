"""The paper's experiment families as pipelines with `run(config)` (selected by `config.main`).

- `persona`: Section 3, single-token persona experiments (SFT, then single-prompt DPO/IPO per seed).
- `quantiles`: Section 5, DPO on quantile windows of CHES and baseline measures.
- `sorry_bench`: Section 6, SORRY-Bench unalignment: sample, judge, label, train, re-judge.
"""
