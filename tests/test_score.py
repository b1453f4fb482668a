"""displacement_jax.score: CLI outputs vs direct CHES on the model's hidden states and a numpy loop of the paper.

One module-scoped CLI run (tiny Llama, tiny tokenizer, 7-row jsonl with varied lengths, 3-row batches,
quantile-window filter) is shared by most tests; the 8-device check runs one subprocess.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from displacement_jax import ches, runtime
from displacement_jax.score import filtering
from displacement_jax.score import main as score
from displacement_jax.score import outputs as score_outputs
from displacement_jax.score import core as scoring
from displacement_jax.data import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "score_tiny.py")
WORDS = (
    "the cat sat on a mat and then it ran to the big red door while a dog barked at birds in "
    "trees near our old house by the sea"
).split()


def _rows(n=7, seed=0):
  rng = np.random.default_rng(seed)
  text = lambda lo, hi: " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))
  return [{"prompt": text(2, 9), "chosen": text(1, 10), "rejected": text(1, 10)} for _ in range(n)]


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


def _argv(data_path, out_dir, *extra):
  return [
      "score",
      f"--config={CONFIG}",
      f"--config.data.path={data_path}",
      f"--config.output_dir={out_dir}",
      "--config.batch_size=3",
      "--config.data.max_length=48",
      "--config.progress=False",
      *extra,
  ]


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run1(tmp_path_factory):
  """One CLI run with a quantile-window filter; returns (data path, output dir, rows)."""
  d = tmp_path_factory.mktemp("score")
  rows = _rows()
  data = _write_jsonl(d / "pairs.jsonl", rows)
  out = d / "out"
  rc = score.main(
      _argv(data, out, "--config.filter.mode=quantile_window", "--config.filter.q=1.0", "--config.filter.window=3")
  )
  assert rc == 0
  return data, str(out), rows


@pytest.fixture(scope="module")
def scoring_setup(run1):
  """Model, params, tokenizer and examples exactly as the CLI built them."""
  from configs import score_tiny  # pylint: disable=g-import-not-at-top

  data, _, _ = run1
  config = score_tiny.get_config()
  config.data.path, config.data.max_length = data, 48
  loaded = runtime.load_model(config)
  examples = score.load_examples(config)
  return config, loaded, examples


def _hidden(loaded, ids_BT, mask_BT):
  fn = jax.jit(
      lambda p, i, m: loaded.model.apply({"params": p}, i, m, return_logits=False, return_hidden=True).hidden_BTD
  )
  return np.asarray(fn(loaded.params, jnp.asarray(ids_BT), jnp.asarray(mask_BT)), np.float32)


def test_outputs_written(run1):
  _, out, rows = run1
  scores = _read_jsonl(os.path.join(out, score_outputs.SCORES_FILE))
  assert [s["index"] for s in scores] == list(range(len(rows)))
  summary = json.load(open(os.path.join(out, score_outputs.SUMMARY_FILE)))
  assert summary["num_rows"] == len(rows)
  ln = np.array([s["ln_ches"] for s in scores])
  np.testing.assert_allclose(summary["ln_ches"]["mean"], ln.mean(), rtol=1e-6)
  np.testing.assert_allclose(summary["ln_ches"]["quantiles"]["0.5"], np.median(ln), rtol=1e-6)
  with open(os.path.join(out, score_outputs.HIST_FILE), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_scores_equal_direct_ches(run1, scoring_setup):
  """CLI scores (right padding, length buckets) == ches.* on the hidden states of one left-padded batch."""
  from displacement_jax.data import batching  # pylint: disable=g-import-not-at-top

  _, out, _ = run1
  config, loaded, examples = scoring_setup
  got = _read_jsonl(os.path.join(out, score_outputs.SCORES_FILE))
  pairs = scoring.tokenize_examples(examples, loaded.tokenizer, max_length=48, format=config.data.format)
  b = batching.collate(pairs, pad_id=loaded.tokenizer.pad_token_id or 0, padding_side="left", pad_to=48)
  h_pos = _hidden(loaded, b["chosen_input_ids_BT"], b["chosen_attention_mask_BT"])
  h_neg = _hidden(loaded, b["rejected_input_ids_BT"], b["rejected_attention_mask_BT"])
  masks = (b["chosen_loss_mask_BT"], b["rejected_loss_mask_BT"])
  direct = {
      "ches": ches.ches_scores(h_pos, h_neg, *masks),
      "ln_ches": ches.ches_scores(h_pos, h_neg, *masks, length_normalized=True),
      "last_hidden_inner_product": ches.last_hidden_inner_product(
          h_pos,
          h_neg,
          ches.without_last_position(b["chosen_attention_mask_BT"], b["chosen_ends_eos_B"]),
          ches.without_last_position(b["rejected_attention_mask_BT"], b["rejected_ends_eos_B"]),
      ),
  }
  for m, vals in direct.items():
    np.testing.assert_allclose([r[m] for r in got], np.asarray(vals), rtol=2e-5, atol=1e-3, err_msg=m)
  np.testing.assert_array_equal([r["chosen_len"] for r in got], b["chosen_loss_mask_BT"].sum(1))


def _edit_distance(a, b):
  """Textbook Levenshtein DP (independent of ches.levenshtein)."""
  dp = list(range(len(b) + 1))
  for i, t in enumerate(a, 1):
    prev, dp = dp, [i] + [0] * len(b)
    for j, u in enumerate(b, 1):
      dp[j] = min(prev[j] + 1, dp[j - 1] + 1, prev[j - 1] + (t != u))
  return dp[-1]


def _authors_inputs(tokenizer, example, max_length):
  """The authors' inputs of one row: prompt ids and each response's ids WITHOUT EOS, tokenized here directly
  (compute_preference_similarity_per_example.py: text_w = query + response, no EOS; edit distance on
  text_w[len(query):]; hidden states of text_w at len(query) - 1 ..; last hidden = the final position)."""
  prompt = tokenizer(f"<|prompter|>{example.prompt}<|assistant|>")["input_ids"]
  sides = {}
  for side in ("chosen", "rejected"):
    text = tokenizer(getattr(example, side), add_special_tokens=False)["input_ids"]
    sides[side] = text[: max_length - len(prompt)]
  return prompt, sides


def test_scores_equal_paper_definition_loop(run1, scoring_setup):
  """Every measure by hand on the authors' own inputs (the UNPADDED x ++ y without EOS), in float64:
  CHES/LN-CHES sum h at |x|-1 .. |x|+|y|-1 with |y| = text tokens + the EOS slot; the last-hidden inner product
  takes h at the last response token; the edit distance compares the response ids without EOS."""
  _, out, _ = run1
  config, loaded, examples = scoring_setup
  got = _read_jsonl(os.path.join(out, score_outputs.SCORES_FILE))
  assert config.data.format == "prompter_assistant"
  for example, row in zip(examples, got):
    prompt, texts = _authors_inputs(loaded.tokenizer, example, 48)
    sums, lens, last = {}, {}, {}
    for side in ("chosen", "rejected"):
      text = texts[side]
      ids = np.asarray(prompt + text, np.int32)
      h = _hidden(loaded, ids[None], np.ones((1, len(ids)), bool))[0].astype(np.float64)
      # A response that fits ends with EOS in our ids: its EOS slot is the state at the last text token, which
      # exists in the authors' input too; a cut response has no EOS slot.
      fits = len(prompt) + len(text) + 1 <= 48
      n_slots = len(text) if not fits else len(text) + 1
      sums[side] = h[len(prompt) - 1 : len(prompt) - 1 + n_slots].sum(axis=0)
      lens[side], last[side] = n_slots, h[-1]
    sp, sn = sums["chosen"], sums["rejected"]
    np.testing.assert_allclose(row["ches"], sp @ sn - sp @ sp, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(
        row["ln_ches"],
        sp @ sn / (lens["chosen"] * lens["rejected"]) - sp @ sp / lens["chosen"] ** 2,
        rtol=1e-4,
        atol=1e-3,
    )
    np.testing.assert_allclose(row["last_hidden_inner_product"], last["chosen"] @ last["rejected"], rtol=1e-4)
    assert (row["chosen_len"], row["rejected_len"]) == (lens["chosen"], lens["rejected"])
    a, b = texts["chosen"], texts["rejected"]
    assert row["minus_normalized_edit_distance"] == pytest.approx(-_edit_distance(a, b) / max(len(a), len(b)), rel=1e-6)


def test_measures_include_eos_variant(scoring_setup):
  """measures.include_eos=True: the edit distance on ids with EOS and the last-hidden state at the EOS position."""
  config, loaded, examples = scoring_setup
  pairs = scoring.tokenize_examples(examples[:4], loaded.tokenizer, max_length=48, format=config.data.format)
  kw = dict(batch_size=4, max_length=48, progress=False, pad_id=loaded.tokenizer.pad_token_id or 0)
  default = scoring.score_pairs(loaded.model, loaded.params, pairs, **kw)
  with_eos = scoring.score_pairs(loaded.model, loaded.params, pairs, measures_include_eos=True, **kw)
  for pair, a, b in zip(pairs, default, with_eos):
    assert pair.ends_with_eos("chosen") and pair.ends_with_eos("rejected")
    c, r = [int(t) for t in pair.chosen_ids], [int(t) for t in pair.rejected_ids]
    assert b["minus_normalized_edit_distance"] == pytest.approx(-_edit_distance(c, r) / max(len(c), len(r)), rel=1e-6)
    assert a["minus_normalized_edit_distance"] == pytest.approx(
        -_edit_distance(c[:-1], r[:-1]) / max(len(c) - 1, len(r) - 1), rel=1e-6
    )
    h = {
        side: _hidden(
            loaded,
            np.concatenate([pair.prompt_ids, getattr(pair, f"{side}_ids")])[None],
            np.ones((1, len(pair.prompt_ids) + len(getattr(pair, f"{side}_ids"))), bool),
        )[0]
        for side in ("chosen", "rejected")
    }
    np.testing.assert_allclose(b["last_hidden_inner_product"], h["chosen"][-1] @ h["rejected"][-1], rtol=1e-4)
    np.testing.assert_allclose(a["last_hidden_inner_product"], h["chosen"][-2] @ h["rejected"][-2], rtol=1e-4)
    assert (a["ches"], a["ln_ches"]) == (b["ches"], b["ln_ches"])


def test_bucketing_does_not_change_scores(scoring_setup):
  config, loaded, examples = scoring_setup
  kw = dict(batch_size=3, max_length=48, format=config.data.format, progress=False)
  bucketed = scoring.score_examples(loaded.model, loaded.params, config, loaded.tokenizer, examples, **kw)
  flat = scoring.score_examples(loaded.model, loaded.params, config, loaded.tokenizer, examples, bucketed=False, **kw)
  for a, b in zip(bucketed, flat):
    assert a["index"] == b["index"] and a["chosen_len"] == b["chosen_len"]
    for m in scoring.MEASURES:
      np.testing.assert_allclose(a[m], b[m], rtol=2e-5, atol=1e-4)
  lengths = [
      len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
      for p in scoring.tokenize_examples(examples, loaded.tokenizer, max_length=48, format=config.data.format)
  ]
  assert min(pad for _, pad in layout.plan_batches(lengths, 3, 48)) < 48  # buckets are really shorter


def test_plan_batches_and_bucket_length_hand():
  assert [layout.bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
  assert layout.bucket_length(100, 64) == 100  # a row longer than max_length is never cut here
  assert [layout.bucket_length(n, 1024) for n in (100, 129, 150, 192, 193, 1000)] == [128, 192, 192, 192, 256, 1024]
  plan = layout.plan_batches([5, 40, 3, 20, 18], 2, 64)
  assert [(r.tolist(), p) for r, p in plan] == [([2, 0], 16), ([4, 3], 32), ([1], 64)]
  assert [(r.tolist(), p) for r, p in layout.plan_batches([5, 40, 3], 2, 64, bucketed=False)] == [
      ([0, 1], 64),
      ([2], 64),
  ]


def test_filtered_outputs_are_exactly_the_selected_rows(run1):
  from displacement_jax.data import schema  # pylint: disable=g-import-not-at-top

  _, out, rows = run1
  scores = _read_jsonl(os.path.join(out, score_outputs.SCORES_FILE))
  expect = filtering.quantile_window([s["ln_ches"] for s in scores], 1.0, 3)  # the 3 highest LN-CHES
  record = json.load(open(os.path.join(out, score_outputs.FILTERED_INDICES_FILE)))
  assert record["indices_by_score"] == expect.tolist()
  assert record["indices"] == sorted(expect.tolist())
  filtered = _read_jsonl(os.path.join(out, score_outputs.FILTERED_FILE))
  assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in filtered] == [rows[i] for i in sorted(expect)]
  back = schema.load_preference_data(os.path.join(out, score_outputs.FILTERED_FILE))  # train can consume it
  assert [ex.chosen for ex in back] == [rows[i]["chosen"] for i in sorted(expect)]


def test_lowest_k_filter_in_library(run1):
  _, out, rows = run1
  results = _read_jsonl(os.path.join(out, score_outputs.SCORES_FILE))
  cfg = ml_collections.ConfigDict(
      {"mode": "lowest_k", "measure": "ches", "k": 2, "fraction": 0.0, "q": 0.5, "window": 512}
  )
  sel = score_outputs.select_rows(results, cfg)
  ches_vals = np.array([r["ches"] for r in results])
  assert sel.tolist() == np.argsort(ches_vals, kind="stable")[:2].tolist()


def test_eight_devices_equal_one_device(run1, tmp_path):
  data, out, _ = run1
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out8 = tmp_path / "out8"
  proc = subprocess.run(
      [sys.executable, "-m", "displacement_jax.score", *_argv(data, out8, "--config.mesh.data=8")[1:]],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  one, eight = _read_jsonl(os.path.join(out, score_outputs.SCORES_FILE)), _read_jsonl(
      os.path.join(out8, score_outputs.SCORES_FILE)
  )
  assert json.load(open(os.path.join(out8, score_outputs.SUMMARY_FILE)))["devices"] == 8
  assert [r["index"] for r in eight] == [r["index"] for r in one]
  for a, b in zip(one, eight):
    for m in scoring.MEASURES:
      np.testing.assert_allclose(b[m], a[m], rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({"prompt": "the cat", "rejected": "a dog"}, "chosen"),
        ({"prompt": "the cat", "chosen": "", "rejected": "a dog"}, "chosen"),
    ],
)
def test_bad_input_names_file_row_field(tmp_path, capsys, bad_row, field):
  rows = _rows(3, seed=1)
  rows.insert(2, bad_row)
  data = _write_jsonl(tmp_path / "bad.jsonl", rows)
  rc = score.main(_argv(data, tmp_path / "out"))
  err = capsys.readouterr().err
  assert rc == 1
  assert "bad.jsonl" in err and "row 2" in err and repr(field) in err, err


def test_bad_filter_config(run1, tmp_path, capsys):
  data, _, _ = run1
  rc = score.main(_argv(data, tmp_path / "o", "--config.filter.mode=highest"))
  assert rc == 1 and "config.filter.mode" in capsys.readouterr().err


def test_truncation_policy_is_honoured_and_counted(tmp_path, capsys):
  """data.truncation applies to scoring as to training: 'error' rejects an over-long pair (one line naming the
  file, row and field); 'truncate_response' cuts it and counts it in scores.jsonl and summary.json."""
  rows = _rows(3, seed=2)
  rows.insert(1, {"prompt": "the cat", "chosen": " ".join(["dog"] * 60), "rejected": "a bird"})
  data = _write_jsonl(tmp_path / "long.jsonl", rows)
  assert score.main(_argv(data, tmp_path / "err", "--config.data.truncation=error")) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "long.jsonl" in err[0] and "row 1" in err[0] and "'chosen'" in err[0], err
  assert score.main(_argv(data, tmp_path / "cut")) == 0
  got = _read_jsonl(os.path.join(tmp_path / "cut", score_outputs.SCORES_FILE))
  assert [(r["chosen_truncated"], r["rejected_truncated"]) for r in got] == [
      (False, False),
      (True, False),
      (False, False),
      (False, False),
  ]
  summary = json.load(open(os.path.join(tmp_path / "cut", score_outputs.SUMMARY_FILE)))
  assert summary["truncation"] == {"truncated_pairs": 1, "truncated_chosen": 1, "truncated_rejected": 0}


def test_score_rejects_both_model_sources(run1, tmp_path, capsys):
  """The shared config check: a model.path beside the config's model.tiny is an error, not a silent tiny run."""
  data, _, _ = run1
  assert score.main(_argv(data, tmp_path / "o", "--config.model.path=/some/real/model")) == 1
  assert "exactly one of config.model.path and config.model.tiny" in capsys.readouterr().err


