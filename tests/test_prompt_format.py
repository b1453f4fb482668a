"""data.format='auto': the prompt format follows the tokenizer, so one model scores the same whichever way it is
named (issue 30, item 1), and the format and any vocabulary change are printed in one line and recorded."""

from __future__ import annotations

import json
import os

import pytest

from configs import score as score_config
from displacement_jax import runtime
from displacement_jax.score import main as score
from displacement_jax.data import tokenize
from displacement_jax.models import convert_gguf, packaged
from displacement_jax.models import tiny

MODEL = "smollm2-135m-instruct"


def test_auto_follows_the_chat_template():
  tok = tiny.build_tiny_tokenizer()
  assert tokenize.resolve_format("auto", tok) == "chat_template"
  tok.chat_template = None
  assert tokenize.resolve_format("auto", tok) == "prompter_assistant"
  assert tokenize.resolve_format("raw", tok) == "raw"


def test_auto_without_template_adds_the_markers_and_says_so(capsys):
  config = score_config.get_config(MODEL)
  config.model.path, config.model.tiny = "", "llama"
  loaded = runtime.load_model(config)
  assert loaded.identity["data_format"] == "chat_template" and loaded.identity["added_tokens"] == []
  assert loaded.setup_line.startswith(
      "prompt format: chat_template (the tokenizer's chat template); vocabulary unchanged"
  )
  assert runtime.prompt_format(config.data, _no_template(loaded.tokenizer)) == ("prompter_assistant", True)
  config.data.format = "chat_template"
  assert runtime.prompt_format(config.data, loaded.tokenizer) == ("chat_template", False)


def test_setup_line_names_a_vocabulary_change():
  line = runtime.setup_line("auto", "prompter_assistant", ["<|prompter|>", "<|assistant|>"], 512, 514)
  assert line == (
      "prompt format: prompter_assistant (the tokenizer has no chat template); vocabulary 512 -> 514 rows: added 2 "
      "token(s) <|prompter|>, <|assistant|> with a seeded random init"
  )


def _no_template(tok):
  tok.chat_template = None
  return tok


def test_same_scores_by_packaged_name_gguf_path_and_hf_dir(tmp_path, capsys):
  """The packaged SmolLM2 named three ways scores the same rows the same (to 1e-5), with the same printed format."""
  hf_dir = convert_gguf.convert(MODEL, str(tmp_path / "hf"))
  scores, lines = {}, {}
  for name, path in (("packaged", MODEL), ("gguf", packaged.resolve_gguf(MODEL)), ("hf", hf_dir)):
    config = score_config.get_config(path)
    config.output_dir = str(tmp_path / name)
    config.data.limit, config.data.max_length, config.progress = 6, 128, False
    capsys.readouterr()
    results = score.run(config)["results"]
    lines[name] = [l for l in capsys.readouterr().out.splitlines() if l.startswith("prompt format:")]
    scores[name] = [(r["index"], r["ches"], r["ln_ches"]) for r in results]
    with open(os.path.join(config.output_dir, "summary.json")) as f:
      summary = json.load(f)
    assert summary["format"] == "chat_template" and summary["added_tokens"] == []
  assert (
      lines["packaged"]
      == lines["gguf"]
      == lines["hf"]
      == ["prompt format: chat_template (the tokenizer's chat template); vocabulary unchanged (49152 rows)"]
  )
  for name in ("gguf", "hf"):
    for (i, c, l), (j, c2, l2) in zip(scores["packaged"], scores[name]):
      assert i == j
      assert c2 == pytest.approx(c, abs=1e-5, rel=1e-5) and l2 == pytest.approx(l, abs=1e-5, rel=1e-5), name
