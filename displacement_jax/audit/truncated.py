"""Per-pair gradients on the subspace 'head_and_last_layers' with a backward that stops below the subspace.

The decomposition (audit/decompose.py) needs each pair's gradient only on the LM head, the final norm and the
last k decoder layers (sketch.py). Differentiating the whole model and selecting afterwards builds every layer's
weight gradient through the scanned decoder. Here the stacked decoder is cut at L - k:

  bottom  the embedding and the first L - k layers (a Transformer of L - k layers): forward, its layer weights
          held fixed, so no weight gradient of theirs is ever formed;
  top     the last k layers, the final norm and the head (a Transformer of k layers fed the bottom's residual
          stream, `residual_BTD`), differentiated.

The gradient is the full one restricted to the subspace, exactly (`sketch.select` of the whole gradient; the
tests check it against autodiff of the whole model). Untied head: the backward runs through the top only. Tied
embeddings (SmolLM2): the head IS the embedding, whose gradient also has the input lookup's part, so the
cotangent still flows down through the bottom's activations to the lookup, but without the bottom's weight
gradients (BENCHMARKS.md measures both).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from displacement_jax.models import transformer


def applies(config: Any, subspace: str, last_layers: int) -> bool:
  """Whether the cut applies: the subspace is 'head_and_last_layers' and 0 < last_layers < num_layers."""
  return subspace == "head_and_last_layers" and 0 < int(last_layers) < int(config.num_layers)


def _layers_config(config: Any, start: int, stop: int) -> Any:
  """The model config of layers start..stop-1 of `config` (Gemma-3's per-layer kinds sliced alike)."""
  types = tuple(config.layer_types)[start:stop] if config.layer_types else ()
  return config.replace(num_layers=stop - start, layer_types=types)


def head_key(config: Any) -> str:
  """The head's top-level key in the params: 'embed_tokens' when tied, else 'lm_head'."""
  return "embed_tokens" if config.tie_word_embeddings else "lm_head"


def free_params(params: Any, config: Any, last_layers: int) -> dict[str, Any]:
  """The differentiated part: {'layers': the last k layers, 'norm', the head ('lm_head', or 'embed_tokens' when
  tied)}; the leaves `sketch.select(params, 'head_and_last_layers', k)` names, with the same names."""
  cut = int(config.num_layers) - int(last_layers)
  head = head_key(config)
  return {
      "layers": jax.tree.map(lambda x: x[cut:], params["layers"]),
      "norm": params["norm"],
      head: params[head],
  }


@dataclasses.dataclass(frozen=True)
class StackedModel:
  """`bottom` then `top` behind the interface forward.* uses (`config`, `apply`): `apply({'params': free})` runs the
  bottom on `fixed` (its layers, and the embedding unless it is the tied head, which comes from `free`) and the top
  on `free` from the bottom's residual stream. With `lookup_BTD` the bottom starts from those embedding rows
  (`transformer.embedded_input`) instead of its own lookup."""

  bottom: transformer.Transformer
  top: transformer.Transformer
  fixed: dict[str, Any]
  lookup_BTD: Any = None  # set: the bottom starts from these embedding rows of the input ids (audit/factored.py)

  @property
  def config(self) -> Any:
    return self.top.config

  def apply(self, variables: dict[str, Any], input_ids_BT: Any, attention_mask_BT: Any, **kwargs: Any) -> Any:
    free = variables["params"]
    stop = jax.lax.stop_gradient
    bottom_params = {
        "embed_tokens": free["embed_tokens"] if "embed_tokens" in free else self.fixed["embed_tokens"],
        "layers": self.fixed["layers"],
        "norm": stop(free["norm"]),  # built, unused: its output is not read
    }
    if "lm_head" in free:
      bottom_params["lm_head"] = stop(free["lm_head"])
    shared = {k: v for k, v in kwargs.items() if k in ("positions_BT", "branch_BT", "segment_BT")}
    if self.lookup_BTD is not None:  # the rows looked up outside, differentiated through them
      bottom_params["embed_tokens"] = stop(bottom_params["embed_tokens"])
      shared["residual_BTD"] = transformer.embedded_input(self.lookup_BTD, input_ids_BT, self.bottom.config)
    residual_BTD = self.bottom.apply(
        {"params": bottom_params},
        input_ids_BT,
        attention_mask_BT,
        return_logits=False,
        return_residual=True,
        **shared,
    ).residual_BTD
    return self.top.apply({"params": free}, input_ids_BT, attention_mask_BT, residual_BTD=residual_BTD, **kwargs)


def split(params: Any, config: Any, last_layers: int) -> dict[str, Any]:
  """{'fixed': the part held fixed (the first L - k layers; the embedding unless it is the tied head), 'free':
  `free_params`}. Slicing the stacked layers copies them: a caller making many calls splits once (under jit, a
  per-call split copies the bottom's weights every call)."""
  cut = int(config.num_layers) - int(last_layers)
  fixed = {"layers": jax.tree.map(lambda x: x[:cut], params["layers"])}
  if not config.tie_word_embeddings:
    fixed["embed_tokens"] = params["embed_tokens"]
  return {"fixed": fixed, "free": free_params(params, config, last_layers)}


def stacked_model(config: Any, last_layers: int, fixed: dict[str, Any]) -> StackedModel:
  """The StackedModel of a model with `config` cut above its last `last_layers` layers, holding `fixed`."""
  cut = int(config.num_layers) - int(last_layers)
  bottom = transformer.Transformer(_layers_config(config, 0, cut))
  top = transformer.Transformer(_layers_config(config, cut, int(config.num_layers)))
  return StackedModel(bottom, top, fixed)
