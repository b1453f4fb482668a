"""Shared command-line plumbing of the `--config=configs/<name>.py[:arg]` entry points (train, score)."""

from __future__ import annotations

import ast
import difflib
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import config_flags

from displacement_jax.config import checks as config_checks
from displacement_jax.config import trl_names
from displacement_jax.errors import Interrupted, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_FIELD_RE = re.compile(r"^\s+(?:config|f)\.([\w.]+) = (.+?)\s+# (.*)$")


def config_field_docs(
    files: Sequence[str] = ("configs/base.py", "configs/score_tiny.py")
) -> list[tuple[str, str, str]]:
  """(field, default, one-line doc) of every documented config field, read from the config files' comments
  (`config.a.b = value  # doc`; score_tiny's filter block is `f.x = ...`, i.e. `filter.x`)."""
  out, seen = [], set()
  for rel in files:
    path = os.path.join(ROOT, rel)
    if not os.path.isfile(path):
      continue
    for line in open(path):
      m = _FIELD_RE.match(line)
      if m and not line.lstrip().startswith("#"):
        name = m.group(1) if line.lstrip().startswith("config.") else f"filter.{m.group(1)}"
        if name not in seen:
          seen.add(name)
          out.append((name, m.group(2).strip(), m.group(3).strip()))
  return out


def print_help(
    prog: str,
    what: str,
    bools: Sequence[tuple[str, str]],
    extra: str,
    *,
    config: Any = None,
    config_file: str = "",
    skip: Sequence[str] = (),
) -> None:
  """The --help text: usage, flags, the config fields the entry point reads (not starting with one of `skip`)
  with their values in `config` (the given --config's; * where it differs from configs/base.py) or, without
  one, the base defaults, each with its doc, and `extra` (e.g. pipelines)."""
  print(
      f"usage: python -m {prog} --config=configs/<name>.py[:arg] [--config.<field>=<value> ...]"
      + "".join(f" [--{name}]" for name, _ in bools)
  )
  print(f"\n{what} driven by an ml_collections config file; any field can be overridden on the command line.")
  print("\nflags:\n  --config=FILE[:ARG]   the config file (its get_config(arg) gets ARG)")
  for name, help_text in bools:
    print(f"  --{name:<19} {help_text}")
  reads = lambda name: not name.startswith(tuple(skip))
  docs = [(name, default, doc) for name, default, doc in config_field_docs() if reads(name)]
  if config is None:
    print("\nconfig fields (defaults of configs/base.py; a config file may change them):")
    for name, default, doc in docs:
      print(f"  {name:<32} {default:<22} {doc}")
  else:
    values = config_checks.flatten(config)
    print(f"\nconfig fields (values of {config_file}; * = not the configs/base.py default):")
    for name, default, doc in docs:
      if name in values:
        value = repr(values[name]).replace("'", '"')
        mark = " " if _literal(default) == values[name] else "*"
        print(f"  {name:<32}{mark}{value:<22} {doc}")
    for name in sorted(set(values) - {n for n, _, _ in docs}):
      if reads(name):
        print(f"  {name:<32}*{repr(values[name])}")
  if extra:
    print("\n" + extra)


