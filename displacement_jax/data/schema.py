"""Preference data: the `PreferenceExample` record and loaders for local files and the paper's HF datasets.

Sources: local jsonl (parsed line by line: `row` in errors = 0-based line index in the file), local
parquet / json files or directories (read with `datasets`; `row` = 0-based row of the split), HF hub ids
(`datasets.load_dataset`; `row` = 0-based row of the split). Schemas (adapters):

  generic        prompt, chosen, rejected: str or chat-message lists ([{"role", "content"}]); optional
                 index (int), meta (dict); other columns go to meta.
  ultrafeedback  HuggingFaceH4/ultrafeedback_binarized: prompt (str), chosen / rejected message lists whose
                 last message is the assistant response (default split train_prefs).
  alpaca_farm    tatsu-lab/alpaca_farm (alpaca_human_preference): instruction, input, output_1, output_2,
                 preference in {1, 2} (default split preference).
  persona        Anthropic model-written-evals persona: question, statement, label_confidence,
                 answer_matching_behavior (" Yes"/" No"), answer_not_matching_behavior.

Every bad row raises `DataError(file, row, field, message)`; nothing is silently dropped.
"""

from __future__ import annotations

import codecs
import collections.abc
import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from displacement_jax import rundir
from displacement_jax.errors import DataError

Text = str | list[dict[str, str]]

ULTRAFEEDBACK_ID = "HuggingFaceH4/ultrafeedback_binarized"
ALPACA_FARM_ID = "tatsu-lab/alpaca_farm"
ALPACA_FARM_CONFIG = "alpaca_human_preference"
PERSONA_ID = "Anthropic/model-written-evals"
SORRY_PROMPTS_ID = "sorry-bench/sorry-bench-202406"
SORRY_HUMAN_ID = "sorry-bench/sorry-bench-human-judgment-202406"
SCHEMAS = ("auto", "generic", "ultrafeedback", "alpaca_farm", "persona")
DEFAULT_SPLITS = {"ultrafeedback": "train_prefs", "alpaca_farm": "preference", "generic": "train", "persona": "train"}
ROLES = ("system", "user", "assistant")
_DATA_EXTS = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """One preference pair. prompt/chosen/rejected: str or chat-message lists; index = the row's `index` field (its
  source row without one); row = the 0-based row it was read from (None when not read from a file / dataset)."""

  index: int
  prompt: Text
  chosen: Text
  rejected: Text
  source: str = ""
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  row: int | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class PersonaRow(collections.abc.Mapping):
  """One persona row (answers keep their leading space, e.g. " Yes"); also a read-only Mapping."""

  index: int
  question: str
  statement: str
  label_confidence: float | None
  answer_matching_behavior: str
  answer_not_matching_behavior: str
  source: str = ""

  def __getitem__(self, key: str) -> Any:
    if key not in self._keys():
      raise KeyError(key)
    return getattr(self, key)

  def __iter__(self) -> Iterator[str]:
    return iter(self._keys())

  def __len__(self) -> int:
    return len(self._keys())

  @staticmethod
  def _keys() -> tuple[str, ...]:
    return (
        "index",
        "question",
        "statement",
        "label_confidence",
        "answer_matching_behavior",
        "answer_not_matching_behavior",
        "source",
    )

  @property
  def matching(self) -> str:
    """The answer matching the behaviour without its leading space ("Yes")."""
    return self.answer_matching_behavior.strip()

  @property
  def not_matching(self) -> str:
    return self.answer_not_matching_behavior.strip()


# ------------------------------------------------------------------------------------------ raw row readers


