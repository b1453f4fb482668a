"""Section 6: unintentional unalignment on SORRY-Bench, and how CHES filtering prevents it.

One job per module; `pipeline.run(config)` is the entry (`config.main = 'sorry_bench'`, configs/sorry.py):
- `constants`: the models, the judge, the methods (`VARIANTS`) and the judge's score values;
- `generation`: prompts -> decoded completions in batches (`make_generator`, default backend `generate.generate`);
- `judge`: the SORRY-Bench judge prompt, score parsing, the judge as a generator (text or '0'/'1' logits);
- `labels`: preference pairs from judged responses (refusal preferred, ties broken by PairRM or seeded coin
  flips), gold pairs from human judgments, the train/test split, the LN-CHES filter;
- `refusal`: refusal rates (share of parsable judge scores that are refusals);
- `pipeline`: sample, judge, label, split, train every method, re-judge; writes result.json.
"""
