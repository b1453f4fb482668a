"""Tokenizers: loading (offline for local dirs), special tokens + embedding resize with a seeded init, chat templates.

New-token init (identical wherever the model is loaded, independent of the order tokens are added):
for a token string `s`, its embedding row is

    mean_rows(E) + std_rows(E) * z(seed, 'embed_tokens', s),     z ~ N(0, I_D)

where E is the original [V, D] embedding, mean/std are per-dim over all its rows (float32), and z comes from
`numpy.random.default_rng(SeedSequence([seed, tag, *sha256(s)[:16 bytes as 4 uint32]]))`. An untied LM head
gets a new column mean_cols(W) + std_cols(W) * z(seed, 'lm_head', s) the same way. The official code
initialised new tokens differently in scoring and training; this makes them agree.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from displacement_jax.models import gguf
from displacement_jax.models import packaged
from displacement_jax.models.config import ModelConfig

_TAGS = {"embed_tokens": 0, "lm_head": 1}


def cache_root() -> str:
  """Where converted artefacts are cached: $DISPLACEMENT_JAX_CACHE, else ~/.cache/displacement_jax."""
  return os.environ.get("DISPLACEMENT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "displacement_jax")


def gguf_metadata(gguf_path: str, string_arrays: Sequence[str] = ()) -> tuple[dict[str, Any], tuple[str, ...]]:
  """(metadata, tensor names) of a GGUF file as transformers' `read_gguf_metadata` gives them (string arrays as
  their length unless named in `string_arrays`), read with this package's reader (no torch)."""
  reader = gguf.open_reader(gguf_path)
  metadata = {
      key: len(value)
      if isinstance(value, list) and value and isinstance(value[0], str) and key not in string_arrays
      else value
      for key, value in reader.fields.items()
  }
  return metadata, tuple(t.name for t in reader.tensors)


def _provide_gguf_metadata_reader() -> None:
  """transformers reads a GGUF file's metadata with a module that imports torch, which the base install lacks:
  there, register `gguf_metadata` as that module's `read_gguf_metadata` (the tokenizer conversion itself is
  transformers' own, torch-free code), so a GGUF tokenizer loads the same with or without torch (tested)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  name = "transformers.integrations.gguf.reader"
  try:
    importlib.import_module(name)
  except ImportError:
    module = types.ModuleType(name, "displacement_jax stand-in: GGUF metadata without torch")
    module.read_gguf_metadata = gguf_metadata
    sys.modules[name] = module


def load_gguf_tokenizer(gguf_file: str) -> Any:
  """The tokenizer (with chat template) of a GGUF file via transformers' GGUF support, cached on disk.

  Converting the GGUF vocabulary takes ~15 s; the converted tokenizer is saved once under
  `cache_root()/gguf_tokenizers/<file name>-<key>` (key: path, size and mtime of the file), written to a
  temporary directory and renamed, so a half-written cache is never read.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  stat = os.stat(gguf_file)
  key = hashlib.sha256(f"{os.path.abspath(gguf_file)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
  cached = os.path.join(cache_root(), "gguf_tokenizers", f"{os.path.basename(gguf_file)}-{key}")
  if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
    return _without_local_kwargs(AutoTokenizer.from_pretrained(cached, local_files_only=True))
  where = dict(gguf_file=os.path.basename(gguf_file), local_files_only=True)
  try:
    try:
      tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_file)), **where)
    except ImportError:  # no torch (the base install): AutoTokenizer reads the GGUF config through torch
      from transformers.tokenization_utils_tokenizers import TokenizersBackend  # pylint: disable=g-import-not-at-top

      _provide_gguf_metadata_reader()  # the class AutoTokenizer picks, built by transformers' torch-free converter
      tok = TokenizersBackend.from_pretrained(os.path.dirname(os.path.abspath(gguf_file)), **where)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"load_tokenizer: cannot read the tokenizer of GGUF file {gguf_file}: {type(e).__name__}: {e}"
    ) from e
  tmp = f"{cached}.tmp{os.getpid()}"
  try:
    tok.save_pretrained(tmp)
    if os.path.exists(cached):
      shutil.rmtree(tmp)
    else:
      os.replace(tmp, cached)
  except OSError:  # a read-only or full cache costs speed, not correctness
    shutil.rmtree(tmp, ignore_errors=True)
  return _without_local_kwargs(tok)


def _without_local_kwargs(tokenizer: Any) -> Any:
  """Drop how this machine loaded the tokenizer (local_files_only, gguf_file) from what save_pretrained writes."""
  for key in ("local_files_only", "is_local", "gguf_file", "_from_auto", "_commit_hash"):
    getattr(tokenizer, "init_kwargs", {}).pop(key, None)
  return tokenizer


