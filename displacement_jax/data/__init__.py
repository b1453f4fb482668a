"""Preference data: loading (schema), tokenization (tokenize), batching (batching)."""

from displacement_jax.data.batching import BatchIterator, collate, length_buckets
from displacement_jax.data.schema import (
    PersonaRow,
    PreferenceExample,
    load_persona,
    load_preference_data,
    load_sorry_human_judgments,
    load_sorry_prompts,
)
from displacement_jax.data.tokenize import (
    TokenizedPair,
    TruncationReport,
    check_vocab,
    prompter_assistant_format,
    tokenize_dataset,
    tokenize_example,
    tokenize_single_token,
)

__all__ = [
    "BatchIterator",
    "collate",
    "length_buckets",
    "PersonaRow",
    "PreferenceExample",
    "load_persona",
    "load_preference_data",
    "load_sorry_human_judgments",
    "load_sorry_prompts",
    "TokenizedPair",
    "TruncationReport",
    "check_vocab",
    "prompter_assistant_format",
    "tokenize_dataset",
    "tokenize_example",
    "tokenize_single_token",
]