def _literal(text: str) -> Any:
  """The Python value of a default as written in configs/base.py (the text itself when it is not a literal)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def load_config_for_help(argv: Sequence[str]) -> tuple[Any, str]:
  """(the config of argv's --config with its overrides, its file) for --help; (None, '') without one or when
  it does not load (the help then shows the base defaults)."""
  given = [a for a in argv[1:] if a.startswith("--config")]
  files = [a.split("=", 1)[1] for a in given if a.startswith("--config=")]
  if not files or not os.path.isfile(files[0].split(":", 1)[0]):
    return None, ""
  add_config_root(files[0].split(":", 1)[0])
  probe = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=probe, lock_config=False, sys_argv=argv[:1] + given)
  try:
    probe(argv[:1] + given)
  except Exception:  # pylint: disable=broad-except  (help never fails: it falls back to the base defaults)
    return None, ""
  return probe.config, files[0]


def parse_config_flags(
    argv: Sequence[str] | None,
    what: str,
    *,
    bools: Sequence[tuple[str, str]] = (),
    prog: str = "displacement_jax",
    help_extra: str = "",
    help_skip: Sequence[str] = (),
) -> tuple[Any, int]:
  """(absl FlagValues, 0) for a valid command line, (None, 2) after printing a one-line error, or (None, 0)
  after printing the --help text.

  Defines `--config` (an ml_collections config file, every field overridable as `--config.a.b=value`) and one
  boolean flag per (name, help) in `bools`. The config file's repository root goes on sys.path first, so
  configs can import their siblings (`from configs import base`). TRL's DPOConfig names are rewritten to ours
  first (trl_names.translate; each printed once as 'beta -> loss.beta'). --help lists the fields starting with
  none of `help_skip` (the fields this entry point does not read) with the given config's values.
  """
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("--help", "-h", "--helpfull", "-help") for a in argv[1:]):
    config, config_file = load_config_for_help(argv)
    print_help(prog, what, bools, help_extra, config=config, config_file=config_file, skip=help_skip)
    return None, 0
  try:
    argv, renamed = trl_names.translate(argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return None, 2
  for line in renamed:
    print(f"TRL name: {line}", flush=True)
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        print(f"error: config file {path!r} does not exist", file=sys.stderr)
        return None, 2
      add_config_root(path)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config",
      None,
      f"{what} config file (configs/<name>.py[:arg])",
      flag_values=flag_values,
      lock_config=False,
      sys_argv=argv,
  )
  for name, help_text in bools:
    flags.DEFINE_bool(name, False, help_text, flag_values=flag_values)
  try:
    flag_values(argv)
  except flags.Error as e:  # a config file that fails to load: its own exception, on one line
    print(f"error: {_last_line(str(e))}", file=sys.stderr)
    return None, 2
  except Exception as e:  # pylint: disable=broad-except  (a config file whose get_config raises, or a bad override)
    print(f"error: {config_load_error(argv) or unknown_override(argv, e)}", file=sys.stderr)
    return None, 2
  if flag_values.config is None:
    print("error: --config=configs/<name>.py is required", file=sys.stderr)
    return None, 2
  return flag_values, 0


def add_config_root(path: str) -> None:
  """Put a config file's repository root on sys.path, so configs can import their siblings (`from configs import
  base`)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)


def one_line_errors(
    fn: Callable[[], Any], errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
) -> int:
  """Run `fn()`; 0 when it returns; 2 with `error: <message>` on stderr for a `UsageError` (output_dir locked or
  holding another run, no usable checkpoint, a refused --resume); 1 with `error: <message>` for one of `errors`
  or an OSError (bad input, a full disk: the CLIs' exit status for a failed run); 128 + the signal number with
  its one line for SIGTERM / SIGINT (`errors.Interrupted`, or a KeyboardInterrupt: 130)."""
  try:
    fn()
  except Interrupted as e:
    print(f"{e}", file=sys.stderr)
    return e.status
  except KeyboardInterrupt:
    print("stopped by SIGINT; --resume continues from the newest checkpoint", file=sys.stderr)
    return 130
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except errors + (OSError,) as e:
    print(f"error: {os_error_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
    return 1
  return 0


def os_error_line(error: OSError) -> str:
  """'No space left on device: /path' for an OSError that names its file, else its message."""
  if error.strerror and error.filename is not None:
    return f"{error.strerror}: {error.filename}"
  return str(error)


def _last_line(message: str) -> str:
  """`flag --config=X: Error whilst parsing config file: <traceback>` -> `--config=X: <the exception line>`."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  head = lines[0].split(": Error whilst parsing config file", 1)[0].removeprefix("flag ")
  return lines[0] if len(lines) == 1 else f"{head}: {lines[-1]}"


def config_load_error(argv: Sequence[str]) -> str | None:
  """One line for a config file that fails to load on its own (its get_config raises), else None."""
  base = [a for a in argv[:1]] + [a for a in argv[1:] if a.startswith("--config=")]
  probe = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=probe, lock_config=False, sys_argv=base)
  try:
    probe(base)
  except flags.Error as e:
    return _last_line(str(e))
  except Exception as e:  # pylint: disable=broad-except  (whatever the config file raises: named in one line)
    return f"{base[-1] if len(base) > 1 else '--config'}: loading the config raised {type(e).__name__}: {_last_line(str(e))}"
  return None


def unknown_override(argv: Sequence[str], error: BaseException) -> str:
  """One line naming the `--config.<field>=...` override that does not match the config, with the nearest field."""
  base = [a for a in argv[:1]] + [a for a in argv[1:] if a.startswith("--config=")]
  probe = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=probe, lock_config=False, sys_argv=base)
  probe(base)
  config = probe.config
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0].split(".")
    node = config
    for depth, key in enumerate(path):
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if key not in fields:
        near = difflib.get_close_matches(key, fields, n=1)
        where = ".".join(path[:depth]) or "the config"
        hint = f"; did you mean {'.'.join(path[:depth] + near[:1])!r}?" if near else ""
        alias = trl_names.ALIASES.get(key)
        if alias is not None and alias.ours:  # a TRL name under a group: name our field
          hint = f"; TRL's {key!r} is {alias.ours!r} here (--{key}=... works too)"
        return f'--config.{".".join(path)}: {where} has no field {key!r}{hint}'
      node = node[key]
  return f"{type(error).__name__}: {_last_line(str(error))}"
