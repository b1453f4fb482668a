"""Build README.md (the front page) and the topic pages under docs/ from docs/sections/*.md.

python docs/build_readme.py          # rewrite README.md and every page of PAGES
python docs/build_readme.py --check  # exit 1 if any of them is out of date (tests/test_readme.py runs this)
python docs/build_readme.py --command=1  # print README's first command (2: the test command); .ci/run runs them

docs/sections/ is the only source: README.md is docs/sections/front.md, and each page docs/<name>.md is a title,
a line of links to the other pages, and its sections in order. The real-output markers (`<!-- output: NAME -->`,
`<!-- snippet: NAME -->`) are expanded from docs/outputs/ (docs/outputs.py). A relative link in a section is
written relative to the page it lands in: in front.md relative to the repository root (`docs/results.md`), in
every other section relative to docs/ (`results.md`, `results/demo_displacement.png`, `../BENCHMARKS.md`,
`training.md#outputs-output_dir`); tests/test_doc_links.py checks that every one resolves, anchors included.
docs/results.md and docs/DESIGN.md are written by hand.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ROOT / "docs" / "sections"
FRONT = "front"  # docs/sections/front.md -> README.md
# docs/<page>.md: (title, link text in the navigation line, sections)
PAGES = {
    "quickstart": ("Quick start", "quick start", ("demo",)),
    "core": ("Core API: log-probs, preference losses, CHES", "core API", ("core",)),
    "theory": ("Theory API and the displacement audit", "theory", ("theory",)),
    "models": ("Models and checkpoints", "models and checkpoints", ("models", "io")),
    "data": ("Data formats", "data formats", ("data",)),
    "training": ("Training", "training", ("train",)),
    "scoring": ("Scoring and filtering", "scoring and filtering", ("score",)),
    "trl": ("Coming from TRL", "coming from TRL", ("trl",)),
    "experiments": ("Experiments", "experiments", ("experiments",)),
    "launch": ("Launch and multi-host", "launch and multi-host", ("launch",)),
    "benchmarks": ("Benchmarks", "benchmarks", ("benchmarks",)),
    "testing": ("Tests and CI", "tests and CI", ("testing",)),
    "layout": ("Project layout", "project layout", ("layout",)),
}
HAND_WRITTEN = {"results": "results", "DESIGN": "design"}  # docs/<name>.md, in the navigation line too


def _outputs():
  sys.path.insert(0, str(ROOT / "docs"))
  import outputs  # pylint: disable=g-import-not-at-top  (docs/outputs.py, next to this file)

  return outputs


def _section(name: str) -> str:
  path = SECTIONS / f"{name}.md"
  if not path.exists():
    raise FileNotFoundError(f"docs section {path} is missing")
  return _outputs().expand(path.read_text()).rstrip() + "\n"


def _generated(sections: tuple[str, ...]) -> str:
  sources = " and ".join(f"docs/sections/{s}.md" for s in sections)
  return f"generated from {sources} by docs/build_readme.py; edit {'that file' if len(sections) == 1 else 'those'}"


def _nav(current: str) -> str:
  """One line of links: the front page, then every page (the current one in bold, not linked)."""
  items = ["[README](../README.md)"]
  names = [(page, nav) for page, (_, nav, _) in PAGES.items()] + list(HAND_WRITTEN.items())
  for page, nav in names:
    items.append(f"**{nav}**" if page == current else f"[{nav}]({page}.md)")
  return " · ".join(items)


def build() -> dict[pathlib.Path, str]:
  """Every generated file (README.md and docs/<page>.md for each of PAGES) and its text. Every file of
  docs/sections/ must be used, by the front page or by one page."""
  used = [FRONT] + [s for _, _, sections in PAGES.values() for s in sections]
  unused = sorted({p.stem for p in SECTIONS.glob("*.md")} - set(used))
  if unused or len(used) != len(set(used)):
    raise ValueError(f"docs/sections: every file in exactly one page (unused: {unused}, used: {used})")
  # README's first lines are the two commands (tests/test_readme.py), so its 'generated' line comes last
  files = {ROOT / "README.md": _section(FRONT) + f"\n<!-- {_generated((FRONT,))} -->\n"}
  for page, (title, _, sections) in PAGES.items():
    head = f"<!-- {_generated(sections)} -->\n# {title}\n\n{_nav(page)}\n"
    files[ROOT / "docs" / f"{page}.md"] = "\n".join([head] + [_section(s) for s in sections])
  return files


def readme_commands(text: str) -> list[str]:
  """The command lines of README's first ```bash block, without trailing comments."""
  lines = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
  return [line.split("  #", 1)[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def main(argv: list[str]) -> int:
  if "--help" in argv or "-h" in argv:  # print the usage; run nothing
    print(__doc__)
    return 0
  for arg in argv:
    if arg.startswith("--command="):
      print(readme_commands((ROOT / "README.md").read_text())[int(arg.split("=", 1)[1]) - 1])
      return 0
  files = build()
  if "--check" in argv:
    stale = [p.relative_to(ROOT) for p, text in files.items() if not p.exists() or p.read_text() != text]
    if stale:
      print(f"out of date: {', '.join(map(str, stale))}: run python docs/build_readme.py", file=sys.stderr)
      return 1
    return 0
  for path, text in files.items():
    path.write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
