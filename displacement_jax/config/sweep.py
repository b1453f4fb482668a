"""Expand a config's sweep into one training command line per run.

A config file may define `get_sweep() -> list[dict[str, object]]`: each dict holds dotted overrides
(`{'quantiles.measure': 'ches', 'quantiles.q': 0.25, 'seed': 1}`). `expand('configs/x.py:arg')` turns
them into command lines

    python -m displacement_jax.train --config=configs/x.py:arg --config.quantiles.measure=ches ...
        --config.output_dir=<config.output_dir>/<run name>

with one distinct output directory per run (the run name is built from the overrides). A config without
`get_sweep` expands to a single run. `launch/run_sweep.py` executes the command lines.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Sequence

import ml_collections

from displacement_jax.config import flags as cli

TRAIN_MODULE = "displacement_jax.train"


def split_config_arg(config_path: str, arg: str | None = None) -> tuple[str, str | None]:
  """('configs/x.py', 'arg') from 'configs/x.py:arg' (an explicit `arg` wins over the suffix)."""
  path, _, suffix = config_path.partition(":")
  if arg is None and suffix:
    arg = suffix
  return path, arg


def load_config_module(path: str) -> Any:
  """Import a config file by path (its repository root goes on sys.path for `from configs import base`)."""
  if not path.endswith(".py") or not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist (expected configs/<name>.py)")
  cli.add_config_root(path)
  name = "sweep_config_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} defines no get_config(arg)")
  return module


def format_value(value: Any) -> str:
  """A command-line string for an override value (what ml_collections' config flags parse back)."""
  if isinstance(value, bool):
    return "True" if value else "False"
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(format_value(v) for v in value) + (",)" if len(value) == 1 else ")")
  return str(value)


def run_name(overrides: dict[str, Any]) -> str:
  """A filesystem-safe name from the overrides: 'measure=ches_q=0.25_seed=1' (last key component)."""
  if not overrides:
    return "run"
  parts = [f'{key.split(".")[-1]}={format_value(value)}' for key, value in overrides.items() if key != "output_dir"]
  return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts)) or "run"


def _check_key(config: ml_collections.ConfigDict, key: str, config_path: str) -> None:
  node: Any = config
  for i, part in enumerate(key.split(".")):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(
          f"sweep of {config_path}: override key {key!r} is not a field of the config "
          f'(no {".".join(key.split(".")[:i + 1])!r})'
      )
    node = node[part]


def sweep_overrides(config_path: str, arg: str | None = None) -> tuple[ml_collections.ConfigDict, list[dict]]:
  """(config, list of override dicts) of a config file; [{}] when it has no get_sweep()."""
  path, arg = split_config_arg(config_path, arg)
  module = load_config_module(path)
  config = module.get_config(arg) if arg is not None else module.get_config()
  if not hasattr(module, "get_sweep"):
    return config, [{}]
  sweep = list(module.get_sweep())
  if not sweep:
    raise ValueError(f"get_sweep() of {path} returned no runs")
  for i, overrides in enumerate(sweep):
    if not isinstance(overrides, dict):
      raise ValueError(f"get_sweep() of {path}: run {i} must be a dict of dotted overrides, got {overrides!r}")
    for key in overrides:
      _check_key(config, key, path)
  return config, sweep


def expand(
    config_path: str,
    arg: str | None = None,
    *,
    python: str = "python",
    extra_args: Sequence[str] = (),
    module: str = TRAIN_MODULE,
) -> list[list[str]]:
  """Command lines (argv lists) for every run of the config's sweep, each with its own output_dir.

  `config_path` is 'configs/x.py' or 'configs/x.py:arg'; `extra_args` (e.g. '--config.num_steps=5') are
  appended to every command line before the output directory; `module` is the `python -m` entry point
  (default displacement_jax.train, which hands pipeline configs to their pipeline).
  """
  path, arg = split_config_arg(config_path, arg)
  config, sweep = sweep_overrides(path, arg)
  base_dir = str(config.get("output_dir") or "runs/sweep")
  config_flag = f"--config={path}" + (f":{arg}" if arg is not None else "")
  commands, seen = [], {}
  for overrides in sweep:
    name = run_name(overrides)
    count = seen.get(name, 0)
    seen[name] = count + 1
    if count:
      name = f"{name}_{count}"
    output_dir = overrides.get("output_dir") or (os.path.join(base_dir, name) if len(sweep) > 1 else base_dir)
    cmd = [python, "-m", module, config_flag]
    cmd += [f"--config.{k}={format_value(v)}" for k, v in overrides.items() if k != "output_dir"]
    cmd += list(extra_args)
    cmd.append(f"--config.output_dir={output_dir}")
    commands.append(cmd)
  dirs = [c[-1] for c in commands]
  if len(set(dirs)) != len(dirs):
    raise ValueError(f"sweep of {path} gives repeated output directories: {dirs}")
  return commands
