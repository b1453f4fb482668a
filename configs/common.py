"""What the experiment configs share: the arg parser, the tiny-model override, the fixture paths.

arg = common.parse_arg(arg, model='olmo1b', objective='dpo', tiny=False)   # 'model=gemma2b,tiny'
...
return common.tiny(config) if arg.tiny else config
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "exp")  # offline copies of the experiments' data (real schemas)

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _convert(key: str, text: str, default: Any, arg: str) -> Any:
  if isinstance(default, bool):
    if text.lower() not in _TRUE + _FALSE:
      raise ValueError(f"config arg {arg!r}: {key}={text!r} is not a boolean (true/false)")
    return text.lower() in _TRUE
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"config arg {arg!r}: {key}={text!r} is not a {type(default).__name__}") from None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.FrozenConfigDict:
  """The fields of a config arg 'k=v,k2=v2,flag' over `defaults` (which also fix each field's type).

  A bare word sets a boolean field to True ('tiny'); values are converted to the default's type (int, float,
  bool, str). An unknown key, a bare word for a non-boolean field or a value of the wrong type raises
  ValueError naming the arg and the known keys. None or '' gives the defaults.
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f'config arg {arg!r}: unknown key {key!r} (known: {", ".join(defaults)}; '
          "write key=value, or a bare flag name)"
      )
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config arg {arg!r}: {key!r} needs a value ({key}=...)")
      values[key] = True
    else:
      values[key] = _convert(key, text.strip(), defaults[key], arg)
  return ml_collections.FrozenConfigDict(values)


def choose(family: str, key: str, value: Any, options: Mapping[str, Any] | tuple[Any, ...]) -> Any:
  """`value` when it is one of `options` (a tuple, or a mapping's keys), else a ValueError naming them."""
  if value not in options:
    raise ValueError(f'{family} config arg {key}={value!r} must be one of {", ".join(map(str, options))}')
  return value


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The shared offline override: a random tiny Llama (models.tiny), short sequences, a visible learning rate.

  The rate is far above the paper's: a random tiny model has seconds, not hours. Each config then points the
  data at its fixture (`FIXTURES`) and shrinks what is its own (windows, seeds, prompts).
  """
  config.model.path = ""
  config.model.tiny = "llama"
  config.data.max_length = 64
  config.optim.lr = 1e-3
  config.logprob_chunk_size = 32
  config.progress = False
  config.checkpoint.async_save = False
  return config
