"""Tokenize preference pairs: prompt and responses tokenized separately, EOS appended to each response.

Formats (the prompt side; responses are always the plain response text + EOS):
  raw                 the prompt text, tokenized with the tokenizer's special tokens (BOS when it adds one).
  prompter_assistant  "<|prompter|>{prompt}<|assistant|>" (Section 5 base-model format).
  chat_template       tokenizer.apply_chat_template(prompt messages, add_generation_prompt=True).
  persona             chat template of the question when the tokenizer has one, else question + "\\n".
  auto                chat_template when the tokenizer has a chat template, else prompter_assistant (the format
                      follows the tokenizer, so one model scores the same whichever way it is named).
Chat-message prompts in raw / prompter_assistant formats: raw joins the contents with "\\n";
prompter_assistant renders each user turn as <|prompter|>..., each assistant turn as <|assistant|>...

Truncation (`max_length` = prompt + response tokens of one side): a prompt that leaves no room for a
response token raises DataError(field "prompt"); a response that does not fit raises DataError (policy
"error") or is cut to the tokens that fit (policy "truncate_response", the EOS is then cut too) and
counted in the TruncationReport.
Single-token mode: each response is exactly one vocabulary entry looked up verbatim ("Yes", not "ĠYes"),
no EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from displacement_jax.data.schema import PreferenceExample
from displacement_jax.errors import DataError

FORMATS = ("raw", "prompter_assistant", "chat_template", "persona", "auto")
TRUNCATION_POLICIES = ("error", "truncate_response")
TOKENIZATIONS = ("separate", "trl")
PROMPTER, ASSISTANT = "<|prompter|>", "<|assistant|>"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedPair:
  """Token ids of one preference pair (int32 arrays); responses end with EOS except in single-token mode."""

  prompt_ids: np.ndarray
  chosen_ids: np.ndarray
  rejected_ids: np.ndarray
  index: int
  truncated: bool = False
  single_token: bool = False
  chosen_cut: bool = False  # the chosen response was truncated (its EOS was cut too)
  rejected_cut: bool = False
  eos_appended: bool = True  # False: the responses end as the chat template ends a turn (tokenization 'trl')

  def ends_with_eos(self, side: str) -> bool:
    """Whether `side`'s ids end with the EOS that tokenization appended (not cut, not single-token)."""
    return self.eos_appended and not self.single_token and not getattr(self, f"{side}_cut")

  def text_ids(self, side: str) -> np.ndarray:
    """`side`'s response token ids without the appended EOS (the authors' ids for the edit distance)."""
    ids = getattr(self, f"{side}_ids")
    return ids[:-1] if self.ends_with_eos(side) else ids

  @property
  def chosen_input_ids(self) -> np.ndarray:
    return np.concatenate([self.prompt_ids, self.chosen_ids])

  @property
  def rejected_input_ids(self) -> np.ndarray:
    return np.concatenate([self.prompt_ids, self.rejected_ids])

  @property
  def max_length(self) -> int:
    """Tokens of the longer side (prompt + response)."""
    return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclasses.dataclass
class TruncationReport:
  """Counts of a tokenization pass."""

  num_pairs: int = 0
  truncated_pairs: int = 0
  truncated_chosen: int = 0
  truncated_rejected: int = 0
  max_prompt_tokens: int = 0
  max_total_tokens: int = 0

  def add(self, pair: TokenizedPair, cut_chosen: bool, cut_rejected: bool) -> None:
    self.num_pairs += 1
    self.truncated_pairs += int(cut_chosen or cut_rejected)
    self.truncated_chosen += int(cut_chosen)
    self.truncated_rejected += int(cut_rejected)
    self.max_prompt_tokens = max(self.max_prompt_tokens, len(pair.prompt_ids))
    self.max_total_tokens = max(self.max_total_tokens, pair.max_length)


def resolve_format(format: str, tokenizer: Any) -> str:  # pylint: disable=redefined-builtin
  """The concrete format of `format`: 'auto' is 'chat_template' when the tokenizer has a chat template, else
  'prompter_assistant' (the paper's base-model format); any other format is itself."""
  if format != "auto":
    return format
  return "chat_template" if getattr(tokenizer, "chat_template", None) else "prompter_assistant"


