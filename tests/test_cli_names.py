"""TRL's DPOConfig names on the command line and --help showing the given config (issue 30, items 3 and 4)."""

from __future__ import annotations

import pytest

from configs import dpo
from displacement_jax.config import flags as cli
from displacement_jax.score import main as score
from displacement_jax.train import main as train
from displacement_jax.config import trl_names
from displacement_jax.errors import UsageError


def test_trl_names_map_to_ours_and_are_printed_once(capsys):
  argv = [
      "prog",
      "--config=configs/dpo_tiny.py",
      "--beta=0.25",
      "--config.learning_rate=1e-6",
      "--loss_type=hinge",
      "--per_device_train_batch_size=4",
      "--gradient_accumulation_steps=2",
      "--num_train_epochs=2",
      "--report_to=none",
      "--gradient_checkpointing",
  ]
  flag_values, status = cli.parse_config_flags(argv, "t")
  assert status == 0
  c = flag_values.config
  assert (c.loss.beta, c.optim.lr, c.loss.objective, c.loss.gpo_fn) == (0.25, 1e-6, "gpo", "hinge")
  assert (c.batch_size, c.optim.grad_accum, c.num_epochs, c.model.remat) == (8, 2, 2, True)
  out = capsys.readouterr().out.splitlines()
  assert "TRL name: beta -> loss.beta" in out and "TRL name: learning_rate -> optim.lr" in out
  assert "TRL name: loss_type -> loss.objective=gpo, loss.gpo_fn=hinge" in out
  assert sum(line.startswith("TRL name: beta") for line in out) == 1
  assert any(line.startswith("TRL name: per_device_train_batch_size -> batch_size=8") for line in out)


@pytest.mark.parametrize(
    "arg, says",
    [
        ("--loss_type=robust", "--loss_type=robust: not supported here; supported: sigmoid, ipo, hinge"),
        ("--rpo_alpha=1.0", "--rpo_alpha: refused: TRL adds alpha x the chosen NLL averaged per token"),
        ("--max_prompt_length=128", "--max_prompt_length: no equivalent: prompts are never cut here"),
        ("--report_to=wandb", "--report_to=wandb: not supported here; supported: tensorboard, none, all"),
    ],
)
def test_trl_names_we_cannot_honour_are_one_line_usage_errors(arg, says, capsys):
  assert cli.parse_config_flags(["prog", "--config=configs/dpo_tiny.py", arg], "t") == (None, 2)
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: " + says) and "\n" not in err


def test_every_alias_targets_a_real_field():
  from configs import base
  from displacement_jax.config import checks as config_checks

  fields = config_checks.flatten(base.get_base_config())
  for name, alias in trl_names.ALIASES.items():
    if alias.ours:
      assert alias.ours in fields, name
  assert "| `beta` | `loss.beta` | 0.1 | 0.1 |" in trl_names.table_markdown()
  with pytest.raises(UsageError):
    trl_names.translate(["p", "--optim=adafactor"])


def test_dpo_trl_variant_takes_trls_defaults():
  c = dpo.get_config("trl")
  assert c.model.path == "smollm2-135m-instruct"
  assert (c.optim.name, c.optim.lr, c.optim.schedule, c.optim.clip) == ("adamw", 1e-6, "linear", 1.0)
  assert (c.batch_size, c.num_epochs, c.data.max_length, c.seed) == (8, 3, 1024, 42)
  c2 = dpo.get_config("/models/x,trl")
  assert c2.model.path == "/models/x" and c2.optim.lr == 1e-6
  assert dpo.get_config("/models/x").optim.lr == 1e-7


def test_help_shows_the_given_configs_values_and_only_the_fields_read(capsys):
  assert train.main(["prog", "--config=configs/dpo.py", "--help"]) == 0
  out = capsys.readouterr().out
  assert "values of configs/dpo.py" in out
  line = lambda name: next(l for l in out.splitlines() if l.strip().startswith(name + " "))
  assert '*"auto"' in line("data.format") and "*10" in line("eval.every")
  assert " 32 " in line("batch_size") and "*" not in line("batch_size").split()[1]
  assert "filter.mode" not in out and "audit." not in out  # score's filter, the audit CLI's fields
  assert score.main(["prog", "--config=configs/score.py", "--help"]) == 0
  out = capsys.readouterr().out
  assert "filter.mode" in out and "optim.lr" not in out and "loss.beta" not in out and "audit.filter" not in out
  assert train.main(["prog", "--help"]) == 0
  assert "defaults of configs/base.py" in capsys.readouterr().out


def test_a_trl_name_under_a_group_points_to_our_field(capsys):
  assert train.main(["prog", "--config=configs/dpo_tiny.py", "--config.optim.learning_rate=1e-6"]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: --config.optim.learning_rate: optim has no field 'learning_rate'; TRL's 'learning_rate' is 'optim.lr' "
      "here (--learning_rate=... works too)"
  )


def test_the_docs_trl_page_holds_the_table():
  import pathlib

  page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "sections" / "trl.md").read_text()
  assert trl_names.table_markdown() in page
