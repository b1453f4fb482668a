"""Tests of displacement_jax.data: loaders on the fixtures, tokenization, collation, iteration."""

from __future__ import annotations

import json
import os

import hypothesis
import numpy as np
import pytest

from displacement_jax.data import batching, schema, tokenize
from displacement_jax.errors import DataError
from displacement_jax.models import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
UF_DIR = os.path.join(FIX, "ultrafeedback_binarized")
AF_FILE = os.path.join(FIX, "alpaca_farm", "alpaca_human_preference", "preference.jsonl")
PERSONA = os.path.join(FIX, "persona", "ends-justify-means.jsonl")
SORRY_DIR = os.path.join(FIX, "sorry-bench-202406")
HUMAN_DIR = os.path.join(FIX, "sorry-bench-human-judgment-202406")
TINY_PREFS = os.path.join(ROOT, "displacement_jax", "assets", "tiny_preferences.jsonl")
PERSONA_DEMO = os.path.join(ROOT, "displacement_jax", "assets", "persona_demo.jsonl")


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def tok():
  return tiny.build_tiny_tokenizer()


@pytest.fixture(scope="module")
def pairs(tok):
  ex = schema.load_preference_data(TINY_PREFS)
  return tokenize.tokenize_dataset(ex, tok, max_length=48, format="prompter_assistant")[0]


# ------------------------------------------------------------------------------------------------ loaders


def test_ultrafeedback_parquet_split():
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  raw = pq.read_table(os.path.join(UF_DIR, "data", "train_prefs-00000-of-00001.parquet")).to_pylist()
  ex = schema.load_preference_data(UF_DIR)  # auto schema from the name, default split train_prefs
  assert len(ex) == len(raw) == 12
  for e, r in zip(ex[:11], raw[:11]):
    assert (e.prompt, e.chosen, e.rejected) == (r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"])
    assert e.meta["prompt_id"] == r["prompt_id"] and e.meta["score_chosen"] == r["score_chosen"]
  assert ex[11].prompt == raw[11]["chosen"][:-1] and len(ex[11].prompt) == 3  # multi-turn: messages kept
  assert [e.index for e in ex] == list(range(12))
  test = schema.load_preference_data(UF_DIR, split="test_prefs")
  assert len(test) == 4 and test[0].prompt == "Write one line about the forest."
  assert len(schema.load_preference_data(UF_DIR, split="train")) == 12  # generic default -> train_prefs
  with pytest.raises(DataError, match=r"split.*'dev'.*available: \['test_prefs', 'train_prefs'\]"):
    schema.load_preference_data(UF_DIR, split="dev")


def test_alpaca_farm_and_persona_and_generic():
  raw = read_jsonl(AF_FILE)
  ex = schema.load_preference_data(os.path.join(FIX, "alpaca_farm"))
  assert len(ex) == 12
  for e, r in zip(ex, raw):
    want_prompt = r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")
    chosen, rejected = (r["output_1"], r["output_2"]) if r["preference"] == 1 else (r["output_2"], r["output_1"])
    assert (e.prompt, e.chosen, e.rejected, e.meta["preference"]) == (want_prompt, chosen, rejected, r["preference"])
  assert sum(r["preference"] == 2 for r in raw) == 4  # both orders are exercised

  rows = schema.load_persona(PERSONA)
  raw = read_jsonl(PERSONA)
  assert [dict(r)["question"] for r in rows] == [r["question"] for r in raw]
  assert rows[0].answer_matching_behavior == raw[0]["answer_matching_behavior"]
  assert rows[0].matching == raw[0]["answer_matching_behavior"].strip()
  assert dict(rows[3])["label_confidence"] == raw[3]["label_confidence"]
  pex = schema.load_preference_data(PERSONA)  # persona schema inferred from the columns
  assert [(e.chosen, e.rejected) for e in pex] == [
      (r["answer_matching_behavior"].strip(), r["answer_not_matching_behavior"].strip()) for r in raw
  ]
  demo = schema.load_persona(PERSONA_DEMO)
  assert len(demo) == 60 and sum(r.matching == "Yes" for r in demo) == 30

  gen = schema.load_preference_data(TINY_PREFS, split="train")  # a single file ignores split
  raw = read_jsonl(TINY_PREFS)
  assert [(e.prompt, e.chosen, e.rejected) for e in gen] == [(r["prompt"], r["chosen"], r["rejected"]) for r in raw]


def test_subsampling_is_seeded():
  full = schema.load_preference_data(TINY_PREFS)
  a = schema.load_preference_data(TINY_PREFS, limit=5, seed=3)
  b = schema.load_preference_data(TINY_PREFS, limit=5, seed=3)
  c = schema.load_preference_data(TINY_PREFS, limit=5, seed=4)
  ia = [e.index for e in a]
  assert ia == [e.index for e in b] and ia == sorted(ia) and len(set(ia)) == 5
  assert ia != [e.index for e in c]
  want = np.sort(np.random.default_rng(3).choice(24, 5, replace=False)).tolist()
  assert ia == want and [e.prompt for e in a] == [full[i].prompt for i in want]
  sh = schema.load_preference_data(TINY_PREFS, shuffle=True, seed=1)
  assert sorted(e.index for e in sh) == list(range(24)) and [e.index for e in sh] != list(range(24))
  with pytest.raises(ValueError, match="limit"):
    schema.load_preference_data(TINY_PREFS, limit=0)


def test_hub_ids_go_through_datasets(monkeypatch):
  import datasets  # pylint: disable=g-import-not-at-top

  calls = []
  raw = read_jsonl(AF_FILE)[:3]
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or raw)
  ex = schema.load_preference_data("tatsu-lab/alpaca_farm")
  assert calls == [(("tatsu-lab/alpaca_farm", "alpaca_human_preference"), {"split": "preference"})]
  assert len(ex) == 3 and ex[0].source == "tatsu-lab/alpaca_farm:preference"
  calls.clear()
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  uf = pq.read_table(os.path.join(UF_DIR, "data", "train_prefs-00000-of-00001.parquet")).to_pylist()[:2]
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or uf)
  ex = schema.load_preference_data(schema.ULTRAFEEDBACK_ID, limit=1)
  assert calls == [(("HuggingFaceH4/ultrafeedback_binarized", None), {"split": "train_prefs"})] and len(ex) == 1
  calls.clear()
  persona = read_jsonl(PERSONA)[:4]
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or persona)
  ex = schema.load_preference_data(schema.PERSONA_ID)
  url = "hf://datasets/Anthropic/model-written-evals/persona/ends-justify-means.jsonl"
  assert calls == [(("json",), {"data_files": url, "split": "train"})]
  assert [(e.prompt, e.chosen, e.source) for e in ex] == [
      (r["question"], r["answer_matching_behavior"].strip(), url) for r in persona
  ]


