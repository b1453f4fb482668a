"""Section 6 pipeline: sample, judge, label, train every method, re-judge (`run(config)`, an entry point).

`config.main = 'sorry_bench'` (configs/sorry.py); nothing imports this module.
0. with `sorry.refusal_sft.epochs` > 0: a refusing starting model first (`refusal_sft.run`: cross-entropy on the
   requests with the project's refusal texts, exported in HF format); every later step starts from it;
1. prompts: SORRY-Bench base prompts (450), split 85/15 train/test (seeded, `labels.train_test_split`);
2. sample two responses per prompt from the instruct model (T=1, 512 new tokens, chat template);
3. judge every response with the SORRY-Bench judge (greedy; score 1 = complied, 0 = refused); an
   unparsable judge output is counted and reported, never a crash;
4. label pairs: the refusal is preferred; ties are ordered by a tie-breaker (`labels`);
5. variants: `dpo` (beta 0.1, lr 5e-6), `dpo_sft` (+ SFT term), `gold` (pairs from the human judgments,
   lr 1e-6), `filtered` (the k=19 pairs with the lowest LN-CHES, `scoring.score_examples` + `filtering.lowest_k`);
6. refusal rate before and after training: share of responses (T=0.7) the judge scores as refusing;
7. ln pi(y+) and ln pi(y-) of every train pair before and after each method, summarised by the pair's kind
   (`labels.pair_kind`: two refusals, two compliances, or mixed) -- displacement where Section 6 expects it.
Outputs: `judged.jsonl`, `train.jsonl`, `test.jsonl`, `gold.jsonl`, `filtered.jsonl`, `<variant>/...` train runs
and `result.json` (read by `python -m displacement_jax.report sorry`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from displacement_jax import rundir, runtime
from displacement_jax.score import core as scoring
from displacement_jax.train import loop as training
from displacement_jax.data import schema
from displacement_jax.experiments import common, short_runs
from displacement_jax.experiments.sorry_bench import generation, judge as judge_lib, labels, refusal, refusal_sft
from displacement_jax.experiments.sorry_bench.constants import VARIANTS

TRAIN_SEED, TEST_SEED = 1000, 2000  # generation seeds of the refusal-rate responses on train / test prompts


def _log(msg: str) -> None:
  print(msg, flush=True)


@dataclasses.dataclass
class Split:
  """The labelled pairs split into train / test (positions into `pairs`) and the prompts of each side."""

  pairs: list[dict[str, Any]]
  train_pos: np.ndarray
  test_pos: np.ndarray
  train_pairs: list[dict[str, Any]]  # re-indexed 0..n_train-1, as written to train.jsonl
  train_path: str
  train_q: list[str]
  test_q: list[str]
  train_kinds: list[str]  # labels.pair_kind of each train pair


def load_prompts(path: str, limit: int = 0) -> list[dict[str, Any]]:
  """SORRY-Bench base prompts as dicts with 'question_id' and 'prompt' (data.schema loader)."""

  rows = [dict(r) for r in schema.load_sorry_prompts(path)]
  return rows[:limit] if limit > 0 else rows


def check_variants(variants: Sequence[str]) -> None:
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"sorry.variants entries must be in {VARIANTS}, got {v!r}")


def policy_generator(
    loaded: runtime.Loaded, params: Any, config: ml_collections.ConfigDict, sample_fn: generation.SampleFn | None
) -> generation.Generator:
  """The policy (`params` of the loaded model) as a Generator over user requests, formatted as in training."""
  sc = config.sorry
  return generation.make_generator(
      loaded.model,
      params,
      loaded.tokenizer,
      data_format=config.data.format,
      batch_size=int(sc.gen_batch_size),
      max_length=int(config.data.max_length) + int(sc.max_new_tokens),
      progress=bool(config.get("progress", True)),
      sample_fn=sample_fn,
  )


def judge_and_label(
    prompts: list[dict[str, Any]],
    samples: list[list[str]],
    judge: judge_lib.Judge,
    config: ml_collections.ConfigDict,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Steps 3-4: judge both responses of every prompt, label the pairs; writes judged.jsonl.

  Returns (pairs, summary: tie-breaker name, pair counts, refusal rate of the sampled responses).
  """
  sc = config.sorry
  questions = [p["prompt"] for p in prompts]
  n = len(questions)
  responses = list(zip(samples[0], samples[1]))
  flat_scores, judge_outputs = judge_lib.judge_responses(
      judge, questions * 2, samples[0] + samples[1], max_new_tokens=int(sc.judge_max_new_tokens)
  )
  scores = list(zip(flat_scores[:n], flat_scores[n:]))
  tie_breaker = labels.make_tie_breaker(str(sc.tie_breaker), int(config.seed), _log)
  pairs, counts = labels.label_pairs(questions, responses, scores, tie_breaker)
  sampled_refusal = refusal.refusal_rate(flat_scores)
  _log(f"sorry: {n} prompts, judge scores: {sampled_refusal}; pairs: {counts}")
  for r in pairs:
    r["meta"]["question_id"] = prompts[r["index"]].get("question_id", r["index"])
  schema.write_jsonl(
      os.path.join(config.output_dir, "judged.jsonl"),
      [
          {
              "question_id": p.get("question_id", i),
              "prompt": questions[i],
              "responses": list(responses[i]),
              "scores": list(scores[i]),
              "judge_outputs": [judge_outputs[i], judge_outputs[n + i]],
          }
          for i, p in enumerate(prompts)
      ],
  )
  if len(pairs) < 2:
    raise ValueError(
        f"only {len(pairs)} usable preference pairs from {n} prompts (counts {counts}); "
        "need at least 2 to split into train/test"
    )
  return pairs, {"tie_breaker": tie_breaker.name, "pair_counts": counts, "sampled_refusal": sampled_refusal}


