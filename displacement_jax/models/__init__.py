"""Flax decoder-only transformers (Llama-3, Mistral, Qwen2, OLMo-1, Gemma-1) loaded from HF checkpoints and GGUF files."""

from displacement_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from displacement_jax.models.gguf import from_gguf
from displacement_jax.models.io import from_pretrained, save_pretrained
from displacement_jax.models.loading import load
from displacement_jax.models.packaged import PACKAGED
from displacement_jax.models.tokenizer import add_special_tokens_and_resize, load_tokenizer
from displacement_jax.models.transformer import Transformer, TransformerOutput, unembedding

__all__ = [
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "Transformer",
    "TransformerOutput",
    "unembedding",
    "from_pretrained",
    "save_pretrained",
    "from_gguf",
    "load",
    "PACKAGED",
    "load_tokenizer",
    "add_special_tokens_and_resize",
]
