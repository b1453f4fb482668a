"""Assemble README.md from docs/README_head.md and docs/sections/*.md (in SECTION_ORDER).

python docs/build_readme.py          # rewrite README.md
python docs/build_readme.py --check  # exit 1 if README.md is out of date (tests/test_readme.py runs this)
python docs/build_readme.py --command=1  # print README's first command (2: the test command); .ci/run runs them
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTION_ORDER = (
    "demo",
    "core",
    "theory",
    "models",
    "io",
    "data",
    "train",
    "score",
    "trl",
    "experiments",
    "launch",
    "benchmarks",
    "testing",
    "layout",
)


def build() -> str:
  """The README text: the head, then every section in SECTION_ORDER (each must exist), with the real-output
  markers expanded from docs/outputs/ (docs/outputs.py)."""
  sys.path.insert(0, str(ROOT / "docs"))
  import outputs  # pylint: disable=g-import-not-at-top  (docs/outputs.py, next to this file)

  parts = [(ROOT / "docs" / "README_head.md").read_text().rstrip() + "\n"]
  for name in SECTION_ORDER:
    path = ROOT / "docs" / "sections" / f"{name}.md"
    if not path.exists():
      raise FileNotFoundError(f"README section {path} is missing")
    parts.append(outputs.expand(path.read_text()).rstrip() + "\n")
  return "\n".join(parts)


def readme_commands(text: str) -> list[str]:
  """The command lines of README's first ```bash block, without trailing comments."""
  lines = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
  return [line.split("  #", 1)[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def main(argv: list[str]) -> int:
  for arg in argv:
    if arg.startswith("--command="):
      print(readme_commands((ROOT / "README.md").read_text())[int(arg.split("=", 1)[1]) - 1])
      return 0
  text = build()
  readme = ROOT / "README.md"
  if "--check" in argv:
    if readme.read_text() != text:
      print("README.md is out of date: run python docs/build_readme.py", file=sys.stderr)
      return 1
    return 0
  readme.write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
