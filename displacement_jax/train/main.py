r"""Training CLI: `python -m displacement_jax.train --config=configs/<name>.py[:arg]` (an entry point: a leaf).

Any config field can be overridden (`--config.optim.lr=1e-7`); `--resume` continues from the latest checkpoint
in `output_dir`. `config.main` names what runs the config: '' is preference training
(`displacement_jax.train.loop.run`); a registered name (`MAINS`: demo, persona_demo, persona, quantiles, sorry_bench, theory_check, generate_pairs, edit_search) or a module
under `displacement_jax.` with a `run(config)` function runs that pipeline instead (e.g. configs/demo.py sets
main='demo'). Nothing else is imported: a dotted path outside the package is a usage error.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Sequence

import ml_collections

from displacement_jax import sharding
from displacement_jax.config import flags as cli
from displacement_jax.train import loop as training

MAINS = {
    "demo": "displacement_jax.experiments.demo",
    "persona_demo": "displacement_jax.experiments.persona_demo",
    "persona": "displacement_jax.experiments.persona",
    "quantiles": "displacement_jax.experiments.quantiles",
    "ches_quantiles": "displacement_jax.experiments.quantiles",
    "sorry_bench": "displacement_jax.experiments.sorry_bench.pipeline",
    "theory_check": "displacement_jax.experiments.theory_check",
    "generate_pairs": "displacement_jax.experiments.generated_pairs",
    "edit_search": "displacement_jax.experiments.edit_search",
}


def resolve_main(name: str) -> Callable[[ml_collections.ConfigDict], Any]:
  """The `run(config)` of `config.main`: a registered name or a module under `displacement_jax.`."""
  module_name = MAINS.get(name, name if name.startswith("displacement_jax.") else None)
  if module_name is None:
    raise ValueError(
        f'config.main={name!r} is not a registered pipeline ({", ".join(sorted(MAINS))}) nor a module '
        "under displacement_jax. with run(config)"
    )
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"config.main={name!r}: cannot import {module_name} ({e})") from e
  if not hasattr(module, "run"):
    raise ValueError(f"config.main={name!r}: module {module_name} has no run(config) function")
  return module.run


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry: `main(['prog', '--config=configs/dpo_tiny.py', '--config.optim.lr=1e-3', '--resume'])`.

  Returns the exit status (0 ok, 1 for bad input / non-finite loss, 2 for usage errors; one line on stderr).
  """
  flag_values, status = cli.parse_config_flags(
      argv,
      "Preference training (DPO, IPO, cross-entropy, SLiC, DPOP, GPO, + SFT term)",
      bools=[("resume", "continue from the latest checkpoint in output_dir")],
      prog="displacement_jax.train",
      help_skip=(
          "filter.",
          "measures.",
          "audit.",
      ),  # score's fields; the audit CLI's (python -m displacement_jax.audit)
      help_extra="pipelines (config.main): "
      + ", ".join(f"{k} -> {v}" for k, v in sorted(MAINS.items()))
      + "; '' = one training run (displacement_jax.train.loop.run)\n\nTRL's DPOConfig names are accepted too "
      "(--beta=0.1 is --config.loss.beta=0.1, printed once; the table: docs/sections/trl.md)",
  )
  if flag_values is None:
    return status
  config = flag_values.config
  run = (
      (lambda: resolve_main(config.main)(config))
      if config.get("main")
      else (lambda: training.run(config, resume=flag_values.resume))
  )
  # sharding.reporting_failures: in a multi-process run an error here also ends the other processes, naming it.
  return cli.one_line_errors(
      sharding.reporting_failures(run), (ValueError, FileNotFoundError, training.NonFiniteLossError)
  )


if __name__ == "__main__":
  sys.exit(main())