def load_tokenizer(path_or_hub_id: str, *, revision: str | None = None) -> Any:
  """An HF tokenizer via AutoTokenizer; a local directory is read offline (local_files_only).

  A packaged model name or a .gguf file gives the GGUF file's tokenizer (`load_gguf_tokenizer`).
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  path = os.fspath(path_or_hub_id)
  if packaged.is_gguf(path):
    return load_gguf_tokenizer(packaged.resolve_gguf(path))
  if os.path.isdir(path):
    try:
      return _without_local_kwargs(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as e:
      raise ValueError(f"load_tokenizer: could not load a tokenizer from local directory {path!r}: {e}") from e
  if os.path.exists(path):
    raise ValueError(
        f"load_tokenizer: {path!r} is a file; pass the directory that holds tokenizer.json / tokenizer_config.json"
    )
  try:
    return AutoTokenizer.from_pretrained(path, revision=revision)
  except (OSError, ValueError) as e:
    raise ValueError(
        f"load_tokenizer: {path!r} is not a local directory and could not be loaded from the Hugging Face hub "
        f"(offline and not cached?): {e}"
    ) from e


def token_normal(seed: int, tag: str, token: str, dim: int) -> np.ndarray:
  """The seeded N(0, I) vector [dim] (float32) of `token` for `tag` ('embed_tokens' or 'lm_head')."""
  digest = hashlib.sha256(token.encode("utf-8")).digest()
  words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
  rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _TAGS[tag], *words]))
  return rng.standard_normal(dim).astype(np.float32)


def _new_rows(matrix_VD: Any, tokens: Sequence[str], seed: int, tag: str) -> np.ndarray:
  """[len(tokens), D] float32 rows: per-dim mean + std * token_normal, stats over the rows of `matrix_VD`."""
  m = jnp.asarray(matrix_VD, jnp.float32)
  mean_D = np.asarray(jnp.mean(m, axis=0))
  std_D = np.asarray(jnp.std(m, axis=0))
  z = (
      np.stack([token_normal(seed, tag, t, m.shape[1]) for t in tokens])
      if tokens
      else np.zeros((0, m.shape[1]), np.float32)
  )
  return (mean_D[None] + std_D[None] * z).astype(np.float32)


def _resized(matrix_VD: Any, new_vocab: int, ids: Sequence[int], rows: np.ndarray) -> Any:
  """`matrix_VD` grown to [new_vocab, D] (zeros) with `rows` written at `ids`, in its own dtype."""
  m = jnp.asarray(matrix_VD)
  v, d = m.shape
  if new_vocab > v:
    m = jnp.concatenate([m, jnp.zeros((new_vocab - v, d), m.dtype)], axis=0)
  if len(ids):
    m = m.at[np.asarray(ids, np.int32)].set(jnp.asarray(rows, m.dtype))
  return m


def add_special_tokens_and_resize(
    tokenizer: Any,
    params: Mapping[str, Any],
    config: ModelConfig,
    *,
    tokens: Sequence[str] = ("<|prompter|>", "<|assistant|>"),
    pad_token: str | None = "<|pad|>",
    seed: int = 0,
) -> tuple[Any, dict[str, Any], ModelConfig]:
  """Add `tokens` (and `pad_token` if the tokenizer has no pad) and resize the embedding / untied LM head.

  Returns (new tokenizer, new params, new config); the inputs are not modified. Rows of pre-existing tokens are
  unchanged; rows of newly added tokens (and any row >= config.vocab_size) get the seeded init of the module
  docstring. The vocab grows to max(config.vocab_size, len(tokenizer)); config.pad_token_id follows the tokenizer.
  """
  if isinstance(tokens, str):
    raise ValueError(f"add_special_tokens_and_resize: tokens must be a sequence of strings, got the string {tokens!r}")
  for t in tokens:
    if not isinstance(t, str) or not t:
      raise ValueError(f"add_special_tokens_and_resize: every token must be a non-empty string, got {t!r}")
  wrapped = "params" in params and "embed_tokens" not in params
  p = dict(params["params"] if wrapped else params)
  if "embed_tokens" not in p:
    raise ValueError(f"add_special_tokens_and_resize: params has no 'embed_tokens' (keys: {sorted(p)})")
  emb_VD = p["embed_tokens"]["embedding"]
  if tuple(emb_VD.shape) != (config.vocab_size, config.hidden_size):
    raise ValueError(
        f"add_special_tokens_and_resize: embed_tokens/embedding has shape {tuple(emb_VD.shape)}, expected "
        f"(vocab_size, hidden_size) = {(config.vocab_size, config.hidden_size)} from config"
    )

  try:
    tok = copy.deepcopy(tokenizer)
  except Exception:  # pylint: disable=broad-except
    tok = tokenizer
  before = set(tok.get_vocab())
  tok.add_tokens(list(tokens), special_tokens=True)
  if pad_token is not None and tok.pad_token is None:
    tok.add_special_tokens({"pad_token": pad_token})
  added = [t for t in tok.get_vocab() if t not in before]

  old_v = config.vocab_size
  new_v = max(old_v, len(tok))
  init_ids = sorted({tok.convert_tokens_to_ids(t) for t in added} | set(range(old_v, new_v)))
  init_tokens = [tok.convert_ids_to_tokens(i) for i in init_ids]
  if any(t is None for t in init_tokens):
    bad = [i for i, t in zip(init_ids, init_tokens) if t is None]
    raise ValueError(f"add_special_tokens_and_resize: tokenizer has no token for ids {bad} (len(tokenizer)={len(tok)})")

  p["embed_tokens"] = dict(
      p["embed_tokens"],
      embedding=_resized(emb_VD, new_v, init_ids, _new_rows(emb_VD, init_tokens, seed, "embed_tokens")),
  )
  if not config.tie_word_embeddings:
    head_DV = p["lm_head"]["kernel"]
    cols = _new_rows(jnp.asarray(head_DV).T, init_tokens, seed, "lm_head")
    p["lm_head"] = dict(p["lm_head"], kernel=_resized(jnp.asarray(head_DV).T, new_v, init_ids, cols).T)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id
  new_config = config.replace(vocab_size=new_v, pad_token_id=pad_id)
  return tok, ({**params, "params": p} if wrapped else p), new_config


def apply_chat_template_ids(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> list[int]:
  """Token ids of `messages` rendered with the tokenizer's chat template."""
  if not getattr(tokenizer, "chat_template", None):
    name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    raise ValueError(f"apply_chat_template_ids: tokenizer {name!r} has no chat_template; use a prompt format instead")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"apply_chat_template_ids: messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
  out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
  if isinstance(out, Mapping) or hasattr(out, "input_ids"):
    out = out["input_ids"]
  return [int(i) for i in out]
