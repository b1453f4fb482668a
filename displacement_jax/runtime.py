"""What every entry point loads: the policy (model, params, tokenizer, special tokens) and the tokenized pairs.

Train, score, the demo and the experiments all go through `load_model` and `load_data`, so a model or a data
file is read, resized and checked the same way wherever it is used; and through `batched_pass`, the batched
jitted pass (plan -> batches -> device -> host, with a progress bar) of the reference pass, scoring and experiments.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from displacement_jax import models
from displacement_jax.data import batching, packing, schema, tokenize
from displacement_jax.data import checks as data_checks
from displacement_jax.data.layout import pad_id_of
from displacement_jax.models import lora, packaged, peft_io
from displacement_jax.models import tokenizer as tokenizer_lib
from displacement_jax.models import tiny


@dataclasses.dataclass
class Loaded:
  """A model ready to use: flax module, initial params, ModelConfig, tokenizer and its identity."""

  model: Any
  params: Any
  model_config: Any
  tokenizer: Any
  identity: dict[str, Any]
  setup_line: str = ""  # the prompt format and any vocabulary change, printed once at start (`setup_line`)
  lora: Any = None  # LoRA training (train.lora.Adapters): the base params the adapters apply to, and their settings


def load_tokenizer(config: ml_collections.ConfigDict) -> Any:
  """The tokenizer `load_model` gives (before any special tokens are added), without loading the weights."""
  mc = config.model
  if mc.get("tokenizer"):
    return tokenizer_lib.load_tokenizer(mc.tokenizer)
  return tiny.build_tiny_tokenizer() if mc.get("tiny") else tokenizer_lib.load_tokenizer(mc.path)


def load_model(config: ml_collections.ConfigDict, mesh: Any = None) -> Loaded:
  """Tiny random model (`model.tiny`) or a checkpoint (`model.path`: packaged name, .gguf, HF dir, hub id),
  its tokenizer, and the special tokens of `data.add_special_tokens`."""
  mc = config.model
  dtype, param_dtype, remat = mc.dtype, mc.get("param_dtype") or mc.dtype, bool(mc.get("remat", False))
  freeze_pad = bool(mc.get("freeze_pad_embedding", False))
  if mc.get("tiny"):
    tokenizer = load_tokenizer(config)
    hf_config = tiny.tiny_hf_config(
        mc.tiny, **({"vocab_size": int(mc.tiny_vocab_size)} if mc.get("tiny_vocab_size") else {})
    )
    model_config = models.ModelConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat)
    model = models.Transformer(model_config)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(lambda k: model.init(k, ids, jnp.ones((1, 4), bool))["params"])(jax.random.key(int(mc.seed)))
    identity = {"tiny": mc.tiny, "hf_config": hf_config, "seed": int(mc.seed)}
  else:
    model, params, model_config = models.load(
        mc.path,
        dtype=dtype,
        param_dtype=param_dtype,
        mesh=mesh,
        remat=remat,
        progress=bool(config.get("progress", True)),
    )
    tokenizer = load_tokenizer(config)
    identity = {"path": os.path.abspath(mc.path) if os.path.exists(mc.path) else mc.path}
    if packaged.is_gguf(mc.path):  # a packaged name: the file it resolves to and its size identify the weights
      file = packaged.resolve_gguf(mc.path)
      identity.update(file=os.path.abspath(file), file_size=os.path.getsize(file))
  identity.update(
      dtype=dtype, param_dtype=param_dtype, tokenizer=mc.get("tokenizer") or "", tokenizer_vocab=len(tokenizer)
  )
  data_format, special = prompt_format(config.data, tokenizer)
  vocab_before, old_vocab = model_config.vocab_size, set(tokenizer.get_vocab())
  if special:
    tokenizer, params, model_config = tokenizer_lib.add_special_tokens_and_resize(
        tokenizer, params, model_config, seed=int(config.seed)
    )
    model = models.Transformer(model_config)
    identity["special_tokens_seed"] = int(config.seed)
  added = sorted(set(tokenizer.get_vocab()) - old_vocab, key=tokenizer.convert_tokens_to_ids)
  identity.update(data_format=data_format, added_tokens=added, vocab_size=model_config.vocab_size)
  line = setup_line(config.data.get("format", "raw"), data_format, added, vocab_before, model_config.vocab_size)
  if freeze_pad:  # HF/TRL behaviour: the pad token's input-embedding row gets no gradient from lookups
    model_config = model_config.replace(freeze_pad_embedding=True)
    model = models.Transformer(model_config)
    identity["freeze_pad_embedding"] = True
  adapter_dir = mc.lora.get("path") if mc.get("lora") else ""
  if adapter_dir:  # a PEFT LoRA directory: the model applies it (train.lora.attach splits it off for training)
    adapters, model_config = peft_io.load_adapter(adapter_dir, model_config)
    params = lora.combine(params, jax.tree.map(jnp.asarray, adapters))
    model = models.Transformer(model_config)
    identity["lora_adapter"] = os.path.abspath(adapter_dir)
  tokenize.check_vocab(
      tokenizer,
      model_config.vocab_size,
      source=f'tokenizer/model vocabulary mismatch (model {mc.get("path") or mc.get("tiny")!r}, '
      f'tokenizer {mc.get("tokenizer") or "of the model"!r})',
  )
  return Loaded(model, params, model_config, tokenizer, identity, line)


def prompt_format(data_config: ml_collections.ConfigDict, tokenizer: Any) -> tuple[str, bool]:
  """(concrete format, add special tokens): data.format 'auto' follows the tokenizer (its chat template when it
  has one, else the paper's `<|prompter|>...<|assistant|>` format, whose markers are then added as tokens);
  any other format is taken as given, with the tokens of data.add_special_tokens."""
  requested = data_config.get("format", "raw")
  data_format = tokenize.resolve_format(requested, tokenizer)
  special = bool(data_config.get("add_special_tokens"))
  return data_format, special or (requested == "auto" and data_format == "prompter_assistant")


def setup_line(requested: str, data_format: str, added: Sequence[str], vocab_before: int, vocab_after: int) -> str:
  """One line: the prompt format (and why, for 'auto') and the vocabulary change, if any."""
  why = ""
  if requested == "auto":
    why = (
        " (the tokenizer's chat template)"
        if data_format == "chat_template"
        else " (the tokenizer has no chat template)"
    )
  vocab = f"vocabulary unchanged ({vocab_after} rows)"
  if added or vocab_after != vocab_before:
    vocab = (
        f"vocabulary {vocab_before} -> {vocab_after} rows: added {len(added)} token(s) {', '.join(added)} with a "
        "seeded random init"
    )
  return f"prompt format: {data_format}{why}; {vocab}"


@dataclasses.dataclass
class Dataset:
  """Tokenized preference pairs, the truncation report, the pad id, row index -> position in `pairs`, and the
  suspicious rows (data.checks: chosen == rejected, duplicates) that train warns about."""

  pairs: list[Any]
  truncation: dict[str, Any]
  pad_id: int
  position_of: dict[int, int]
  checks: data_checks.DataChecks = dataclasses.field(default_factory=data_checks.DataChecks)
  path: str = ""  # config.data.path it was loaded from


def load_data(config: ml_collections.ConfigDict, tokenizer: Any, vocab_size: int) -> Dataset:
  """Load, validate and tokenize the preference data (bad rows raise DataError naming file/row/field).

  Pairs longer than `data.max_length` follow `data.truncation` ('truncate_response': the response is cut
  and the pair counted in the report, `data/truncated_pairs` in metrics.jsonl; 'error': DataError). A prompt
  that leaves no room for a response always raises DataError.
  """
  dc = config.data
  examples = schema.load_preference_data(
      dc.path,
      split=dc.get("split") or None,
      schema=dc.get("schema", "auto"),
      limit=int(dc.limit) or None,
      seed=int(config.seed),
  )
  if not examples:
    raise ValueError(f"config.data.path={dc.path!r} holds no preference rows")
  checks = data_checks.check_examples(examples)
  checks.raise_on_repeated_indices(str(dc.path))
  pairs, report = tokenize.tokenize_dataset(
      examples,
      tokenizer,
      max_length=int(dc.max_length),
      format=dc.format,
      truncation=dc.get("truncation", "truncate_response"),
      single_token=bool(dc.single_token),
      tokenization=dc.get("tokenization", "separate"),
  )
  tokenize.check_pair_ids(pairs, vocab_size, source=str(dc.path))
  position_of = {int(p.index): i for i, p in enumerate(pairs)}
  if len(position_of) != len(pairs):
    raise ValueError(f"config.data.path={dc.path!r}: row indices of the tokenized pairs are not unique")
  return Dataset(list(pairs), dataclasses.asdict(report), pad_id_of(tokenizer), position_of, checks, str(dc.path))


def collate(pairs: Sequence[Any], pad_id: int, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Collate tokenized pairs into the batch contract, padded to max_length (one compiled shape)."""
  return batching.collate(
      list(pairs),
      pad_id=pad_id,
      padding_side=config.data.get("padding_side", "right"),
      pad_to=int(config.data.max_length),
  )


def packing_enabled(config: ml_collections.ConfigDict) -> bool:
  """config.data.shared_prompt_packing: train and compute reference log-probs on packed rows (data/packing.py)."""
  return bool(config.data.get("shared_prompt_packing", True))


def pairs_per_row(config: ml_collections.ConfigDict) -> int:
  """config.data.pairs_per_row: pairs per packed training row (several pairs share a row; data/packing.py)."""
  return int(config.data.get("pairs_per_row", 1))


def pack_for_logps(
    batch: dict[str, np.ndarray], pad_id: int, config: ml_collections.ConfigDict, *, groups: int = 1
) -> dict[str, np.ndarray]:
  """The layout log-probs run on: with packing on, rows of up to data.pairs_per_row pairs planned over `groups`
  data-parallel devices, lengths bucketed like training's (packing.pack_pairs); else the collated batch."""
  if not packing_enabled(config):
    return batch
  return packing.pack_pairs(
      batch, pairs_per_row=pairs_per_row(config), bucket=batching.packed_bucket, groups=groups, pad_id=pad_id
  )


def batched_pass(
    fn: Callable[[Any, Any], Any],
    params: Any,
    plan: Sequence[tuple[np.ndarray, int]],
    build: Callable[[np.ndarray, int], tuple[Any, Any]],
    put: Callable[[Any], Any],
    *,
    desc: str,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, Any, Any]]:
  """Yield (rows, host batch, host outputs) for every (rows, padded length) of `plan`.

  `build(rows, pad_to)` gives (the host batch, the part that goes to the device); `put` places the latter (e.g.
  `sharding.global_batch_to_devices`); `fn(params, device batch)` is the jitted function. A tqdm bar counts rows
  (on process 0 only: every process runs the same pass).
  """
  show = progress and jax.process_index() == 0
  bar = tqdm(total=int(sum(len(rows) for rows, _ in plan)), desc=desc, disable=not show, dynamic_ncols=True)
  try:
    for rows, pad_to in plan:
      host, device = build(rows, pad_to)
      yield rows, host, jax.device_get(fn(params, put(device)))
      bar.update(len(rows))
  finally:
    bar.close()