def prompter_assistant_format(prompt: str | Sequence[Mapping[str, str]]) -> str:
  """ "<|prompter|>{prompt}<|assistant|>"; message lists render each turn with its marker."""
  if isinstance(prompt, str):
    return f"{PROMPTER}{prompt}{ASSISTANT}"
  parts = [(ASSISTANT if m["role"] == "assistant" else PROMPTER) + m["content"] for m in prompt]
  return "".join(parts) + ASSISTANT


def _messages(prompt: str | Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
  return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], source: str, index: int) -> list[int]:
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(source, index, "prompt", "format 'chat_template' but the tokenizer has no chat template")
  text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  return _encode(tokenizer, text, special=False)  # the template writes BOS itself


def prompt_ids(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    *,
    format: str = "raw",  # pylint: disable=redefined-builtin
    source: str = "",
    index: int = 0,
) -> list[int]:
  """Token ids of a formatted prompt (see the module docstring for the formats)."""
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  format = resolve_format(format, tokenizer)
  if format == "chat_template":
    return _chat_ids(tokenizer, _messages(prompt), source, index)
  if format == "persona":
    if getattr(tokenizer, "chat_template", None):
      return _chat_ids(tokenizer, _messages(prompt), source, index)
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    return _encode(tokenizer, text + "\n", special=True)
  if format == "prompter_assistant":
    return _encode(tokenizer, prompter_assistant_format(prompt), special=True)
  text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
  return _encode(tokenizer, text, special=True)


def persona_prompt_ids(tokenizer: Any, question: str) -> list[int]:
  """Section 3 input: the chat template of the question if the tokenizer has one, else question + "\\n"."""
  return prompt_ids(tokenizer, question, format="persona")


def _response_text(response: Any, source: str, index: int, field: str) -> str:
  text = response[-1]["content"] if isinstance(response, list) else response
  if not isinstance(text, str) or not text:
    raise DataError(source, index, field, f"expected a non-empty response string, got {text!r}")
  return text


def lookup_token(tokenizer: Any, token: str, *, source: str = "", index: int = 0, field: str = "chosen") -> int:
  """The id of the vocabulary entry spelled exactly `token` (no "▁"/"Ġ" added); DataError if absent."""
  vocab = tokenizer.get_vocab()
  if not isinstance(token, str) or token not in vocab:
    near = [t for t in ("▁" + str(token), "Ġ" + str(token), " " + str(token)) if t in vocab]
    hint = f" (the vocabulary has {near})" if near else ""
    raise DataError(source, index, field, f"{token!r} is not a single vocabulary entry{hint}")
  return int(vocab[token])


def _as_ids(ids: Sequence[int]) -> np.ndarray:
  return np.asarray(list(ids), np.int32).reshape(-1)


def tokenize_single_token(
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    chosen_token: str,
    rejected_token: str,
    *,
    format: str = "raw",
    index: int = 0,
    source: str = "",  # pylint: disable=redefined-builtin
    max_length: int | None = None,
) -> TokenizedPair:
  """Single-token mode: each response is one vocabulary entry looked up exactly; no EOS."""
  p = prompt_ids(tokenizer, prompt, format=format, source=source, index=index)
  if max_length is not None and len(p) + 1 > max_length:
    raise DataError(
        source,
        index,
        "prompt",
        f"the prompt has {len(p)} tokens; with the response token that " f"exceeds max_length={max_length}",
    )
  c = lookup_token(tokenizer, chosen_token, source=source, index=index, field="chosen")
  r = lookup_token(tokenizer, rejected_token, source=source, index=index, field="rejected")
  return TokenizedPair(_as_ids(p), _as_ids([c]), _as_ids([r]), int(index), False, True)


def _fit(
    ids: list[int], room: int, policy: str, source: str, index: int, field: str, max_length: int
) -> tuple[list[int], bool]:
  if len(ids) <= room:
    return ids, False
  if policy == "error":
    raise DataError(
        source,
        index,
        field,
        f"prompt + response is {len(ids) + max_length - room} tokens, more than "
        f"max_length={max_length} (use truncation='truncate_response' to cut responses)",
    )
  return ids[:room], True


