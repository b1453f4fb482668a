"""Flax decoder-only transformers (Llama-3, Mistral, Qwen2, OLMo-1, Gemma-1) loaded from HF checkpoints."""

import importlib

_EXPORTS = {
      "ModelConfig": "config",
      "SUPPORTED_MODEL_TYPES": "config",
      "Transformer": "transformer",
      "TransformerOutput": "transformer",
      "unembedding": "transformer",
      "from_pretrained": "io",
      "save_pretrained": "io",
      "from_gguf": "gguf",
      "load": "loading",
      "PACKAGED": "packaged",
      "load_tokenizer": "tokenizer",
      "add_special_tokens_and_resize": "tokenizer",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
      module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
      return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