def test_missing_path_and_bad_arguments():
  with pytest.raises(DataError, match="no such file or directory") as info:
    schema.load_preference_data(os.path.join(FIX, "nope.jsonl"))
  assert info.value.file.endswith("nope.jsonl")
  with pytest.raises(ValueError, match="schema must be one of"):
    schema.load_preference_data(TINY_PREFS, schema="hh-rlhf")
  with pytest.raises(DataError, match="unsupported file type"):
    schema.load_preference_data(os.path.join(ROOT, "setup.py"))


def test_sorry_loaders(tmp_path):
  raw = read_jsonl(os.path.join(SORRY_DIR, "question.jsonl"))
  base = schema.load_sorry_prompts(SORRY_DIR)
  assert [p["question_id"] for p in base] == [r["question_id"] for r in raw if r["prompt_style"] == "base"]
  assert len(base) == 7 and all(
      p["prompt"] == r["turns"][0] for p, r in zip(base, [r for r in raw if r["prompt_style"] == "base"])
  )
  assert len(schema.load_sorry_prompts(SORRY_DIR, prompt_style=None)) == 12
  raw = read_jsonl(os.path.join(HUMAN_DIR, "train.jsonl"))
  hj = schema.load_sorry_human_judgments(HUMAN_DIR)
  assert [(h["prompt"], h["response"], h["score"]) for h in hj] == [
      (r["turns"][0], r["response"], r["human_score"]) for r in raw
  ]
  fastchat = tmp_path / "judgments.jsonl"  # FastChat answer layout: choices[0]["turns"][0]
  with open(fastchat, "w") as f:
    for r in raw[:3]:
      row = {k: v for k, v in r.items() if k != "response"}
      f.write(json.dumps(dict(row, choices=[{"index": 0, "turns": [r["response"]]}])) + "\n")
  fc = schema.load_sorry_human_judgments(str(fastchat))
  assert [(h["response"], h["score"]) for h in fc] == [(r["response"], r["human_score"]) for r in raw[:3]]


