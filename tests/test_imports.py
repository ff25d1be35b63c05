"""The house's import graph has no loop: no two modules import each other, directly or
through others, counting imports made inside functions (issue: one engine, one config
layer). Before the redesign it had two (mi2rage_jax.data <-> demo, and remote_jax.data's
synth -> builder -> data)."""
import ast

from tests.conftest import REPO

PACKAGES = ("remote_jax", "mi2rage_jax", "configs")


def _modules():
  mods = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob("*.py"):
      parts = path.relative_to(REPO).with_suffix("").parts
      mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return mods


def _edges(mods):
  """{module: modules of ours it imports}; `from a import b` counts a.b where that is a
  module, else a."""
  edges = {}
  for name, path in mods.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                   for a in node.names]
      else:
        continue
      for target in targets:
        while target and target not in mods:
          target = target.rpartition(".")[0]
        if target and target != name:
          found.add(target)
    edges[name] = found
  return edges


def _cycles(edges):
  """The strongly connected groups of more than one module (Tarjan)."""
  index, low, stack, on, groups = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while not group or group[-1] != v:
        group.append(stack.pop())
        on.discard(group[-1])
      if len(group) > 1:
        groups.append(sorted(group))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return groups


def test_no_import_loops():
  mods = _modules()
  assert {"remote_jax.engine", "mi2rage_jax.pipeline", "configs.common"} <= set(mods)
  assert _cycles(_edges(mods)) == []


def test_the_loop_finder_finds_loops():
  """The check can fail: a planted loop, direct and through a third module."""
  assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []
