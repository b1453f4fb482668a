"""Every relative link and image in README.md and docs/*.md resolves: the file exists, and a `#anchor` (in-page or
in another page) is the GitHub slug of one of the target's headings."""

import collections
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _prose_lines(text: str) -> list[tuple[int, str]]:
  """(1-based line number, line) of every line outside fenced code blocks."""
  lines, fenced = [], False
  for i, line in enumerate(text.splitlines(), 1):
    if _FENCE.match(line):
      fenced = not fenced
    elif not fenced:
      lines.append((i, line))
  return lines


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: the rendered text (inline code, emphasis and link targets dropped), lowercased,
  every character but letters, digits, '_', '-' and ' ' removed, spaces turned into '-'."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](target) -> text
  text = re.sub(r"[`*]", "", text).strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """Every heading anchor of a markdown page; a repeated heading gets GitHub's -1, -2, ... suffixes."""
  seen, out = collections.Counter(), set()
  for _, line in _prose_lines(path.read_text()):
    m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      base = slug(m.group(1))
      out.add(base if not seen[base] else f"{base}-{seen[base]}")
      seen[base] += 1
  return out


def _exists(path: pathlib.Path) -> bool:
  """`path` exists with exactly this spelling (GitHub is case-sensitive where a checkout may not be)."""
  rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else None
  if rel is None or not path.exists():
    return path.exists()
  parent = ROOT
  for part in rel.parts:
    if part not in {p.name for p in parent.iterdir()}:
      return False
    parent = parent / part
  return True


def dead_links(path: pathlib.Path) -> list[str]:
  """'page:line: target (why)' for every relative link or image of `path` that does not resolve."""
  dead = []
  for lineno, line in _prose_lines(path.read_text()):
    for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
        continue
      file_part, _, anchor = target.partition("#")
      dest = (path.parent / file_part).resolve() if file_part else path
      where = f"{path.relative_to(ROOT)}:{lineno}: {target}"
      if not _exists(dest):
        dead.append(f"{where} (no such file)")
      elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        dead.append(f"{where} (no heading with that anchor in {dest.relative_to(ROOT)})")
  return dead


def test_slug_follows_github():
  cases = {
      "Training: `python -m displacement_jax.train`": "training-python--m-displacement_jaxtrain",
      "Quick start: on a real model (offline, CPU, 2.5 minutes)": "quick-start-on-a-real-model-offline-cpu-25-minutes",
      "Reproducing the paper's experiments (Sections 3, 5, 6)": "reproducing-the-papers-experiments-sections-3-5-6",
      "Outputs (`output_dir`)": "outputs-output_dir",
  }
  assert {heading: slug(heading) for heading in cases} == cases


def test_the_checker_finds_a_dead_file_and_a_dead_anchor(tmp_path, monkeypatch):
  monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
  (tmp_path / "b.md").write_text("# B\n\n## Tests\n\n## Tests\n")
  page = tmp_path / "a.md"
  page.write_text(
      "# Top\n\n[ok](#top) [ok](b.md#tests-1) ![img](b.md)\n```\n[in code](nowhere.md)\n# not a heading\n```\n"
      "[bad](#not-a-heading) [gone](c.md) [bad anchor](b.md#tests-2) `[code](x.md)` [case](B.md)\n"
  )
  assert dead_links(page) == [
      "a.md:8: #not-a-heading (no heading with that anchor in a.md)",
      "a.md:8: c.md (no such file)",
      "a.md:8: b.md#tests-2 (no heading with that anchor in b.md)",
      "a.md:8: B.md (no such file)",
  ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
  dead = dead_links(page)
  assert not dead, "dead links:\n" + "\n".join(dead)