def trl_ids(tokenizer: Any, ex: PreferenceExample, source: str) -> tuple[list[int], list[int], list[int], bool]:
  """(prompt, chosen, rejected ids, EOS appended) by TRL's DPOTrainer rule (trl >= 0.29, data_utils._tokenize).

  Conversational rows (any message list): prompt = chat template of the prompt messages with the generation
  prompt; prompt + response = chat template of prompt + response messages; the response is everything after
  len(prompt) (so it ends as the template ends a turn, e.g. ChatML's "<|im_end|>\\n"); no EOS is added.
  Standard rows (strings): EOS text appended to each response unless it already ends with it; prompt and
  prompt + response tokenized with the tokenizer's special tokens; the response is the ids after len(prompt).
  """
  conversational = any(isinstance(x, list) for x in (ex.prompt, ex.chosen, ex.rejected))
  out = []
  if conversational:
    as_messages = lambda x, role: [dict(m) for m in x] if isinstance(x, list) else [{"role": role, "content": x}]
    prompt = as_messages(ex.prompt, "user")
    if not getattr(tokenizer, "chat_template", None):
      raise DataError(source, ex.index, "prompt", "conversational rows need a tokenizer with a chat template")
    ids = lambda msgs, gen: _ids_of(tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))
    p = ids(prompt, True)
    for field in ("chosen", "rejected"):
      out.append(ids(prompt + as_messages(getattr(ex, field), "assistant"), False)[len(p) :])
    return p, out[0], out[1], False
  eos = tokenizer.eos_token
  p = _encode(tokenizer, ex.prompt, special=True)
  for field in ("chosen", "rejected"):
    text = getattr(ex, field)
    text = text if text.endswith(eos) else text + eos
    out.append(_encode(tokenizer, ex.prompt + text, special=True)[len(p) :])
  return p, out[0], out[1], True


def _ids_of(out: Any) -> list[int]:
  if isinstance(out, Mapping) or hasattr(out, "input_ids"):
    out = out["input_ids"]
  return [int(i) for i in out]


def _tokenize(
    tokenizer: Any,
    ex: PreferenceExample,
    *,
    format: str,
    max_length: int,
    truncation: str,  # pylint: disable=redefined-builtin
    single_token: bool,
    source: str | None,
    tokenization: str = "separate",
) -> tuple[TokenizedPair, bool, bool]:
  src = source if source is not None else (ex.source or "<examples>")
  if truncation not in TRUNCATION_POLICIES:
    raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
  if tokenization not in TOKENIZATIONS:
    raise ValueError(f"data.tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
    raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
  if single_token:
    chosen = _response_text(ex.chosen, src, ex.index, "chosen").strip()
    rejected = _response_text(ex.rejected, src, ex.index, "rejected").strip()
    pair = tokenize_single_token(
        tokenizer, ex.prompt, chosen, rejected, format=format, index=ex.index, source=src, max_length=max_length
    )
    return pair, False, False
  if tokenization == "trl":
    p, c_ids, r_ids, appended = trl_ids(tokenizer, ex, src)
  else:
    p = prompt_ids(tokenizer, ex.prompt, format=format, source=src, index=ex.index)
  if len(p) >= max_length:
    raise DataError(
        src,
        ex.index,
        "prompt",
        f"the prompt has {len(p)} tokens, leaving no room for a response " f"within max_length={max_length}",
    )
  eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError("the tokenizer has no eos_token_id; responses must end with EOS")
  room = max_length - len(p)
  sides = []
  for field in ("chosen", "rejected"):
    if tokenization == "trl":
      ids = c_ids if field == "chosen" else r_ids
      if not ids:
        raise DataError(
            src, ex.index, field, "empty response after TRL's tokenization (prompt + response adds nothing)"
        )
    else:
      ids = _encode(tokenizer, _response_text(getattr(ex, field), src, ex.index, field), special=False) + [int(eos)]
    sides.append(_fit(ids, room, truncation, src, ex.index, field, max_length))
  (c, cut_c), (r, cut_r) = sides
  pair = TokenizedPair(
      _as_ids(p),
      _as_ids(c),
      _as_ids(r),
      int(ex.index),
      cut_c or cut_r,
      chosen_cut=cut_c,
      rejected_cut=cut_r,
      eos_appended=tokenization != "trl" or appended,
  )
  return pair, cut_c, cut_r


def _order(a: Any, b: Any) -> tuple[Any, Any]:
  """(tokenizer, example) from either argument order."""
  is_ex = lambda x: isinstance(x, (PreferenceExample, Mapping))
  if is_ex(a) and not is_ex(b):
    return b, a
  return a, b


def _example(ex: Any) -> PreferenceExample:
  if isinstance(ex, PreferenceExample):
    return ex
  if isinstance(ex, Mapping):
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in ex]
    if missing:
      raise DataError(str(ex.get("source", "<examples>")), ex.get("index"), missing[0], "missing field")
    return PreferenceExample(
        int(ex.get("index", 0)),
        ex["prompt"],
        ex["chosen"],
        ex["rejected"],
        str(ex.get("source", "")),
        dict(ex.get("meta") or {}),
    )
  raise ValueError(f"expected a PreferenceExample or a mapping, got {type(ex).__name__}")


