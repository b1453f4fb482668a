"""The import structure of the package, read with `ast`: one-way imports, entry points as leaves.

Checked on every module of displacement_jax/ (module-level and function-level imports alike):
- no import cycle between modules (a package's __init__ re-exporting its submodules is not an edge back);
- nothing imports an entry point (the CLIs and the pipelines that `train.MAINS` dispatches to); each CLI package
  (train/, score/, audit/) runs through its __main__.py, which imports only its main.py;
- the pure core (errors, logprobs, losses, ches, theory, displacement) imports nothing of the package above it,
  and in particular no runtime module;
- the runtime layer (runtime, forward, generate, sharding, rundir, interrupts, plots, models/, data/) imports
  nothing of the packages built on it (train/, score/, config/, experiments/, audit/, report);
- train/ and score/ import nothing of each other, nor of experiments/ or audit/;
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
    "displacement_jax.displacement",
    "displacement_jax.gradients",
}
RUNTIME = (
    "displacement_jax.runtime",
    "displacement_jax.forward",
    "displacement_jax.generate",
    "displacement_jax.sharding",
    "displacement_jax.rundir",
    "displacement_jax.interrupts",
    "displacement_jax.plots",
    "displacement_jax.models",
    "displacement_jax.data",
)
ABOVE_RUNTIME = (
    "displacement_jax.train",
    "displacement_jax.score",
    "displacement_jax.config",
    "displacement_jax.experiments",
    "displacement_jax.audit",
    "displacement_jax.report",
)
CLI_PACKAGES = ("displacement_jax.train", "displacement_jax.score", "displacement_jax.audit")


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
  """`module` is one of `prefixes` or a module inside one of them."""
  return any(module == p or module.startswith(p + ".") for p in prefixes)


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


def test_core_imports_no_runtime_module():
  bad = [f"{m} imports {t}" for m in CORE for t, _, _ in _imports(m) if _in(t, RUNTIME + ABOVE_RUNTIME)]
  assert not bad, bad


def test_runtime_layer_imports_nothing_built_on_it():
  bad = [f"{m} imports {t}" for m in MODULES if _in(m, RUNTIME) for t, _, _ in _imports(m) if _in(t, ABOVE_RUNTIME)]
  assert not bad, bad


AUDIT_REPLAY = "displacement_jax.audit.replay"  # the audit's primitive: training's monitor (eval.audit) uses it


def test_train_and_score_are_independent_packages():
  others = {
      "displacement_jax.train": ("displacement_jax.score", "displacement_jax.experiments", "displacement_jax.audit"),
      "displacement_jax.score": ("displacement_jax.train", "displacement_jax.experiments", "displacement_jax.audit"),
  }
  bad = [
      f"{m} imports {t}"
      for pkg, forbidden in others.items()
      for m in MODULES
      if _in(m, (pkg,))
      for t, _, _ in _imports(m)
      if _in(t, forbidden) and not (pkg == "displacement_jax.train" and t == AUDIT_REPLAY)
  ]
  assert not bad, bad


def test_audit_replay_is_built_on_the_runtime_layer_only():
  """train/ may use audit.replay (the eval.audit monitor), so the replay imports nothing above the runtime layer."""
  bad = [f"{AUDIT_REPLAY} imports {t}" for t, _, _ in _imports(AUDIT_REPLAY) if _in(t, ABOVE_RUNTIME)]
  assert not bad, bad


def test_cli_packages_run_through_their_main():
  """`python -m displacement_jax.<pkg>` runs pkg/__main__.py: it exists, imports only pkg.main, and both are entry
  points (so the test above proves nothing else imports them)."""
  for pkg in CLI_PACKAGES:
    main, dunder = pkg + ".main", pkg + ".__main__"
    assert {main, dunder} <= ENTRY_POINTS and {main, dunder} <= set(MODULES), pkg
    assert {t for t, _, _ in _imports(dunder)} == {main}, dunder
    assert not [m for m in MODULES for t, _, _ in _imports(m) if t == main and m != dunder], main


def test_package_imports_are_at_module_top():
  bad = [f"{m}:{line} imports {t} inside a function" for m in MODULES for t, line, top in _imports(m) if not top]
  assert not bad, bad


def test_the_checks_see_real_edges():
  """The walker itself: known edges are found (so an empty result above means something)."""
  assert "displacement_jax.train.loop" in _graph()["displacement_jax.train.main"]
  assert "displacement_jax.ches" in _graph()["displacement_jax.score.core"]
  assert "displacement_jax.errors" in _graph()["displacement_jax.losses"]
  assert "displacement_jax.runtime" in _graph()["displacement_jax.score.core"]
  assert "displacement_jax.theory" in _graph()["displacement_jax.displacement"]
  assert _in("displacement_jax.train.loop", ("displacement_jax.train",))
  assert not _in("displacement_jax.trainer", ("displacement_jax.train",))
