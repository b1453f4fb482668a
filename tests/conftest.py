"""Shared pytest setup: one persistent XLA compilation cache for the whole session (and its subprocesses).

Many tests jit the same tiny models' functions afresh (new closures, new processes); with the cache, XLA compiles
each distinct program once per session and later compiles are disk hits. It changes no result: a cached
executable is the same program. The cache lives in the session's temporary directory, so every CI run starts
empty.
"""

import os

import jax
import pytest

_KEYS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture(scope="session", autouse=True)
def _session_compilation_cache(tmp_path_factory):
  cache_dir = str(tmp_path_factory.getbasetemp() / "jax_cache")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # Subprocesses (8-device runs, CLI runs) read the same cache through the environment.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(scope="module")
def xla_compilation_cache():
  """Kept for the modules that ask for it: the session-wide cache of `pytest_configure` already applies."""
  yield {k: getattr(jax.config, k) for k in _KEYS}