def tokenize_example(
    tokenizer: Any,
    ex: Any,
    *,
    format: str = "raw",
    max_length: int = 512,  # pylint: disable=redefined-builtin
    truncation: str = "truncate_response",
    single_token: bool = False,
    source: str | None = None,
    tokenization: str = "separate",
) -> TokenizedPair:
  """Tokenize one PreferenceExample (the arguments may also be given as (ex, tokenizer)).

  Prompt and responses are tokenized separately and concatenated; EOS ends each response; BOS only on the
  prompt when the tokenizer adds it. `source` names the file in errors (default: ex.source).
  """
  tokenizer, ex = _order(tokenizer, ex)
  pair, _, _ = _tokenize(
      tokenizer,
      _example(ex),
      format=format,
      max_length=max_length,
      truncation=truncation,
      single_token=single_token,
      source=source,
      tokenization=tokenization,
  )
  return pair


def tokenize_dataset(
    examples: Iterable[Any],
    tokenizer: Any,
    *,
    max_length: int = 512,
    format: str = "raw",  # pylint: disable=redefined-builtin
    truncation: str = "truncate_response",
    single_token: bool = False,
    source: str | None = None,
    progress: bool = False,
    tokenization: str = "separate",
) -> tuple[list[TokenizedPair], TruncationReport]:
  """Tokenize every example; returns the pairs and a TruncationReport (bad rows raise DataError)."""
  examples = list(examples)
  it: Iterable[Any] = examples
  if progress:
    it = tqdm(examples, desc="tokenize", leave=False)
  report, pairs = TruncationReport(), []
  for ex in it:
    pair, cut_c, cut_r = _tokenize(
        tokenizer,
        _example(ex),
        format=format,
        max_length=max_length,
        truncation=truncation,
        single_token=single_token,
        source=source,
        tokenization=tokenization,
    )
    report.add(pair, cut_c, cut_r)
    pairs.append(pair)
  return pairs, report


def check_vocab(tokenizer: Any, vocab_size: int, source: str = "tokenizer") -> None:
  """ValueError when the tokenizer can produce an id >= the model's vocab_size."""
  top = max(tokenizer.get_vocab().values()) if len(tokenizer) else -1
  top = max(top, len(tokenizer) - 1)
  if top >= vocab_size:
    raise ValueError(
        f"{source}: the tokenizer has token ids up to {top} ({len(tokenizer)} tokens) but the model "
        f"vocab_size is {vocab_size}; ids >= {vocab_size} would index outside the embedding"
    )


def check_pair_ids(pairs: Sequence[TokenizedPair], vocab_size: int, source: str = "<pairs>") -> None:
  """DataError naming the row and side of the first token id outside [0, vocab_size)."""
  for pair in pairs:
    for field, ids in (("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
      bad = ids[(ids < 0) | (ids >= vocab_size)]
      if bad.size:
        raise DataError(
            source, pair.index, field, f"token id {int(bad[0])} outside the model vocabulary " f"[0, {vocab_size})"
        )
