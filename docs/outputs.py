r"""The docs' real-output blocks (README.md, docs/*.md): each is produced by a command registered here and
checked against a fresh run.

  python docs/outputs.py                 # run every registered command, store docs/outputs/<name>.txt
  python docs/outputs.py --only NAME     # one of them
  python docs/outputs.py --check         # run them and compare with the stored text (what the tests do)
  python docs/outputs.py --check --slow  # the slow ones only (minutes each: what .ci/run does after the suite)

A section of docs/sections/ includes a stored output with the marker line `<!-- output: NAME -->`;
docs/build_readme.py replaces it with the fenced text. A snippet (`kind='snippet'`, the code in
docs/snippets/NAME.py) is included with `<!-- snippet: NAME -->`: its code block, then "Output:" and its output.
Commands run from the repository root with JAX_PLATFORMS=cpu, the HF offline variables and this interpreter as
`python`; paths below the
repository root are stored relative to it. `compare` treats numbers as equal within a relative 1e-3 (XLA:CPU
rounding may differ between CPUs; an output whose run amplifies it registers a wider `rtol`, with the reason,
and `check` compares at it) and ignores what `MASKS` matches (hashes, timings).
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
  slow: bool = False  # minutes on the 2-core CPU: checked by .ci/run (`--check --slow`), not by the test suite
  rtol: float = 1e-3  # relative tolerance of `compare` for this output's numbers


OUTPUTS: dict[str, Output] = {}


def register(name: str, **kwargs) -> None:
  OUTPUTS[name] = Output(**kwargs)


# ---- registry: one entry per real-output block of the docs -------------------------------------------------
_RUNS = "runs/docs"
register("core_logprobs", kind="snippet")
register("core_losses", kind="snippet")
register("core_ches", kind="snippet")


def _shown(*commands: str) -> str:
  """bash that prints `$ <command>` before running each command (stderr into stdout)."""
  return "; ".join(f"echo {shlex.quote('$ ' + c)}; {c} 2>&1" for c in commands)


# the README's first command on the packaged SmolLM2-135M-Instruct (about 2.5 minutes on the 2-core CPU)
register(
    "demo",
    command=f"python -m displacement_jax.train --config=configs/demo.py --config.output_dir={_RUNS}/demo",
    keep=r"^\[demo\]",
    slow=True,
    # five RMSprop steps at lr 1e-6 (its first step is about 10 lr sign(g) per parameter) on a 135M model: a float32
    # rounding difference between CPUs can move a per-pair change in the third digit; discrete counts stay
    rtol=2e-2,
)
register(
    "demo_tiny",
    command=f"python -m displacement_jax.train --config=configs/demo.py:tiny --config.output_dir={_RUNS}/demo_tiny",
    keep=r"^\[demo\]",
    slow=True,
    rtol=2e-2,  # RMSprop at lr 1e-3 on a random model, as train_dpo_tiny
)
# Section 3 in single-token mode on the packaged SmolLM2-135M-Instruct (about 2.5 minutes)
register(
    "persona_demo",
    command="python -m displacement_jax.train --config=configs/persona_demo.py --config.progress=False "
    f"--config.output_dir={_RUNS}/persona_demo",
    keep=r"^\[(demo|sft)\]",
    slow=True,
)
register(
    "persona_demo_tiny",
    command="python -m displacement_jax.train --config=configs/persona_demo.py:tiny --config.progress=False "
    f"--config.output_dir={_RUNS}/persona_demo_tiny",
    keep=r"^\[(demo|sft)\]",
    slow=True,
)
# train.md
register(
    "train_dpo_tiny",
    command=f"rm -rf {_RUNS}/dpo_tiny; python -m displacement_jax.train --config=configs/dpo_tiny.py "
    f"--config.progress=False --config.output_dir={_RUNS}/dpo_tiny",
    keep=r"^(data|reference|monitor|WARNING)",
    slow=True,
    # 10 RMSprop steps at lr 1e-3 amplify XLA:CPU's rounding differences: on CI's CPU dlogp(y-) at step 10 read
    # -0.8882 against this machine's -0.8950 (0.8%), every other number within 1e-3.
    rtol=2e-2,
)
register(
    "train_persona_tiny",
    command=f"rm -rf {_RUNS}/persona_single_token; python -m displacement_jax.train --config=configs/dpo_tiny.py "
    f"--config.progress=False --config.output_dir={_RUNS}/persona_single_token "
    "--config.data.path=displacement_jax/assets/persona_demo.jsonl --config.data.single_token=True "
    "--config.data.format=persona --config.eval.top_k=5 --config.eval.every=2 --config.num_steps=6 "
    "--config.optim.lr=1e-4",
    keep=r"^(data|reference|monitor|WARNING)",
    slow=True,
)
# score.md
register(
    "score_tiny",
    command=f"rm -rf {_RUNS}/score_tiny; "
    + _shown(
        "python -m displacement_jax.score --config=configs/score_tiny.py --config.filter.mode=lowest_fraction "
        f"--config.filter.fraction=0.25 --config.progress=False --config.output_dir={_RUNS}/score_tiny",
        f"head -1 {_RUNS}/score_tiny/scores.jsonl",
    ),
    slow=True,
)
# theory.md
register(
    "theory_gradient_flow",
    command=_shown(f"python examples/theory_gradient_flow.py --out {_RUNS}/theory_gradient_flow.png"),
    slow=True,
)
# experiments.md: the tiny run of each family, then its report
register(
    "persona_tiny",
    command="rm -rf runs/persona_olmo1b/tiny; "
    + _shown(
        "python -m displacement_jax.train --config=configs/persona.py:model=olmo1b,tiny",
        "python -m displacement_jax.report persona runs/persona_olmo1b/tiny",
    ),
    keep=r"^(\$|persona |Table|model |tiny-llama|y\+/y-|No/Never|wrote)",
    slow=True,
)
register(
    "quantiles_tiny",
    command="rm -rf runs/quantiles_uf_tiny; "
    + _shown(
        "python -m displacement_jax.train --config=configs/ches_quantiles.py:dataset=ultrafeedback,tiny "
        "--config.quantiles.measure=all --config.quantiles.q=-1",
        "python -m displacement_jax.report quantiles runs/quantiles_uf_tiny",
    ),
    keep=r"^(\$|ches |minus_normalized|last_hidden|Figure|measure |wrote)",
    slow=True,
)
register(
    "sorry_tiny",
    command="rm -rf runs/sorry_gemma2b_it_tiny; "
    + _shown(
        "python -m displacement_jax.train --config=configs/sorry.py:model=gemma2b_it,tiny",
        "python -m displacement_jax.report sorry runs/sorry_gemma2b_it_tiny",
    ),
    keep=r"^(\$|sorry:|Figure|model |llama |wrote)",
    slow=True,
)
# launch.md
register(
    "sweep_dry_run",
    command="python launch/run_sweep.py configs/ches_quantiles.py:model=olmo1b --dry-run "
    "| sed \"s|$(python -c 'import sys; print(sys.executable)')|python|\" | sed -n '1,2p;$p'",
    slow=True,
)
register(
    "sweep_tiny",
    command="rm -rf runs/quantiles_uf_tiny; "
    + _shown(
        'python launch/run_sweep.py configs/ches_quantiles.py:tiny --only "q=1.0_seed=0" --parallel 2',
        "python -m displacement_jax.report quantiles runs/quantiles_uf_tiny",
    ).replace(  # two at a time finish in either order: the run lines, unnumbered, sorted
        "--parallel 2 2>&1;", "--parallel 2 2>&1 | sed -E 's/^\\[[0-9]+\\/3 ok\\]/[ok]/' | LC_ALL=C sort;", 1
    ),
    keep=r"^(\$|\[ok\]|all 3|Figure|measure |ches |minus_normalized|last_hidden|wrote)",
    slow=True,
)
register(
    "local_two_processes",
    command=f"rm -rf {_RUNS}/dpo_tiny_2proc; python launch/local.py -n 2 -d 2 -- python -m displacement_jax.train "
    f"--config=configs/dpo_tiny.py --config.output_dir={_RUNS}/dpo_tiny_2proc --config.num_steps=4 "
    "--config.progress=False 2>&1 | sed -E 's/pid [0-9]+/pid <pid>/; s/127\\.0\\.0\\.1:[0-9]+/127.0.0.1:<port>/'",
    keep=r"^(\[local\]|data|reference|monitor)",
    slow=True,
)


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
      PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),  # `python` = this interpreter
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


def check(name: str, text: str) -> str | None:
  """`compare` of `text` with registered `name`'s stored output, at that output's `rtol`."""
  return compare(text, stored(name), rtol=OUTPUTS[name].rtol)


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
  if "--help" in argv or "-h" in argv:  # print the usage; run nothing
    print(__doc__)
    return 0
  names = [n for n, o in OUTPUTS.items() if o.slow == ("--slow" in argv)] if "--check" in argv else list(OUTPUTS)
  if "--only" in argv:
    names = [argv[argv.index("--only") + 1]]
  failed = 0
  for name in names:
    text = run(name)
    if "--check" in argv:
      diff = check(name, text)
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
