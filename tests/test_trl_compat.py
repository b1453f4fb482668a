"""TRL's data formats and tokenization rule (data.tokenization='trl'), checked on the real SmolLM2 chat template.

The reference is TRL's DPOTrainer rule (trl >= 0.29, trl/data_utils.py `_tokenize` / `extract_prompt`), written out
again here from its definition: conversational rows render prompt (with the generation prompt) and
prompt + response through the chat template and take the response as the ids after len(prompt); standard rows
append the EOS text unless present and tokenize prompt and prompt + response. trl itself is not imported.
"""

import json

import pytest

from displacement_jax.data import schema, tokenize
from displacement_jax.models.tokenizer import load_tokenizer
from displacement_jax.models import tiny

CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green, obviously."}],
    },
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}],
        "chosen": [{"role": "assistant", "content": "Seven."}],
        "rejected": [{"role": "assistant", "content": "Nine."}],
    },
]
STANDARD = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tok(request):
  return load_tokenizer("smollm2-135m-instruct") if request.param == "smollm2" else tiny.build_tiny_tokenizer()


def _trl_reference(tok, row):
  """TRL's rule from its definition (see the module docstring)."""
  if isinstance(row["prompt"], list):
    ids = lambda msgs, gen: list(
        tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
    )
    prompt = ids(row["prompt"], True)
    return prompt, [ids(row["prompt"] + row[k], False)[len(prompt) :] for k in ("chosen", "rejected")]
  prompt = tok(row["prompt"])["input_ids"]
  out = []
  for k in ("chosen", "rejected"):
    text = row[k] if row[k].endswith(tok.eos_token) else row[k] + tok.eos_token
    out.append(tok(row["prompt"] + text)["input_ids"][len(prompt) :])
  return prompt, out


def _ours(tok, row, tmp_path, name="rows.jsonl"):
  path = tmp_path / name
  path.write_text(json.dumps(row) + "\n")
  (example,) = schema.load_preference_data(str(path))
  return tokenize.tokenize_example(tok, example, tokenization="trl", max_length=512)


@pytest.mark.parametrize("row", CONVERSATIONAL + STANDARD)
def test_trl_tokenization_equals_trl_rule(tok, row, tmp_path):
  pair = _ours(tok, row, tmp_path)
  prompt, (chosen, rejected) = _trl_reference(tok, row)
  assert (pair.prompt_ids.tolist(), pair.chosen_ids.tolist(), pair.rejected_ids.tolist()) == (prompt, chosen, rejected)


def test_conversational_responses_end_like_the_template_turn(tmp_path):
  """On SmolLM2 (ChatML) the response ends with <|im_end|> and "\\n", the whole conversation's ids are
  prompt ++ response, and nothing is appended (so the baselines' "ids without EOS" are all of them)."""
  tok = load_tokenizer("smollm2-135m-instruct")
  row = CONVERSATIONAL[0]
  pair = _ours(tok, row, tmp_path)
  assert tok.convert_ids_to_tokens(pair.chosen_ids.tolist()[-2:]) == ["<|im_end|>", "Ċ"]
  full = list(tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"])
  assert pair.prompt_ids.tolist() + pair.chosen_ids.tolist() == full
  assert not pair.ends_with_eos("chosen") and pair.text_ids("chosen").tolist() == pair.chosen_ids.tolist()
  separate = tokenize.tokenize_example(
      tok, schema.load_preference_data(str(tmp_path / "rows.jsonl"))[0], format="chat_template", max_length=512
  )
  assert separate.chosen_ids.tolist()[-1] == tok.eos_token_id and separate.ends_with_eos("chosen")


def test_standard_rows_get_eos_once(tmp_path):
  tok = tiny.build_tiny_tokenizer()
  pair = _ours(tok, {"prompt": "a cat", "chosen": " sat" + tok.eos_token, "rejected": " ran"}, tmp_path)
  assert pair.chosen_ids.tolist().count(tok.eos_token_id) == 1 and pair.rejected_ids.tolist()[-1] == tok.eos_token_id
  assert pair.ends_with_eos("rejected")


@pytest.mark.parametrize(
    "row, want",
    [
        ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, ("The sky is", " blue.", " green.")),
        (
            {
                "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
            },
            (
                [{"role": "user", "content": "Hi"}],
                [{"role": "assistant", "content": "Hello!"}],
                [{"role": "assistant", "content": "Go away."}],
            ),
        ),
    ],
)
def test_implicit_prompt_is_extracted_as_trl_does(row, want, tmp_path):
  path = tmp_path / "implicit.jsonl"
  path.write_text(json.dumps(row) + "\n")
  (ex,) = schema.load_preference_data(str(path))
  assert (ex.prompt, ex.chosen, ex.rejected) == want


def test_implicit_prompt_without_shared_prefix_is_a_clear_error(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"chosen": "Yes", "rejected": "No"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl.*row 0.*prompt.*share no prefix"):
    schema.load_preference_data(str(path))