BAD = [
    ("missing_chosen.jsonl", schema.load_preference_data, 2, "chosen", "missing field"),
    ("empty_response.jsonl", schema.load_preference_data, 1, "rejected", "empty"),
    ("non_string.jsonl", schema.load_preference_data, 0, "prompt", "expected a string, got int"),
    ("bad_messages.jsonl", schema.load_preference_data, 3, "prompt", "'role' and 'content'"),
    ("invalid_json.jsonl", schema.load_preference_data, 1, None, "invalid json"),
    ("bad_persona.jsonl", schema.load_persona, 1, "answer_matching_behavior", "' Maybe'"),
    ("bad_alpaca.jsonl", lambda p: schema.load_preference_data(p, schema="alpaca_farm"), 1, "preference", "got 3"),
    (
        "bad_ultrafeedback.jsonl",
        lambda p: schema.load_preference_data(p, schema="ultrafeedback"),
        1,
        "chosen",
        "last message must be the assistant",
    ),
    ("bad_sorry_judgment.jsonl", schema.load_sorry_human_judgments, 1, "human_score", "'high'"),
]


@pytest.mark.parametrize("name,loader,row,field,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_row_field(name, loader, row, field, msg):
  path = os.path.join(FIX, "bad", name)
  with pytest.raises(DataError, match=msg) as info:
    loader(path)
  e = info.value
  assert (e.file, e.row, e.field) == (path, row, field)
  assert path in str(e) and f"row {row}" in str(e)


# --------------------------------------------------------------------------------------------- tokenization


def test_tokenize_separately_with_eos(tok):
  ex = schema.PreferenceExample(7, "Say hi.", "Hi there", " bye", "mem")
  pair = tokenize.tokenize_example(tok, ex, max_length=64)
  enc = lambda s, sp: tok(s, add_special_tokens=sp)["input_ids"]
  assert pair.prompt_ids.tolist() == enc("Say hi.", True) and pair.prompt_ids[0] == tok.bos_token_id
  assert pair.chosen_ids.tolist() == enc("Hi there", False) + [tok.eos_token_id]
  assert pair.rejected_ids.tolist() == enc(" bye", False) + [tok.eos_token_id]
  assert pair.chosen_input_ids.tolist() == enc("Say hi.", True) + enc("Hi there", False) + [tok.eos_token_id]
  assert pair.index == 7 and not pair.truncated
  assert tokenize.tokenize_example(ex, tok, max_length=64).chosen_ids.tolist() == pair.chosen_ids.tolist()

  pa = tokenize.tokenize_example(tok, ex, format="prompter_assistant", max_length=64)
  assert tokenize.prompter_assistant_format("Say hi.") == "<|prompter|>Say hi.<|assistant|>"
  assert pa.prompt_ids.tolist() == enc("<|prompter|>Say hi.<|assistant|>", True)
  assert pa.prompt_ids[1] == tok.convert_tokens_to_ids("<|prompter|>")

  ct = tokenize.tokenize_example(tok, ex, format="chat_template", max_length=64)
  text = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=False)
  assert ct.prompt_ids.tolist() == enc(text, False) and ct.prompt_ids.tolist().count(tok.bos_token_id) == 1
  msg = schema.PreferenceExample(
      0,
      [{"role": "user", "content": "Say hi."}],
      [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there"}],
      "no",
      "mem",
  )
  ct2 = tokenize.tokenize_example(tok, msg, format="chat_template", max_length=64)
  assert ct2.prompt_ids.tolist() == ct.prompt_ids.tolist() and ct2.chosen_ids.tolist() == pair.chosen_ids.tolist()
  assert tokenize.persona_prompt_ids(tok, "Q?") == tokenize.prompt_ids(tok, "Q?", format="chat_template")
  tok_no_template = tiny.build_tiny_tokenizer()
  tok_no_template.chat_template = None
  assert tokenize.persona_prompt_ids(tok_no_template, "Q?") == enc("Q?\n", True)


def test_single_token_mode(tok):
  vocab = tok.get_vocab()
  pair = tokenize.tokenize_single_token(tok, "Q?", "Yes", "No")
  assert pair.chosen_ids.tolist() == [vocab["Yes"]] and pair.rejected_ids.tolist() == [vocab["No"]]
  assert vocab["Yes"] != vocab["ĠYes"] and pair.single_token
  ex = schema.load_preference_data(PERSONA)[0]  # chosen " Yes" -> "Yes" exactly
  p2 = tokenize.tokenize_example(tok, ex, single_token=True, max_length=128)
  assert p2.chosen_ids.tolist() == [vocab[ex.chosen]]
  with pytest.raises(DataError, match=r"'Nope' is not a single vocabulary entry") as info:
    tokenize.tokenize_single_token(tok, "Q?", "Yes", "Nope", source="f.jsonl", index=4)
  assert (info.value.row, info.value.field) == (4, "rejected")
  b = batching.collate([pair], pad_id=0)
  P = len(pair.prompt_ids)
  assert b["chosen_loss_mask_BT"][0].nonzero()[0].tolist() == [P - 1]  # last prompt position only
  assert b["chosen_labels_BT"][0, P - 1] == vocab["Yes"] and b["rejected_labels_BT"][0, P - 1] == vocab["No"]


def test_truncation_policy_and_report(tok):
  long = " ".join(["word"] * 30)
  ex = [
      schema.PreferenceExample(0, "Hi.", "Short.", long, "mem"),
      schema.PreferenceExample(1, "Hi.", long, long, "mem"),
      schema.PreferenceExample(2, "Hi.", "Ok.", "No.", "mem"),
  ]
  with pytest.raises(DataError, match="max_length=20") as info:
    tokenize.tokenize_dataset(ex, tok, max_length=20, truncation="error")
  assert (info.value.file, info.value.row, info.value.field) == ("mem", 0, "rejected")
  pairs, rep = tokenize.tokenize_dataset(ex, tok, max_length=20, truncation="truncate_response")
  assert (rep.num_pairs, rep.truncated_pairs, rep.truncated_chosen, rep.truncated_rejected) == (3, 2, 1, 2)
  assert rep.max_total_tokens == 20 and [p.truncated for p in pairs] == [True, True, False]
  full = tok(long, add_special_tokens=False)["input_ids"]
  room = 20 - len(pairs[0].prompt_ids)
  assert pairs[0].rejected_ids.tolist() == full[:room]  # as much as fits, EOS cut
  assert pairs[2].chosen_ids[-1] == tok.eos_token_id
  with pytest.raises(DataError, match="prompt has") as info:
    tokenize.tokenize_example(tok, schema.PreferenceExample(5, long, "a", "b", "p.jsonl"), max_length=10)
  assert (info.value.file, info.value.row, info.value.field) == ("p.jsonl", 5, "prompt")


def test_check_vocab(tok, pairs):
  tokenize.check_vocab(tok, tiny.TINY_VOCAB_SIZE)
  with pytest.raises(ValueError, match=r"vocab_size is 100"):
    tokenize.check_vocab(tok, 100, "tiny")
  tokenize.check_pair_ids(pairs, len(tok))
  with pytest.raises(DataError, match="outside the model vocabulary"):
    tokenize.check_pair_ids(pairs, 10)


# ----------------------------------------------------------------------------------------------- batching


def _expected_side(pair, side):
  resp = getattr(pair, f"{side}_ids").tolist()
  return pair.prompt_ids.tolist() + resp, len(pair.prompt_ids), len(resp)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collate_contract(pairs, padding_side):
  sub = pairs[:4]
  b = batching.collate(sub, pad_id=0, padding_side=padding_side, pad_to=48)
  assert b["index_B"].tolist() == [p.index for p in sub] and b["index_B"].dtype == np.int32
  for side in batching.SIDES:
    ids, attn, labels, loss = (b[f"{side}_{k}_BT"] for k in ("input_ids", "attention_mask", "labels", "loss_mask"))
    assert ids.shape == (4, 48) and ids.dtype == np.int32 and attn.dtype == bool and loss.dtype == bool
    for i, p in enumerate(sub):
      seq, P, R = _expected_side(p, side)
      off = 0 if padding_side == "right" else 48 - len(seq)
      assert ids[i, off : off + len(seq)].tolist() == seq and attn[i].sum() == len(seq)
      assert attn[i, off : off + len(seq)].all()
      assert loss[i].nonzero()[0].tolist() == list(range(off + P - 1, off + P + R - 1))
      assert labels[i][loss[i]].tolist() == seq[P:]  # response tokens, EOS included
      assert labels[i, off : off + len(seq) - 1].tolist() == seq[1:]
      assert (labels[i][~attn[i]] == 0).all()
  left = batching.collate(sub, pad_id=0, padding_side="left")
  right = batching.collate(sub, pad_id=0, padding_side="right")
  for k in ("input_ids", "labels", "loss_mask"):
    for side in batching.SIDES:
      for i in range(4):
        a = left[f"{side}_attention_mask_BT"][i]
        c = right[f"{side}_attention_mask_BT"][i]
        assert left[f"{side}_{k}_BT"][i][a].tolist() == right[f"{side}_{k}_BT"][i][c].tolist()
  with pytest.raises(ValueError, match="more than pad_to=8"):
    batching.collate(sub, pad_id=0, pad_to=8)
  with pytest.raises(ValueError, match="padding_side"):
    batching.collate(sub, pad_id=0, padding_side="middle")


def test_length_buckets(pairs):
  lengths = [batching.pair_length(p) for p in pairs]
  buckets = batching.length_buckets(pairs, [32, 40, 48])
  assert sorted(i for b in buckets for i in b) == list(range(len(pairs)))
  for b, lo, hi in zip(buckets, [0, 32, 40], [32, 40, 48]):
    assert all(lo < lengths[i] <= hi for i in b)
  with pytest.raises(ValueError, match="last bucket boundary 20"):
    batching.length_buckets(pairs, [10, 20])


def _run(it, n):
  return [next(it) for _ in range(n)]


def test_iterator_deterministic_covering_fixed_shapes(pairs):
  kw = dict(seed=5, shuffle=True, bucket_boundaries=[40, 48], pad_id=0)
  it = batching.BatchIterator(pairs, 5, **kw)
  a = _run(it, it.steps_per_epoch)
  b = _run(batching.BatchIterator(pairs, 5, **kw), it.steps_per_epoch)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  seen = np.concatenate([x["index_B"] for x in a])
  assert sorted(seen[seen >= 0].tolist()) == list(range(24))  # each row once per epoch; -1 = filler
  assert {x["chosen_input_ids_BT"].shape for x in a} <= {(5, 40), (5, 48)}
  for x in a:
    filler = x["index_B"] < 0
    assert not x["chosen_loss_mask_BT"][filler].any() and not x["rejected_loss_mask_BT"][filler].any()
  other = _run(batching.BatchIterator(pairs, 5, **dict(kw, seed=6)), it.steps_per_epoch)
  assert [x["index_B"].tolist() for x in a] != [x["index_B"].tolist() for x in other]
  e1 = _run(it, it.steps_per_epoch)  # the next epoch is a different order
  assert it.state() == {"epoch": 1, "step": it.steps_per_epoch}
  assert [x["index_B"].tolist() for x in e1] != [x["index_B"].tolist() for x in a]
  dl = batching.BatchIterator(pairs, 5, seed=0, drop_last=True, num_epochs=1)
  got = list(dl)
  assert len(got) == 4 and all(x["index_B"].shape == (5,) and (x["index_B"] >= 0).all() for x in got)
  assert got[0]["chosen_input_ids_BT"].shape[1] % 8 == 0


def test_iterator_resume_and_hosts(pairs):
  kw = dict(seed=2, bucket_boundaries=[40, 48])
  ref = batching.BatchIterator(pairs, 4, **kw)
  all_batches = _run(ref, ref.steps_per_epoch + 3)  # crosses an epoch boundary
  for k in (0, 3, ref.steps_per_epoch):
    it = batching.BatchIterator(pairs, 4, **kw)
    _run(it, k)
    resumed = batching.BatchIterator.from_state(json.loads(json.dumps(it.state())), pairs, 4, **kw)
    rest = _run(resumed, len(all_batches) - k)
    for x, y in zip(rest, all_batches[k:]):
      assert all(np.array_equal(x[key], y[key]) for key in x)
  hosts = [batching.BatchIterator(pairs, 4, process_index=i, process_count=2, **kw) for i in range(2)]
  for g in all_batches[:3]:
    parts = [next(h) for h in hosts]
    assert parts[0]["index_B"].shape == (2,)
    for key in g:
      assert np.array_equal(np.concatenate([p[key] for p in parts]), g[key]), key
  with pytest.raises(ValueError, match="divisible by process_count=3"):
    batching.BatchIterator(pairs, 4, process_count=3)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    hypothesis.strategies.lists(
        hypothesis.strategies.tuples(*(hypothesis.strategies.integers(1, 6),) * 3), min_size=1, max_size=4
    )
)
def test_collate_masks_property(lengths):
  """Random prompt/response lengths: loss mask = [P-1, P+R-1) relative to the first real token, any padding."""
  rng = np.random.default_rng(len(lengths))
  ps = [
      tokenize.TokenizedPair(*(rng.integers(3, 50, n).astype(np.int32) for n in lens), index=i)
      for i, lens in enumerate(lengths)
  ]
  right = batching.collate(ps, pad_id=0, padding_side="right", pad_to=16)
  left = batching.collate(ps, pad_id=0, padding_side="left", pad_to=16)
  for side, k in (("chosen", 1), ("rejected", 2)):
    for i, lens in enumerate(lengths):
      P, R = lens[0], lens[k]
      for b, off in ((right, 0), (left, 16 - P - R)):
        assert b[f"{side}_loss_mask_BT"][i].nonzero()[0].tolist() == list(range(off + P - 1, off + P + R - 1))
        assert (
            b[f"{side}_labels_BT"][i][b[f"{side}_loss_mask_BT"][i]].tolist() == getattr(ps[i], f"{side}_ids").tolist()
        )
