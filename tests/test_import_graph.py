"""The package's modules import each other without a cycle (docs/design.md, "Layering").

Read from the source (`ast`), not by importing: every `import` statement counts, those inside
functions too, so a lazy import cannot hide a cycle; lazy imports are kept only to defer a
heavy or optional dependency (Pallas, jax-triton, Flax, matplotlib), each said so where it
stands. Importing `a.b.c` runs `a.b`'s `__init__` too, so an edge to a submodule is also an
edge to its packages (but a module's own packages, which always load before it, are not).
"""

from __future__ import annotations

import ast
import pathlib

import kasmina_jax

ROOT = pathlib.Path(kasmina_jax.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for path in ROOT.rglob("*.py"):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


def _ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules its source imports (anywhere in the file)."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
          base = ".".join(up + ([node.module] if node.module else []))
        for a in node.names:
          sub = f"{base}.{a.name}"
          targets.add(sub if sub in mods else base)
    own = set(_ancestors(name))
    edges = set()
    for t in targets:
      while t and t not in mods:  # `import a.b.c` of a name that is not a module
        t = t.rpartition(".")[0]
      if not t:
        continue
      for m in _ancestors(t) + [t]:
        if m in mods and m != name and m not in own:
          edges.add(m)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state = {}  # 1: on the stack, 2: done
  stack = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_no_import_cycle_in_the_package():
  graph = import_graph()
  assert len(graph) > 20 and "kasmina_jax.layer" in graph
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_layer_sits_above_kernels_and_both_above_chunks():
  graph = import_graph()
  assert "kasmina_jax.kernels" in graph["kasmina_jax.layer"]
  assert "kasmina_jax.chunks" in graph["kasmina_jax.layer"]
  for name, edges in graph.items():
    if name.startswith("kasmina_jax.kernels"):
      assert "kasmina_jax.layer" not in edges, name
  assert not {e for e in graph["kasmina_jax.chunks"]
              if e.startswith(("kasmina_jax.layer", "kasmina_jax.kernels"))}


def test_the_cycle_finder_finds_one():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