def split_pairs(pairs: list[dict[str, Any]], config: ml_collections.ConfigDict) -> Split:
  """Step 1's split, on the labelled pairs; writes train.jsonl and test.jsonl."""
  sc, out_dir = config.sorry, config.output_dir
  train_pos, test_pos = labels.train_test_split(len(pairs), float(sc.test_fraction), int(sc.split_seed))
  train_pairs = [dict(pairs[i], index=j) for j, i in enumerate(train_pos)]
  train_path = schema.write_jsonl(os.path.join(out_dir, "train.jsonl"), train_pairs)
  schema.write_jsonl(os.path.join(out_dir, "test.jsonl"), [pairs[i] for i in test_pos])
  return Split(
      pairs=pairs,
      train_pos=train_pos,
      test_pos=test_pos,
      train_pairs=train_pairs,
      train_path=train_path,
      train_q=[pairs[i]["prompt"] for i in train_pos],
      test_q=[pairs[i]["prompt"] for i in test_pos],
      train_kinds=[labels.pair_kind(pairs[i]) for i in train_pos],
  )


@dataclasses.dataclass
class Measure:
  """ln pi(y+) / ln pi(y-) of the train pairs under any params (`short_runs.Session.logps`), and at the start."""

  session: short_runs.Session
  dataset: runtime.Dataset
  kinds: list[str]
  chosen_N: np.ndarray
  rejected_N: np.ndarray

  @classmethod
  def start(cls, session: short_runs.Session, split: Split) -> "Measure":
    dataset = session.dataset(split.train_pairs, "train_measured")
    return cls(session, dataset, split.train_kinds, *session.logps(session.params0, dataset))

  def change(self, params: Any) -> dict[str, dict[str, float]]:
    """Per kind ('all' and each `labels.PAIR_KINDS` present): n, ln pi(y+) at the start, `short_runs.summary`."""
    chosen_N, rejected_N = self.session.logps(params, self.dataset)
    kinds = np.asarray(self.kinds)
    out = {}
    for kind in ("all",) + labels.PAIR_KINDS:
      rows = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
      if rows.any():
        out[kind] = {
            "n": int(rows.sum()),
            "chosen_start_mean": float(np.mean(self.chosen_N[rows])),
            **short_runs.summary(chosen_N[rows] - self.chosen_N[rows], rejected_N[rows] - self.rejected_N[rows]),
        }
    return out


