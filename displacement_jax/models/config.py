"""ModelConfig: one frozen dataclass describing every supported decoder family, read from / written to HF config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "olmo", "gemma", "gemma3_text")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "llama3", "linear")
SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
SUPPORTED_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_pytorch_tanh", "gelu")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "olmo": "OlmoForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")


def check_model_type(model_type: str) -> None:
  """Raise ValueError naming the supported model types unless `model_type` is one of them."""
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"unsupported model_type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def dtype_name(dtype: Any) -> Any:
  """'float32' for 'float32', jnp.float32, np.float32 or np.dtype('float32'); other values unchanged."""
  if isinstance(dtype, str):
    return dtype
  try:
    return np.dtype(dtype).name
  except TypeError:
    return dtype


def _ids(value: Any) -> tuple[int, ...]:
  """A token id or list of ids (or None) as a tuple of ints."""
  if value is None:
    return ()
  if isinstance(value, (list, tuple)):
    return tuple(int(v) for v in value)
  return (int(value),)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture + run-time choices of a decoder-only transformer.

  `rope_scaling` is a hashable tuple of (key, value) pairs (HF's rope_scaling dict without rope_theta),
  or None for plain RoPE; `rope_scaling_dict` gives it back as a dict.
  `norm_type` is 'rms' (Llama/Mistral/Qwen2), 'rms_plus_one' (Gemma, applies 1 + w) or 'layernorm_nonparam' (OLMo-1).
  `layer_types` (Gemma-3) names each layer 'sliding_attention' (window `sliding_window`, RoPE base
  `rope_local_theta`, no scaling) or 'full_attention' (no window, `rope_theta` and `rope_scaling`); empty, every
  layer uses `sliding_window` and `rope_theta`.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  max_position_embeddings: int = 2048
  norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  norm_type: str = "rms"
  hidden_act: str = "silu"
  embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(hidden_size) (in the compute dtype)
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  clip_qkv: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()  # Gemma-3: per-layer attention kind (see the class docstring)
  rope_local_theta: float | None = None  # Gemma-3: RoPE base of the sliding-window layers
  query_pre_attn_scalar: float | None = None  # Gemma-3: attention scale query_pre_attn_scalar**-0.5 (None: head_dim)
  qk_norm: bool = False  # Gemma-3: RMSNorm of each query and key head (q_norm, k_norm) before RoPE
  sandwich_norm: bool = False  # Gemma-3: norms after attention and around the MLP (pre/post_feedforward_layernorm)
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Run-time choices.
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: bool = False
  freeze_pad_embedding: bool = False  # as HF's nn.Embedding(padding_idx=pad_token_id): no lookup gradient for that row
  attention_impl: str | None = None  # None: 'blocked' (no KV cache) / JAX's pick; 'blocked' 'xla' 'cudnn' 'reference'
  # LoRA (models/lora.py): applied wherever the params hold adapters (lora_A, lora_B beside a kernel).
  lora_alpha: float = 0.0  # scaling = lora_alpha / r (PEFT's), or / sqrt(r) with lora_rslora
  lora_dropout: float = 0.0  # dropout on the adapter input, active only when a 'dropout' rng is given
  lora_rslora: bool = False
  extra: tuple[tuple[str, Any], ...] = ()  # unrecognised HF keys kept for to_hf round trips

  def __post_init__(self):
    check_model_type(self.model_type)
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.norm_type not in ("rms", "rms_plus_one", "layernorm_nonparam"):
      raise ValueError(
          f"ModelConfig.norm_type must be 'rms', 'rms_plus_one' or 'layernorm_nonparam', got {self.norm_type!r}"
      )
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"ModelConfig.hidden_act {self.hidden_act!r} unsupported; supported: {SUPPORTED_ACTIVATIONS}")
    for name in ("dtype", "param_dtype"):
      object.__setattr__(self, name, dtype_name(getattr(self, name)))
      if getattr(self, name) not in SUPPORTED_DTYPES:
        raise ValueError(f"ModelConfig.{name} must be one of {SUPPORTED_DTYPES}, got {getattr(self, name)!r}")
    if self.attention_impl not in (None, "blocked", "xla", "cudnn", "reference"):
      raise ValueError(
          "ModelConfig.attention_impl must be None, 'blocked', 'xla', 'cudnn' or 'reference', got "
          f"{self.attention_impl!r}"
      )
    if self.layer_types:
      if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
        raise ValueError(
            f"ModelConfig.layer_types must name each of the {self.num_layers} layers one of {LAYER_TYPES}, "
            f"got {self.layer_types!r}"
        )
      if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.rope_local_theta is None):
        raise ValueError(
            "ModelConfig.layer_types has sliding_attention layers: sliding_window and rope_local_theta needed"
        )
    rope_type = self.rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "llama3":
      missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(
          self.rope_scaling_dict
      )
      if missing:
        raise ValueError(f"llama3 rope_scaling is missing keys {sorted(missing)}")
    if rope_type == "linear" and "factor" not in self.rope_scaling_dict:
      raise ValueError("linear rope_scaling needs a 'factor'")

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    """rope_scaling as a dict ({} for plain RoPE)."""
    return dict(self.rope_scaling or ())

  @property
  def rope_type(self) -> str:
    """'default', 'llama3' or 'linear'."""
    d = self.rope_scaling_dict
    return str(d.get("rope_type", d.get("type", "default")))

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it is a sliding-window ('sliding_attention') layer of a `layer_types` model."""
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def num_groups(self) -> int:
    """Query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes: Any) -> "ModelConfig":
    """A copy with some fields changed."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> "ModelConfig":
    """Build from an HF config.json dict (old rope_theta/rope_scaling keys or transformers-5 rope_parameters)."""
    hf = dict(hf_config)
    model_type = hf.get("model_type")
    if model_type is None:
      raise ValueError(f"HF config has no 'model_type'; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    check_model_type(model_type)
    try:
      hidden_size = int(hf["hidden_size"])
      num_heads = int(hf["num_attention_heads"])
      kw: dict[str, Any] = dict(
          model_type=model_type,
          vocab_size=int(hf["vocab_size"]),
          hidden_size=hidden_size,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=num_heads,
      )
    except KeyError as e:
      raise ValueError(f"HF config ({model_type}) is missing required key {e.args[0]!r}") from None
    kv = hf.get("num_key_value_heads")
    kw["num_kv_heads"] = int(kv) if kv is not None else num_heads
    hd = hf.get("head_dim")
    kw["head_dim"] = int(hd) if hd is not None else hidden_size // num_heads

    # RoPE: transformers 5 `rope_parameters` or old `rope_theta` + `rope_scaling`.
    rope_params = hf.get("rope_parameters")
    if (
        isinstance(rope_params, Mapping)
        and rope_params
        and not any(isinstance(v, Mapping) for v in rope_params.values())
    ):
      scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
      theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
    elif model_type == "gemma3_text":  # {'full_attention': {...}, 'sliding_attention': {...}} or the old keys
      nested = dict(rope_params or {})
      full, local = dict(nested.get("full_attention") or {}), dict(nested.get("sliding_attention") or {})
      scaling = {k: v for k, v in full.items() if k != "rope_theta"} or dict(hf.get("rope_scaling") or {})
      theta = full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
      if local.get("rope_type", "default") != "default":
        raise ValueError(f"gemma3_text: rope scaling of the sliding-window layers ({local}) is not supported")
      kw["rope_local_theta"] = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    else:
      scaling = dict(hf.get("rope_scaling") or {})
      theta = hf.get("rope_theta", 10000.0)
    if "type" in scaling and "rope_type" not in scaling:
      scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
      scaling = {}
    kw["rope_theta"] = float(theta)
    kw["rope_scaling"] = tuple(sorted(scaling.items())) if scaling else None
    kw["max_position_embeddings"] = int(hf.get("max_position_embeddings", 2048))
    kw["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", model_type in ("gemma", "gemma3_text")))
    kw["bos_token_id"] = hf.get("bos_token_id")
    kw["pad_token_id"] = hf.get("pad_token_id")
    kw["eos_token_ids"] = _ids(hf.get("eos_token_id"))

    act = hf.get("hidden_act", "silu")
    if model_type == "gemma":
      act = hf.get("hidden_activation") or act
      if act == "gelu":  # legacy Gemma value that means the tanh approximation (as transformers does)
        act = "gelu_pytorch_tanh"
      kw.update(norm_type="rms_plus_one", embed_scale=True, norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
      kw["qkv_bias"] = kw["o_bias"] = bool(hf.get("attention_bias", False))
    elif model_type == "gemma3_text":
      act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
      for key in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention"):
        if hf.get(key):
          raise ValueError(f"gemma3_text with {key}={hf[key]!r} is not supported")
      window = hf.get("sliding_window", 4096)
      pattern = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
      types = hf.get("layer_types") or [
          "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(kw["num_layers"])
      ]
      kw.update(
          norm_type="rms_plus_one",
          embed_scale=True,
          norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          qk_norm=True,
          sandwich_norm=True,
          query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
          sliding_window=None if window is None else int(window),
          layer_types=tuple(types),
      )
      kw["qkv_bias"] = kw["o_bias"] = bool(hf.get("attention_bias", False))
    elif model_type == "olmo":
      kw.update(norm_type="layernorm_nonparam", norm_eps=1e-5)
      kw["qkv_bias"] = kw["o_bias"] = bool(hf.get("attention_bias", False))
      clip = hf.get("clip_qkv")
      kw["clip_qkv"] = float(clip) if clip is not None else None
    elif model_type == "qwen2":
      kw.update(norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=True, o_bias=False)
      if hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None:
        max_window_layers = int(hf.get("max_window_layers", kw["num_layers"]))
        if max_window_layers < kw["num_layers"]:
          raise ValueError(
              "qwen2 with use_sliding_window and max_window_layers < num_hidden_layers (per-layer windows) is not supported"
          )
        kw["sliding_window"] = int(hf["sliding_window"])
    else:  # llama, mistral
      kw["norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
      kw["qkv_bias"] = kw["o_bias"] = bool(hf.get("attention_bias", False))
      kw["mlp_bias"] = bool(hf.get("mlp_bias", False))
      if model_type == "mistral" and hf.get("sliding_window") is not None:
        kw["sliding_window"] = int(hf["sliding_window"])
    kw["hidden_act"] = act
    known = {
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "pad_token_id",
        "eos_token_id",
        "hidden_act",
        "hidden_activation",
        "rms_norm_eps",
        "attention_bias",
        "mlp_bias",
        "clip_qkv",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
        "layer_types",
        "rope_local_base_freq",
        "query_pre_attn_scalar",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "use_bidirectional_attention",
        "sliding_window_pattern",
        "_sliding_window_pattern",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
    }
    extra = {k: v for k, v in hf.items() if k not in known and _hashable(v)}
    kw["extra"] = tuple(sorted(extra.items()))
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    """An HF config.json dict (old rope_theta/rope_scaling keys, readable by transformers 4.x and 5.x)."""
    hf: dict[str, Any] = dict(self.extra)
    hf.update(
        architectures=[_ARCHITECTURES[self.model_type]],
        model_type=self.model_type,
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        hidden_act=self.hidden_act,
        max_position_embeddings=self.max_position_embeddings,
        rope_theta=self.rope_theta,
        rope_scaling=self.rope_scaling_dict or None,
        tie_word_embeddings=self.tie_word_embeddings,
        bos_token_id=self.bos_token_id,
        pad_token_id=self.pad_token_id,
        eos_token_id=(
            list(self.eos_token_ids)
            if len(self.eos_token_ids) > 1
            else (self.eos_token_ids[0] if self.eos_token_ids else None)
        ),
        torch_dtype=self.param_dtype,
    )
    if self.model_type == "olmo":
      hf["clip_qkv"] = self.clip_qkv
      hf["attention_bias"] = self.qkv_bias
    elif self.model_type == "gemma3_text":
      hf.update(
          rms_norm_eps=self.norm_eps,
          attention_bias=self.qkv_bias,
          hidden_activation=self.hidden_act,
          rope_local_base_freq=self.rope_local_theta,
          query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
          sliding_window=self.sliding_window,
          layer_types=list(self.layer_types),
          final_logit_softcapping=None,
          attn_logit_softcapping=None,
      )
    elif self.model_type == "qwen2":
      hf["rms_norm_eps"] = self.norm_eps
      hf["use_sliding_window"] = self.sliding_window is not None
      hf["sliding_window"] = self.sliding_window
      hf["max_window_layers"] = self.num_layers
    else:
      hf["rms_norm_eps"] = self.norm_eps
      hf["attention_bias"] = self.qkv_bias
      if self.model_type == "llama":
        hf["mlp_bias"] = self.mlp_bias
      if self.model_type == "mistral":
        hf["sliding_window"] = self.sliding_window
    return hf


def _int_if_whole(value: float | None) -> float | int | None:
  """3.0 -> 3 (transformers' typed configs want an int where the number is whole); other values unchanged."""
  return int(value) if isinstance(value, float) and value.is_integer() else value


def _hashable(value: Any) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True
