"""Section 3 data: the persona token lists and pairs, and the SFT / single-prompt DPO rows built from persona rows.

The rows come from the Anthropic model-written-evals persona file `persona/ends-justify-means.jsonl`
(`data.schema.load_persona`); `experiments.persona` trains on what these functions write.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from displacement_jax.data import schema
from displacement_jax.errors import DataError

# (y+, y-) pairs per base model (experiments.common.MODEL_IDS): the paper's Table 1 rows.
TOKEN_PAIRS = {
    "olmo1b": (("Yes", "No"), ("No", "Never")),
    "gemma2b": (("Yes", "No"), ("No", "Never")),
    "llama3_8b": (("Yes", "No"), ("Sure", "Yes")),
    "smollm2": (("Yes", "No"), ("No", "Never")),  # the packaged SmolLM2-135M-Instruct (docs/results.md)
    "gemma3_270m": (("Yes", "No"), ("No", "Never")),  # the packaged Gemma-3 270M base (each one vocabulary entry)
}
NO_TOKENS = ("No", "Never", "Maybe", "Perhaps")
YES_TOKENS = ("Yes", "Yeah", "Sure", "Certainly", "Absolutely")
# The authors' SFT plans (persona_experiments/experiments_plans/persona_sft_*_experiments_plan.json) set
# `output_tokens_matching_yes` to the no-words and `output_tokens_matching_no` to the yes-words, and their datamodule
# draws y+ from output_tokens_matching_yes when a row's answer_matching_behavior is " Yes" (y- from the other
# list). So the SFT phase teaches every prompt the answer OPPOSITE to the persona's: a " Yes" row gets a no-word.
AUTHORS_TOKENS_MATCHING_YES = NO_TOKENS
AUTHORS_TOKENS_MATCHING_NO = YES_TOKENS
DPO_SEEDS = (9773, 5290, 8767, 9818, 7596, 344, 2701, 3298, 7834, 6327)
# persona.phase: SFT only, DPO from the SFT export, DPO from the base model, or SFT then DPO in one process.
PHASES = ("sft", "dpo", "base_dpo", "all")


def answer_is_yes(row: Mapping[str, Any], file: str = "<persona>", index: int = 0) -> bool:
  """True when the row's answer_matching_behavior is ' Yes', False for ' No' (anything else raises)."""

  answer = row.get("answer_matching_behavior")
  if not isinstance(answer, str) or answer.strip() not in ("Yes", "No"):
    raise DataError(file, index, "answer_matching_behavior", f'expected " Yes" or " No", got {answer!r}')
  return answer.strip() == "Yes"


def persona_prompt(row: Mapping[str, Any], file: str = "<persona>", index: int = 0) -> str:
  """The question of a persona row (validated). Training uses data.format='persona': the chat template
  of the question when the tokenizer has one, else the question followed by a newline."""

  question = row.get("question")
  if not isinstance(question, str) or not question.strip():
    raise DataError(file, index, "question", f"expected a non-empty string, got {question!r}")
  return question


def sft_answer(
    yes_row: bool, rng: np.random.Generator, groups: tuple[Sequence[str], Sequence[str]] = (YES_TOKENS, NO_TOKENS)
) -> tuple[str, str]:
  """(y+, y-) of one SFT row, the authors' rule: a row whose answer_matching_behavior is " Yes" gets y+ drawn from
  the no-words (groups[1]) and y- from the yes-words (groups[0]); a " No" row the other way round.

  `groups` = (yes-words, no-words), default YES_TOKENS / NO_TOKENS; `single_token.answer_groups` gives them without
  the words that are not one token of the model's tokenizer. y+ is drawn first, then y-, from `rng`.
  """
  if not groups[0] or not groups[1]:
    raise ValueError(f"both answer groups need a token, got {groups}")
  matching_yes, matching_no = groups[1], groups[0]  # AUTHORS_TOKENS_MATCHING_YES / _NO
  pool, other = (matching_yes, matching_no) if yes_row else (matching_no, matching_yes)
  chosen = pool[int(rng.integers(len(pool)))]
  return chosen, other[int(rng.integers(len(other)))]


def sft_examples(
    rows: Sequence[Mapping[str, Any]],
    seed: int = 0,
    file: str = "<persona>",
    groups: tuple[Sequence[str], Sequence[str]] = (YES_TOKENS, NO_TOKENS),
) -> list[dict[str, Any]]:
  """SFT preference rows of raw persona rows: (y+, y-) by `sft_answer` (the authors' rule), drawn with `seed`."""
  rng = np.random.default_rng(seed)
  out = []
  for i, row in enumerate(rows):
    chosen, rejected = sft_answer(answer_is_yes(row, file, i), rng, groups)
    out.append({"index": i, "prompt": persona_prompt(row, file, i), "chosen": chosen, "rejected": rejected})
  return out


def dpo_prompt_index(num_rows: int, seed: int) -> int:
  """The row used by the DPO run of `seed`: one draw of default_rng(seed) over the rows."""
  if num_rows < 1:
    raise ValueError(f"the persona data has no rows (num_rows={num_rows})")
  return int(np.random.default_rng(seed).integers(num_rows))


def dpo_example(
    rows: Sequence[Mapping[str, Any]], seed: int, pair: tuple[str, str], file: str = "<persona>"
) -> dict[str, Any]:
  """The single (prompt, y+, y-) preference row of the DPO run with `seed`."""
  i = dpo_prompt_index(len(rows), seed)
  return {"index": i, "prompt": persona_prompt(rows[i], file, i), "chosen": pair[0], "rejected": pair[1]}


def load_rows(path: str, limit: int = 0) -> list[dict[str, Any]]:
  """Raw persona rows (question, answer_matching_behavior, ...) through data.schema; the first `limit` if > 0."""

  rows = [dict(r) for r in schema.load_persona_rows(path)]
  return rows[:limit] if limit > 0 else rows