def gold_data(split: Split, config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
  """The gold method's data: human-judged pairs of the train prompts (all of them when none match)."""
  gold = labels.gold_pairs(labels.load_human_judgments(config.sorry.human_judgments_path))
  train_ids = {split.pairs[i]["meta"]["question_id"] for i in split.train_pos}
  in_train = [g for g in gold if g["meta"]["question_id"] in train_ids]
  gold = in_train or gold
  path = schema.write_jsonl(os.path.join(config.output_dir, "gold.jsonl"), gold)
  return path, {"n_gold_pairs": len(gold), "gold_restricted_to_train_prompts": bool(in_train)}


def filtered_data(
    split: Split, loaded: runtime.Loaded, config: ml_collections.ConfigDict
) -> tuple[str, dict[str, Any]]:
  """The filtered method's data: the `sorry.filter_k` train pairs with the lowest LN-CHES (initial model)."""
  sc = config.sorry
  examples = schema.load_preference_data(split.train_path)
  scored = scoring.score_examples(
      loaded.model,
      loaded.params,
      config,
      loaded.tokenizer,
      examples,
      batch_size=int(sc.gen_batch_size),
  )
  keep = labels.filtered_positions([r["ln_ches"] for r in scored], int(sc.filter_k))
  kept = [dict(split.train_pairs[int(i)], index=j) for j, i in enumerate(np.sort(keep))]
  path = schema.write_jsonl(os.path.join(config.output_dir, "filtered.jsonl"), kept)
  return path, {"n_filtered": len(kept), "filtered_ln_ches": [float(scored[int(i)]["ln_ches"]) for i in keep]}


def variant_overrides(variant: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a method changes in the training config: the SFT term (dpo_sft) or the learning rate (gold)."""
  if variant == "dpo_sft":
    return {"loss.sft_coeff": float(config.sorry.sft_coeff)}
  if variant == "gold":
    return {"optim.lr": float(config.sorry.gold_lr)}
  return {}


def train_variant(
    variant: str,
    split: Split,
    loaded: runtime.Loaded,
    judge: judge_lib.Judge,
    measure: Measure,
    config: ml_collections.ConfigDict,
    sample_fn: generation.SampleFn | None,
) -> dict[str, Any]:
  """Steps 5-6 for one method: its data, DPO from the initial model into <output_dir>/<variant>, re-judged."""
  data_path, extra = split.train_path, {}
  if variant == "gold":
    data_path, extra = gold_data(split, config)
  elif variant == "filtered":
    data_path, extra = filtered_data(split, loaded, config)
  with open(data_path) as f:
    n_rows = sum(1 for _ in f)
  trained = training.run(
      common.train_config(
          config, data_path, os.path.join(config.output_dir, variant), variant_overrides(variant, config), n_rows=n_rows
      )
  )
  tuned = policy_generator(loaded, trained.params, config, sample_fn)
  out = {
      "train": refusal.refusal_rates(tuned, judge, split.train_q, config, TRAIN_SEED),
      "test": refusal.refusal_rates(tuned, judge, split.test_q, config, TEST_SEED),
      "steps": int(trained.step),
      "n_pairs": n_rows,
      "train_logps": measure.change(trained.params),
      **extra,
  }
  _log(
      f'sorry: {variant}: refusal rate train {out["train"]["refusal_rate"]:.3f} '
      f'test {out["test"]["refusal_rate"]:.3f}'
  )
  return out


def run(config: ml_collections.ConfigDict, *, sample_fn: generation.SampleFn | None = None) -> dict[str, Any]:
  """The Section 6 pipeline (see module docstring); returns and writes result.json.

  `sample_fn` replaces the token-generation backend (default `generation.generate_sample_fn`).
  """
  sc = config.sorry
  check_variants(sc.variants)
  os.makedirs(config.output_dir, exist_ok=True)

  prompts = load_prompts(sc.prompts_path, int(sc.num_prompts))
  questions = [p["prompt"] for p in prompts]
  start_model = str(config.model.get("path") or config.model.get("tiny"))
  if int(sc.refusal_sft.epochs) > 0:  # a refusing starting model first (refusal_sft.py); all else starts from it
    config = common.derive(config, {"model.path": refusal_sft.run(questions, config, _log), "model.tiny": ""})
  session = short_runs.Session(config)
  loaded = session.loaded
  policy = policy_generator(loaded, loaded.params, config, sample_fn)
  samples = [
      policy(
          questions,
          temperature=float(sc.sample_temperature),
          max_new_tokens=int(sc.max_new_tokens),
          seed=int(config.seed) * 2 + k,
      )
      for k in range(2)
  ]
  judge = judge_lib.load_judge(config, sample_fn)
  pairs, labelling = judge_and_label(prompts, samples, judge, config)
  split = split_pairs(pairs, config)
  measure = Measure.start(session, split)

  result: dict[str, Any] = {
      "family": "sorry",
      "model": start_model,
      "refusal_sft": {**dict(sc.refusal_sft), "hf_dir": config.model.path} if int(sc.refusal_sft.epochs) > 0 else None,
      "judge": str(sc.judge_path or sc.judge_tiny),
      "tie_breaker": labelling["tie_breaker"],
      "seed": int(config.seed),  # the random tie-breaker's seed, and the sampling seeds' base
      "pair_counts": labelling["pair_counts"],
      "sampled_refusal": labelling["sampled_refusal"],
      "n_train": len(split.train_pos),
      "n_test": len(split.test_pos),
      "initial": {
          "train": refusal.refusal_rates(policy, judge, split.train_q, config, TRAIN_SEED),
          "test": refusal.refusal_rates(policy, judge, split.test_q, config, TEST_SEED),
      },
      "variants": {},
  }
  _log(f'sorry: initial refusal rate train {result["initial"]["train"]} test {result["initial"]["test"]}')
  for variant in sc.variants:
    result["variants"][variant] = train_variant(variant, split, loaded, judge, measure, config, sample_fn)
  rundir.write_json(os.path.join(config.output_dir, common.RESULT_FILE), result)
  return result