def _read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(0-based line index, object) per non-blank line. A UTF-8 byte-order mark at the start is skipped; invalid
  UTF-8 (naming the byte offset in the file), invalid json and non-objects raise DataError."""
  rows = []
  offset = 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f):
      start, offset = offset, offset + len(raw)
      if line_no == 0 and raw.startswith(codecs.BOM_UTF8):
        raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(
            path,
            line_no,
            None,
            f"invalid UTF-8 at byte offset {start + e.start} (byte 0x{raw[e.start]:02x}); the file must be UTF-8",
        ) from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(path, line_no, None, f"invalid json at column {e.colno}: {e.msg.removesuffix(' at')}") from None
      if not isinstance(obj, dict):
        raise DataError(path, line_no, None, f"expected a json object, got {type(obj).__name__}")
      rows.append((line_no, obj))
  return rows


def _split_files(directory: str, split: str | None) -> tuple[list[str], str]:
  """The data files of `split` inside a local dataset directory (HF hub layout or flat)."""
  files = sorted(f for ext in _DATA_EXTS for f in glob.glob(os.path.join(directory, "**", "*" + ext), recursive=True))
  if not files:
    raise DataError(directory, None, None, f"no {'/'.join(_DATA_EXTS)} data files in this directory")
  if split is None:
    if len(files) == 1:
      return files, ""
    raise DataError(
        directory,
        None,
        "split",
        f"several data files {[os.path.relpath(f, directory) for f in files]}; " "pass split=...",
    )
  name = lambda f: os.path.basename(f).split(".")[0]
  picked = [f for f in files if name(f) == split or name(f).startswith(split + "-")]
  if not picked:
    avail = sorted({name(f).split("-")[0] for f in files})
    raise DataError(directory, None, "split", f"no data files for split {split!r}; available: {avail}")
  return picked, split


def _read_with_datasets(files: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
  import datasets  # pylint: disable=g-import-not-at-top

  kind = "parquet" if files[0].endswith(".parquet") else "json"
  ds = datasets.load_dataset(kind, data_files=list(files), split="train")
  return list(enumerate(ds))


def _read_rows(
    path_or_id: str, split: str | None, hub_config: str | None = None
) -> tuple[list[tuple[int, dict[str, Any]]], str]:
  """Raw (row number, dict) rows and the name used in errors, from a file, directory or hub id."""
  path = os.fspath(path_or_id)
  if os.path.isfile(path):
    if path.endswith(".jsonl"):
      return _read_jsonl(path), path
    if path.endswith((".parquet", ".json")):
      return _read_with_datasets([path]), path
    raise DataError(path, None, None, f"unsupported file type; expected one of {_DATA_EXTS}")
  if os.path.isdir(path):
    files, _ = _split_files(path, split)
    if len(files) == 1 and files[0].endswith(".jsonl"):
      return _read_jsonl(files[0]), files[0]
    rows: list[tuple[int, dict[str, Any]]] = []
    if all(f.endswith(".jsonl") for f in files):  # several shards: concatenate, row = running index
      for f in files:
        rows += [(len(rows), r) for _, r in _read_jsonl(f)]
      return rows, path
    return _read_with_datasets(files), path
  if path.startswith((".", "/")) or path.endswith(_DATA_EXTS) or path.count("/") != 1:
    raise DataError(path, None, None, "no such file or directory (and not a hub id of the form owner/name)")
  import datasets  # pylint: disable=g-import-not-at-top

  try:
    ds = datasets.load_dataset(path, hub_config, split=split)
  except Exception as e:  # offline, unknown id, bad split: name what was asked for  # pylint: disable=broad-except
    raise DataError(
        path,
        None,
        None,
        f"not a local file or directory, and loading it as a hub dataset "
        f"(config {hub_config!r}, split {split!r}) failed: {type(e).__name__}: {e}",
    ) from e
  return list(enumerate(ds)), f"{path}:{split}"


# --------------------------------------------------------------------------------------------- validators


def _string(file: str, row: int, field: str, value: Any, *, allow_empty: bool = False) -> str:
  if value is None:
    raise DataError(file, row, field, "missing field")
  if not isinstance(value, str):
    raise DataError(file, row, field, f"expected a string, got {type(value).__name__}")
  if not allow_empty and not value.strip():
    raise DataError(file, row, field, "empty string")
  return value


def _messages(file: str, row: int, field: str, value: Any) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise DataError(file, row, field, f"expected a non-empty list of chat messages, got {type(value).__name__}")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise DataError(file, row, field, f"message {i} must be an object with 'role' and 'content', got {m!r}")
    if m["role"] not in ROLES:
      raise DataError(file, row, field, f"message {i} has role {m['role']!r}; expected one of {ROLES}")
    if not isinstance(m["content"], str):
      raise DataError(file, row, field, f"message {i} content must be a string, got {type(m['content']).__name__}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _text(file: str, row: int, field: str, value: Any) -> Text:
  """A str (non-empty) or a chat-message list."""
  if isinstance(value, list):
    msgs = _messages(file, row, field, value)
    if not any(m["content"].strip() for m in msgs):
      raise DataError(file, row, field, "all messages are empty")
    return msgs
  return _string(file, row, field, value)


def _response(file: str, row: int, field: str, value: Any) -> Text:
  """A response: a non-empty str, or messages whose last one is a non-empty assistant turn."""
  text = _text(file, row, field, value)
  if isinstance(text, list):
    if text[-1]["role"] != "assistant":
      raise DataError(
          file, row, field, f"the last message must be the assistant response, got role " f"{text[-1]['role']!r}"
      )
    if not text[-1]["content"].strip():
      raise DataError(file, row, field, "empty response")
  return text


# ---------------------------------------------------------------------------------------------- adapters


def implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
  """TRL's `extract_prompt` for rows without a "prompt": (prompt, chosen, rejected) split at the first element
  where chosen and rejected differ (messages for conversational rows, characters for strings, where a space
  just before the split goes to the responses)."""
  idx = 0
  for idx in range(min(len(chosen), len(rejected))):
    if chosen[idx] != rejected[idx]:
      if chosen[idx - 1] == " ":
        idx -= 1
      break
  return chosen[:idx], chosen[idx:], rejected[idx:]


def _generic(file: str, row: int, r: Mapping[str, Any]) -> PreferenceExample:
  if "prompt" not in r and "chosen" in r and "rejected" in r:  # TRL's implicit-prompt preference format
    raw_chosen = _text(file, row, "chosen", r.get("chosen"))
    raw_rejected = _text(file, row, "rejected", r.get("rejected"))
    if isinstance(raw_chosen, list) != isinstance(raw_rejected, list):
      raise DataError(file, row, "rejected", "chosen and rejected must both be strings or both message lists")
    prompt_value, chosen_value, rejected_value = implicit_prompt(raw_chosen, raw_rejected)
    if not prompt_value:
      raise DataError(file, row, "prompt", 'no "prompt" field and chosen/rejected share no prefix to use as one')
    r = dict(r, prompt=prompt_value, chosen=chosen_value, rejected=rejected_value)
  prompt = _text(file, row, "prompt", r.get("prompt"))
  chosen = _response(file, row, "chosen", r.get("chosen"))
  rejected = _response(file, row, "rejected", r.get("rejected"))
  index = r.get("index", row)
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
    raise DataError(file, row, "index", f"expected an integer, got {type(index).__name__}")
  meta = r.get("meta") or {}
  if not isinstance(meta, Mapping):
    raise DataError(file, row, "meta", f"expected an object, got {type(meta).__name__}")
  extra = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected", "index", "meta")}
  return PreferenceExample(int(index), prompt, chosen, rejected, file, {**extra, **dict(meta)})


def _ultrafeedback(file: str, row: int, r: Mapping[str, Any]) -> PreferenceExample:
  prompt = _string(file, row, "prompt", r.get("prompt"))
  chosen = _messages(file, row, "chosen", r.get("chosen"))
  rejected = _messages(file, row, "rejected", r.get("rejected"))
  for field, msgs in (("chosen", chosen), ("rejected", rejected)):
    _response(file, row, field, msgs)
  if chosen[:-1] != rejected[:-1]:
    raise DataError(file, row, "rejected", "the conversation before the response differs from 'chosen'")
  context = chosen[:-1]
  if not context:
    raise DataError(file, row, "chosen", "no user message before the assistant response")
  single = len(context) == 1 and context[0]["role"] == "user" and context[0]["content"] == prompt
  meta = {k: r[k] for k in ("prompt_id", "score_chosen", "score_rejected") if k in r}
  return PreferenceExample(
      row, prompt if single else context, chosen[-1]["content"], rejected[-1]["content"], file, meta
  )


def alpaca_prompt(instruction: str, input_text: str) -> str:
  """AlpacaFarm prompt text: the instruction, then the input after a blank line when there is one."""
  return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def _alpaca_farm(file: str, row: int, r: Mapping[str, Any]) -> PreferenceExample:
  instruction = _string(file, row, "instruction", r.get("instruction"))
  input_text = _string(file, row, "input", r.get("input", ""), allow_empty=True)
  out1 = _string(file, row, "output_1", r.get("output_1"))
  out2 = _string(file, row, "output_2", r.get("output_2"))
  pref = r.get("preference")
  if isinstance(pref, bool) or pref not in (1, 2):
    raise DataError(file, row, "preference", f"expected 1 or 2, got {pref!r}")
  chosen, rejected = (out1, out2) if int(pref) == 1 else (out2, out1)
  meta = {"preference": int(pref), **{k: r[k] for k in ("annotator_index", "batch_uuid") if k in r}}
  return PreferenceExample(row, alpaca_prompt(instruction, input_text), chosen, rejected, file, meta)


def _persona_row(file: str, row: int, r: Mapping[str, Any]) -> PersonaRow:
  question = _string(file, row, "question", r.get("question"))
  statement = _string(file, row, "statement", r.get("statement", ""), allow_empty=True)
  conf = r.get("label_confidence")
  if conf is not None and (isinstance(conf, bool) or not isinstance(conf, (int, float))):
    raise DataError(file, row, "label_confidence", f"expected a number, got {type(conf).__name__}")
  answers = []
  for field in ("answer_matching_behavior", "answer_not_matching_behavior"):
    a = _string(file, row, field, r.get(field))
    if a.strip() not in ("Yes", "No"):
      raise DataError(file, row, field, f'expected " Yes" or " No", got {a!r}')
    answers.append(a)
  if answers[0].strip() == answers[1].strip():
    raise DataError(file, row, "answer_not_matching_behavior", "equals answer_matching_behavior")
  return PersonaRow(row, question, statement, None if conf is None else float(conf), answers[0], answers[1], file)


def _persona_example(p: PersonaRow) -> PreferenceExample:
  meta = {"statement": p.statement, "label_confidence": p.label_confidence}
  return PreferenceExample(p.index, p.question, p.matching, p.not_matching, p.source, meta)


def _persona(file: str, row: int, r: Mapping[str, Any]) -> PreferenceExample:
  return _persona_example(_persona_row(file, row, r))


ADAPTERS: dict[str, Callable[[str, int, Mapping[str, Any]], PreferenceExample]] = {
    "generic": _generic,
    "ultrafeedback": _ultrafeedback,
    "alpaca_farm": _alpaca_farm,
    "persona": _persona,
}


def infer_schema(path_or_id: str, columns: Sequence[str] = ()) -> str:
  """The adapter for a dataset: from its id / path name, else from its columns."""
  name = os.fspath(path_or_id).lower()
  if "ultrafeedback" in name:
    return "ultrafeedback"
  if "alpaca_farm" in name or "alpacafarm" in name:
    return "alpaca_farm"
  if name == PERSONA_ID.lower():
    return "persona"
  cols = set(columns)
  if {"instruction", "output_1", "output_2", "preference"} <= cols:
    return "alpaca_farm"
  if {"question", "answer_matching_behavior"} <= cols:
    return "persona"
  if {"prompt", "chosen", "rejected", "prompt_id"} <= cols:
    return "ultrafeedback"
  return "generic"


def _subsample(n: int, limit: int | None, seed: int, shuffle: bool) -> list[int]:
  """Positions to keep: `limit` seeded random rows (kept in dataset order unless shuffle) or all rows."""
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
    raise ValueError(f"limit must be a positive int or None, got {limit!r}")
  rng = np.random.default_rng(seed)
  if limit is not None and limit < n:
    pos = np.sort(rng.choice(n, limit, replace=False))
  else:
    pos = np.arange(n)
  if shuffle:
    pos = rng.permutation(pos)
  return [int(p) for p in pos]


def load_preference_data(
    path_or_id: str | os.PathLike[str],
    *,
    split: str | None = None,
    schema: str = "auto",
    limit: int | None = None,
    seed: int = 0,
    shuffle: bool = False,
) -> list[PreferenceExample]:
  """Load and validate preference pairs from a local file / directory or an HF dataset id.

  split: the split (directory / hub); ignored for a single local file; None = the schema's default.
  schema: "auto" | "generic" | "ultrafeedback" | "alpaca_farm" | "persona".
  limit: keep `limit` rows drawn at random with `seed` (kept in dataset order); shuffle: permute (seeded).
  Every row is validated (all of them, before subsampling); a bad row raises DataError(file, row, field).
  """
  if schema not in SCHEMAS:
    raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
  path = os.fspath(path_or_id)
  named = schema if schema != "auto" else infer_schema(path)
  if os.path.isfile(path):
    split_arg = split
  else:
    split_arg = split or DEFAULT_SPLITS.get(named, "train")
    if os.path.isdir(path) and split is not None and named != "generic" and split == "train":
      # a config's generic default split; fall back to the schema's own default split when absent
      try:
        _split_files(path, split)
      except DataError:
        split_arg = DEFAULT_SPLITS.get(named, split)
  if path == PERSONA_ID and not os.path.exists(path):
    examples = [_persona_example(p) for p in load_persona(path)]
    return [examples[i] for i in _subsample(len(examples), limit, seed, shuffle)]
  hub_config = ALPACA_FARM_CONFIG if named == "alpaca_farm" and not os.path.exists(path) else None
  rows, file = _read_rows(path, split_arg, hub_config)
  if not rows:
    raise DataError(file, None, None, "no data rows")
  if schema == "auto":
    named = infer_schema(path, list(rows[0][1].keys()))
  adapter = ADAPTERS[named]
  examples = [dataclasses.replace(adapter(file, row, r), row=row) for row, r in rows]
  return [examples[i] for i in _subsample(len(examples), limit, seed, shuffle)]


def load_persona(
    path_or_id: str | os.PathLike[str] = PERSONA_ID, *, split: str | None = None, name: str = "ends-justify-means"
) -> list[PersonaRow]:
  """Persona rows (e.g. ends-justify-means.jsonl), validated; answers must be " Yes"/" No".

  A local file / directory, or the hub id Anthropic/model-written-evals (reads persona/<name>.jsonl).
  """
  path = os.fspath(path_or_id)
  if path == PERSONA_ID and not os.path.exists(path):
    import datasets  # pylint: disable=g-import-not-at-top

    url = f"hf://datasets/{PERSONA_ID}/persona/{name}.jsonl"
    rows, file = list(enumerate(datasets.load_dataset("json", data_files=url, split="train"))), url
  else:
    rows, file = _read_rows(path, split)
  if not rows:
    raise DataError(file, None, None, "no data rows")
  return [_persona_row(file, row, r) for row, r in rows]


load_persona_rows = load_persona


def _turns(file: str, row: int, r: Mapping[str, Any]) -> list[str]:
  turns = r.get("turns")
  if not isinstance(turns, list) or not turns:
    raise DataError(file, row, "turns", f"expected a non-empty list of strings, got {turns!r}")
  for i, t in enumerate(turns):
    _string(file, row, f"turns[{i}]", t)
  return list(turns)


def load_sorry_prompts(
    path_or_id: str | os.PathLike[str] = SORRY_PROMPTS_ID,
    *,
    split: str | None = None,
    prompt_style: str | None = "base",
) -> list[dict[str, Any]]:
  """SORRY-Bench prompts as dicts {row, question_id, category, prompt (= turns[0]), turns, prompt_style}.

  Keeps rows whose prompt_style is `prompt_style` (rows without the column count as "base"); None keeps all.
  """
  path = os.fspath(path_or_id)
  rows, file = _read_rows(path, split or ("train" if not os.path.exists(path) else None))
  out = []
  for row, r in rows:
    turns = _turns(file, row, r)
    style = r.get("prompt_style", "base")
    _string(file, row, "prompt_style", style)
    if prompt_style is not None and style != prompt_style:
      continue
    if r.get("question_id") is None:
      raise DataError(file, row, "question_id", "missing field")
    out.append(
        {
            "row": row,
            "question_id": r["question_id"],
            "category": r.get("category"),
            "prompt": turns[0],
            "turns": turns,
            "prompt_style": style,
        }
    )
  if not out:
    raise DataError(file, None, "prompt_style", f"no rows with prompt_style {prompt_style!r}")
  return out


def load_sorry_human_judgments(
    path_or_id: str | os.PathLike[str] = SORRY_HUMAN_ID, *, split: str | None = None
) -> list[dict[str, Any]]:
  """SORRY-Bench human judgments as dicts {row, question_id, category, prompt, response, score, model_id}.

  The response is the `response` column, or `choices[0]["turns"][0]` (FastChat answer layout);
  score = float(human_score) (1 = the model complied / was unsafe, 0 = refused).
  """
  path = os.fspath(path_or_id)
  rows, file = _read_rows(path, split or ("train" if not os.path.exists(path) else None))
  out = []
  for row, r in rows:
    turns = _turns(file, row, r)
    if "response" in r:
      response = _string(file, row, "response", r["response"])
    else:
      choices = r.get("choices")
      try:
        response = choices[0]["turns"][0]
      except (TypeError, KeyError, IndexError):
        raise DataError(file, row, "response", "missing: no 'response' column and no choices[0]['turns'][0]") from None
      response = _string(file, row, "choices", response)
    score = r.get("human_score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
      raise DataError(file, row, "human_score", f"expected a number, got {score!r}")
    if r.get("question_id") is None:
      raise DataError(file, row, "question_id", "missing field")
    out.append(
        {
            "row": row,
            "question_id": r["question_id"],
            "category": r.get("category"),
            "prompt": turns[0],
            "response": response,
            "score": float(score),
            "human_score": float(score),
            "model_id": r.get("model_id"),
        }
    )
  if not out:
    raise DataError(file, None, None, "no data rows")
  return out


def example_to_json(example: PreferenceExample) -> dict[str, Any]:
  """A PreferenceExample as a row of the generic preference jsonl schema (prompt/chosen/rejected/meta)."""
  row = {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}
  meta = dict(getattr(example, "meta", None) or {})
  meta.setdefault("source_index", int(example.index))
  if getattr(example, "source", None):
    meta.setdefault("source", example.source)
  row["meta"] = meta
  return row


def write_jsonl(path: str | os.PathLike[str], rows: Sequence[Any]) -> str:
  """Write dicts (as they are) or PreferenceExamples (`example_to_json`) one JSON object per line, atomically
  (rundir.write_jsonl); returns path."""
  return rundir.write_jsonl(
      os.fspath(path), (dict(row) if isinstance(row, Mapping) else example_to_json(row) for row in rows)
  )
