r"""README's real-output blocks: each is produced by a command registered here and checked against a fresh run.

  python docs/outputs.py                 # run every registered command, store docs/outputs/<name>.txt
  python docs/outputs.py --only NAME     # one of them
  python docs/outputs.py --check         # run them and compare with the stored text (what the tests do)

A section of docs/sections/ includes a stored output with the marker line `<!-- output: NAME -->`;
docs/build_readme.py replaces it with the fenced text. A snippet (`kind='snippet'`, the code in
docs/snippets/NAME.py) is included with `<!-- snippet: NAME -->`: its code block, then "Output:" and its output.
Commands run from the repository root with JAX_PLATFORMS=cpu and the HF offline variables; paths below the
repository root are stored relative to it. `compare` treats numbers as equal within a relative 1e-3 (XLA:CPU
rounding may differ between CPUs) and ignores what `MASKS` matches (hashes, timings).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
STORE = ROOT / "docs" / "outputs"
SNIPPETS = ROOT / "docs" / "snippets"
MASKS = (
    r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])",  # cache-key hashes (they hash absolute paths)
    r"\d+(\.\d+)?\s?(ms|s)\b(?![a-z])",  # wall times
    r"\(\d+s\)",  # run_sweep's per-run times
)
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclasses.dataclass(frozen=True)
class Output:
  """A registered output: a shell command (`kind='command'`) or docs/snippets/<name>.py (`kind='snippet'`)."""

  command: str = ""
  kind: str = "command"
  keep: str = ""  # regex: keep only the lines that match (empty: every line)
  env: tuple[tuple[str, str], ...] = ()
  head: int = 0  # > 0: keep the first `head` lines


OUTPUTS: dict[str, Output] = {}


def register(name: str, **kwargs) -> None:
  OUTPUTS[name] = Output(**kwargs)


# ---- registry: one entry per real-output block of the README -----------------------------------------------
_RUNS = "runs/docs"
register("core_logprobs", kind="snippet")
register("core_losses", kind="snippet")
register("core_ches", kind="snippet")


def run(name: str) -> str:
  """The output of registered `name`, run fresh, with paths under the repository stored relative to it."""
  out = OUTPUTS[name]
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      HF_HUB_OFFLINE="1",
      HF_DATASETS_OFFLINE="1",
      TRANSFORMERS_OFFLINE="1",
      MPLBACKEND="Agg",
      PYTHONPATH=str(ROOT),
      **dict(out.env),
  )
  if out.kind == "snippet":
    cmd = [sys.executable, str(SNIPPETS / f"{name}.py")]
  else:
    cmd = ["bash", "-c", out.command]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if proc.returncode != 0:
    raise RuntimeError(f"docs output {name!r} failed (rc {proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
  text = proc.stdout.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
  lines = [line.rstrip() for line in text.splitlines()]
  if out.keep:
    lines = [line for line in lines if re.search(out.keep, line)]
  if out.head:
    lines = lines[: out.head]
  return "\n".join(lines).strip() + "\n"


def stored(name: str) -> str:
  return (STORE / f"{name}.txt").read_text()


def snippet_code(name: str) -> str:
  return (SNIPPETS / f"{name}.py").read_text()


def _masked(text: str) -> str:
  for pattern in MASKS:
    text = re.sub(pattern, "<masked>", text)
  return text


def compare(got: str, want: str, rtol: float = 1e-3, atol: float = 1e-6) -> str | None:
  """None when `got` matches `want` (text equal, numbers within tolerance, masks ignored); else the first
  differing line pair."""
  got_lines, want_lines = _masked(got).splitlines(), _masked(want).splitlines()
  if len(got_lines) != len(want_lines):
    return f"{len(got_lines)} lines instead of {len(want_lines)}"
  for g, w in zip(got_lines, want_lines):
    if _NUMBER.sub("#", g) != _NUMBER.sub("#", w):
      return f"got  {g!r}\nwant {w!r}"
    for a, b in zip(_NUMBER.findall(g), _NUMBER.findall(w)):
      x, y = float(a), float(b)
      if abs(x - y) > atol + rtol * abs(y):
        return f"got  {g!r}\nwant {w!r}\n({a} vs {b})"
  return None


def expand(markdown: str) -> str:
  """A section with its `<!-- output: NAME -->` / `<!-- snippet: NAME -->` markers replaced by the stored text."""

  def output(m: re.Match) -> str:
    return "```\n" + stored(m.group(1)).rstrip("\n") + "\n```"

  def snippet(m: re.Match) -> str:
    name = m.group(1)
    return "```python\n" + snippet_code(name).rstrip("\n") + "\n```\nOutput:\n" + output(m)

  markdown = re.sub(r"^<!-- output: (\w+) -->$", output, markdown, flags=re.M)
  return re.sub(r"^<!-- snippet: (\w+) -->$", snippet, markdown, flags=re.M)


def main(argv: list[str]) -> int:
  names = list(OUTPUTS)
  if "--only" in argv:
    names = [argv[argv.index("--only") + 1]]
  failed = 0
  for name in names:
    text = run(name)
    if "--check" in argv:
      diff = compare(text, stored(name))
      if diff:
        failed += 1
        print(f"{name}: differs from docs/outputs/{name}.txt:\n{diff}", file=sys.stderr)
      else:
        print(f"{name}: ok")
    else:
      STORE.mkdir(parents=True, exist_ok=True)
      (STORE / f"{name}.txt").write_text(text)
      print(f"{name}: stored ({len(text.splitlines())} lines)")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
