"""The import structure of the package, read with `ast`: one-way imports, entry points as leaves.

Checked on every module of displacement_jax/ (module-level and function-level imports alike):
- no import cycle between modules (a package's __init__ re-exporting its submodules is not an edge back);
- nothing imports an entry point (the CLIs and the pipelines that `train.MAINS` dispatches to);
- the pure core (errors, logprobs, losses, ches, theory) imports nothing of the package above it;
- imports of the package itself sit at module top (a function-level import is only for optional heavy deps).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "displacement_jax"
ENTRY_POINTS = {
    "displacement_jax.train.main",
    "displacement_jax.train.__main__",
    "displacement_jax.score.main",
    "displacement_jax.score.__main__",
    "displacement_jax.report",
    "displacement_jax.experiments.demo",
    "displacement_jax.models.convert_gguf",
    "displacement_jax.experiments.persona",
    "displacement_jax.experiments.quantiles",
    "displacement_jax.experiments.sorry_bench.pipeline",
    "displacement_jax.experiments.theory_check",
    "displacement_jax.experiments.generated_pairs",
    "displacement_jax.experiments.persona_demo",
    "displacement_jax.experiments.edit_search",
    "displacement_jax.audit.main",
    "displacement_jax.audit.__main__",
}
CORE = {
    "displacement_jax.errors",
    "displacement_jax.logprobs",
    "displacement_jax.losses",
    "displacement_jax.ches",
    "displacement_jax.theory",
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
  """The package module an imported dotted name refers to (a module, or the module defining an attribute)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str) -> list[tuple[str, int, bool]]:
  """(imported package module, line, at module top) for every import of displacement_jax in `module`."""
  tree = ast.parse(MODULES[module].read_text())
  top = {id(node) for node in tree.body}
  is_pkg = MODULES[module].name == "__init__.py"
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        anchor = module.split(".") if is_pkg else module.split(".")[:-1]
        base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    for name in names:
      if name.startswith("displacement_jax"):
        target = _resolve(name)
        if target and target != module:
          out.append((target, node.lineno, id(node) in top))
  return out


def _graph() -> dict[str, set[str]]:
  graph = {}
  for module in MODULES:
    edges = {t for t, _, _ in _imports(module)}
    if MODULES[module].name == "__init__.py":  # re-exports of its own submodules are not dependencies
      edges = {t for t in edges if not t.startswith(module + ".")}
    graph[module] = edges
  return graph


def test_entry_points_exist_and_train_dispatches_only_to_them():
  assert ENTRY_POINTS <= set(MODULES), sorted(ENTRY_POINTS - set(MODULES))
  for module, path in MODULES.items():
    if "if __name__ == '__main__'" in path.read_text() or 'if __name__ == "__main__"' in path.read_text():
      assert module in ENTRY_POINTS, f"{module} has a __main__ block but is not listed as an entry point"
  from displacement_jax.train import main as train  # pylint: disable=g-import-not-at-top

  assert set(train.MAINS.values()) <= ENTRY_POINTS


def _runs_its_package_main(module: str, target: str) -> bool:
  """`python -m pkg` runs pkg/__main__.py, which imports pkg.main: the one import of an entry point allowed."""
  return module.endswith(".__main__") and target == module.rpartition(".")[0] + ".main"


def test_nothing_imports_an_entry_point():
  bad = [
      f"{m} imports {t} (line {line})"
      for m in MODULES
      for t, line, _ in _imports(m)
      if t in ENTRY_POINTS and not _runs_its_package_main(m, t)
  ]
  assert not bad, bad


def test_no_import_cycles():
  graph, state, path, cycles = _graph(), {}, [], []

  def visit(node):
    state[node] = "open"
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(path[path.index(nxt) :] + [nxt])
      elif nxt not in state:
        visit(nxt)
    path.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, [" -> ".join(c) for c in cycles]


def test_pure_core_imports_nothing_above_it():
  bad = [f"{m} imports {t}" for m in CORE for t, _, _ in _imports(m) if t not in CORE]
  assert not bad, bad


def test_package_imports_are_at_module_top():
  bad = [f"{m}:{line} imports {t} inside a function" for m in MODULES for t, line, top in _imports(m) if not top]
  assert not bad, bad


def test_the_checks_see_real_edges():
  """The walker itself: known edges are found (so an empty result above means something)."""
  assert "displacement_jax.train.loop" in _graph()["displacement_jax.train.main"]
  assert "displacement_jax.ches" in _graph()["displacement_jax.score.core"]
  assert "displacement_jax.errors" in _graph()["displacement_jax.losses"]
