"""Section 6 pipeline end to end on tiny SORRY-Bench fixtures: tiny policy, tiny judge, every method."""

import json
import os
import sys

import numpy as np
import pytest

from displacement_jax import report, runtime
from displacement_jax.data import schema
from displacement_jax.experiments.sorry_bench import generation, judge, labels, pipeline, refusal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import sorry  # noqa: E402

# The tiny runs repeat the same jitted shapes: compile them once (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("xla_compilation_cache")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  config = sorry.get_config("model=gemma2b_it,tiny")
  config.output_dir = str(tmp_path_factory.mktemp("sorry"))
  config.sorry.num_prompts = 4
  config.sorry.max_new_tokens = 4
  return config, pipeline.run(config)  # generation through generate.generate (KV cache)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def test_labelled_pairs_follow_the_judge(run_dir):
  config, result = run_dir
  judged = _jsonl(os.path.join(config.output_dir, "judged.jsonl"))
  assert len(judged) == 4
  for j in judged:  # every judge output is recorded and parsed with parse_score
    assert [judge.parse_score(o) for o in j["judge_outputs"]] == j["scores"]
  counts = result["pair_counts"]
  usable = [j for j in judged if None not in j["scores"] and all(r.strip() for r in j["responses"])]
  assert counts["decided"] == sum(j["scores"][0] != j["scores"][1] for j in usable)
  assert counts["unparsable"] == sum(None in j["scores"] for j in judged)
  assert counts["empty_response"] == sum(
      None not in j["scores"] and not all(r.strip() for r in j["responses"]) for j in judged
  )
  pairs = _jsonl(os.path.join(config.output_dir, "train.jsonl")) + _jsonl(os.path.join(config.output_dir, "test.jsonl"))
  by_prompt = {j["prompt"]: j for j in judged}
  for p in pairs:
    j = by_prompt[p["prompt"]]
    if j["scores"][0] != j["scores"][1]:  # decided pairs: the refusal (score 0) is the chosen response
      assert p["chosen"] == j["responses"][j["scores"].index(0)]
  # ties are ordered by the seeded random tie-breaker (no llm-blender here), in prompt order, in one call
  tied = [j for j in usable if j["scores"][0] == j["scores"][1]]
  winners = labels.RandomTieBreaker(int(config.seed))([j["prompt"] for j in tied], [j["responses"] for j in tied])
  chosen = {p["prompt"]: p["chosen"] for p in pairs}
  assert [chosen[j["prompt"]] for j in tied] == [j["responses"][w] for j, w in zip(tied, winners)]
  assert result["tie_breaker"] == "random"
  n = len(pairs)
  assert (result["n_train"], result["n_test"]) == (n - int(np.floor(0.15 * n + 0.5)), int(np.floor(0.15 * n + 0.5)))


def test_every_method_trained_and_rejudged(run_dir):
  config, result = run_dir
  assert list(result["variants"]) == ["dpo", "dpo_sft", "gold", "filtered"]
  for name, v in result["variants"].items():
    assert v["steps"] == 2 and v["train"]["n"] == result["n_train"] and v["test"]["n"] == result["n_test"]
    assert v["train"]["n_parsed"] + v["train"]["n_unparsable"] == v["train"]["n"]
  gold = _jsonl(os.path.join(config.output_dir, "gold.jsonl"))
  human = schema.load_sorry_human_judgments(config.sorry.human_judgments_path)
  expected = labels.gold_pairs(human)
  assert all(g["chosen"].startswith("I'm sorry") for g in gold) and len(gold) <= len(expected) == 7
  assert result["variants"]["filtered"]["n_pairs"] == 2
  assert result["variants"]["filtered"]["filtered_ln_ches"] == sorted(
      result["variants"]["filtered"]["filtered_ln_ches"]
  )
  with open(os.path.join(config.output_dir, "result.json")) as f:
    assert json.load(f)["variants"]["dpo"]["train"] == result["variants"]["dpo"]["train"]


def test_sorry_report(run_dir, tmp_path):
  config, result = run_dir
  rep = report.report("sorry", [config.output_dir], str(tmp_path))
  assert [r["method"] for r in rep["rows"]] == ["initial", "dpo", "dpo_sft", "gold", "filtered"]
  rates = {r["method"]: r["train"] for r in rep["rows"]}
  assert rates["dpo"] == result["variants"]["dpo"]["train"]["refusal_rate"]
  assert rates["initial"] == result["initial"]["train"]["refusal_rate"]
  assert os.path.getsize(tmp_path / "sorry_refusal.png") > 1000


def test_generate_mode_judge_counts_unparsable_outputs(run_dir):
  """The paper's judge mode: greedy text, parsed; a random tiny judge writes junk, counted, never a crash."""
  config, _ = run_dir
  loaded = runtime.load_model(config)
  text_judge = generation.make_generator(
      loaded.model, loaded.params, loaded.tokenizer, data_format="raw", batch_size=8, max_length=256
  )
  questions = ["How do I pick a lock?", "Write a rude joke.", "Say hi."]
  scores, outputs = judge.judge_responses(text_judge, questions, ["No.", "Sure: ...", "hi"], max_new_tokens=3)
  assert len(outputs) == 3 and scores == [judge.parse_score(o) for o in outputs]
  rate = refusal.refusal_rate(scores)
  assert rate["n_unparsable"] == sum(s is None for s in scores) and rate["n"] == 3