def test_riskiest_rows_printed_written_and_the_filter_names_what_it_dropped(tmp_path, capsys):
  """Issue 30 item 2: the top-k riskiest pairs (row, scores, ranks, excerpts) on stdout and in risky.jsonl; the
  filter lists the rows it dropped; drop_highest_fraction drops exactly the riskiest."""
  rows = _rows(12, seed=3)
  data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
  out = tmp_path / "out"
  argv = _argv(data, out, "--config.filter.mode=drop_highest_fraction", "--config.filter.fraction=0.25")
  assert score.main([*argv, "--config.filter.top_k=3"]) == 0
  stdout = capsys.readouterr().out
  risky = _read_jsonl(out / "risky.jsonl")
  scores = _read_jsonl(out / "scores.jsonl")
  by_ln = sorted(scores, key=lambda r: -r["ln_ches"])
  assert [r["row"] for r in risky] == [r["index"] for r in by_ln[:3]]
  assert risky[0]["rank_ln_ches"] == 1 and risky[0]["ln_ches"] == by_ln[0]["ln_ches"]
  assert risky[0]["prompt"] == score_outputs.excerpt(rows[risky[0]["row"]]["prompt"])
  assert f"riskiest 3 of 12 pairs by ln_ches" in stdout
  assert f"  row {risky[0]['row']:>4}: LN-CHES " in stdout
  with open(out / "filtered_indices.json") as f:
    record = json.load(f)
  dropped = sorted(r["index"] for r in by_ln[:3])  # round(0.25 * 12) = 3 riskiest rows dropped
  assert record["dropped"] == dropped and record["num_selected"] == 9
  assert (
      f"kept 9 of 12 rows -> {out}/filtered.jsonl; dropped 3 (0-based rows): " + ", ".join(map(str, dropped)) in stdout
  )
  assert by_ln[3]["ln_ches"] < record["cutoff"] < by_ln[2]["ln_ches"]
  assert os.path.getsize(out / "ln_ches_hist.png") > 1000


def test_drop_highest_modes_are_the_complement_of_keeping_the_lowest():
  s = np.array([0.5, -1.0, 3.0, 2.0, 0.0])
  np.testing.assert_array_equal(filtering.select(s, "drop_highest_k", k=2), [1, 4, 0])
  np.testing.assert_array_equal(filtering.select(s, "drop_highest_fraction", fraction=0.4), [1, 4, 0])
  np.testing.assert_array_equal(filtering.select(s, "drop_highest_k", k=0), filtering.sort_order(s))
  with pytest.raises(ValueError, match="at least one row must stay"):
    filtering.select(s, "drop_highest_k", k=5)
  assert score_outputs.cutoff_of([{"x": v} for v in s], np.array([1, 4, 0]), "x") == 1.25
