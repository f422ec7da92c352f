"""The library's import structure (issue 9): no cycles, no private imports, stages only import downwards.

Reads every module of ``DeepDosimetricsLib`` with :mod:`ast` (nothing is imported), collects each import
statement wherever it is (module level, inside functions and classes, under ``if TYPE_CHECKING``), absolute
and relative, and checks:

- no import cycle between modules of the library (a lazy import inside a function still counts: it hides
  the cycle from the import system, not from the reader);
- no import of another module's private name (``from X import _name``, ``import X._mod``, or ``m._name``
  on a module bound by an import);
- a stage never imports a later one. The stages, lower first::

      runtime < data < features < deep < {analysis | mrml} < review < {commands, cli, demo}

  ``analysis`` (outcome statistics on feature tables) and ``mrml`` (Slicer nodes and scenes) are peers:
  neither may import the other. ``commands``, ``cli`` and ``demo`` form the top and may use each other;
- every package folder has an ``__init__.py`` with a docstring saying what belongs there.

A new top-level package must be given a stage in ``STAGES`` below (the test says so).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "DeepDosimetricsLib"
ROOT = Path(__file__).resolve().parents[2] / "DeepDosimetrics" / PACKAGE

#: first name under the package -> (rank, group). Lower ranks must not import higher ones; different groups
#: of the same rank must not import each other.
STAGES: dict[str, tuple[int, str]] = {
    "__init__": (0, "runtime"),  # the package itself (its version)
    "runtime": (0, "runtime"),
    "data": (1, "data"),
    "features": (2, "features"),
    "deep": (3, "deep"),
    "analysis": (4, "analysis"),
    "mrml": (4, "mrml"),
    "review": (5, "review"),
    "commands": (6, "top"),
    "cli": (6, "top"),
    "demo": (6, "top"),
}


@dataclass(frozen=True)
class Import:
    """One imported module (or name of a module) of the library, with where it is imported."""

    source: str  # importing module, dotted
    target: str  # imported library module, dotted
    names: tuple[str, ...]  # names taken from it (from-imports), else ()
    line: int

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def library_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = library_files()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for name, path in MODULES.items()}


def resolve_relative(source: str, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) from-import names."""
    if not node.level:
        return node.module or ""
    package = source.split(".") if MODULES[source].name == "__init__.py" else source.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str) -> tuple[list[Import], dict[str, str]]:
    """The library modules ``source`` imports, and local alias -> library module for bound modules."""
    found: list[Import] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(TREES[source]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append(Import(source, alias.name, (), node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = resolve_relative(source, node)
            if not (module == PACKAGE or module.startswith(PACKAGE + ".")):
                continue
            plain = []
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                if submodule in MODULES:  # `from package import module`
                    found.append(Import(source, submodule, (), node.lineno))
                    aliases[alias.asname or alias.name] = submodule
                else:
                    plain.append(alias.name)
            if plain or not node.names:
                found.append(Import(source, module, tuple(plain), node.lineno))
    return found, aliases


EDGES: dict[str, list[Import]] = {name: imports_of(name)[0] for name in MODULES}


def stage_of(module: str) -> tuple[int, str]:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in STAGES:
        pytest.fail(f"{module}: top-level name {key!r} has no stage; add it to STAGES in {Path(__file__).name}")
    return STAGES[key]


def find_cycles() -> list[list[str]]:
    """One representative cycle per strongly connected component (Tarjan), each as a closed path."""
    graph = {name: sorted({i.target for i in EDGES[name] if i.target in MODULES}) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the module count
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for name in graph:
        if name not in index:
            connect(name)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        path = shortest_path_back(graph, start, members)
        cycles.append(path)
    return cycles


def shortest_path_back(graph: dict[str, list[str]], start: str, members: set[str]) -> list[str]:
    """A shortest closed path start -> ... -> start inside one strongly connected component."""
    parents: dict[str, str] = {start: start}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in graph[node]:
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return list(reversed(path)) + [start]
                if nxt in members and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{start} is on no cycle")


def describe_cycle(path: list[str]) -> str:
    steps = []
    for source, target in zip(path, path[1:]):
        line = next(i.line for i in EDGES[source] if i.target == target)
        steps.append(f"{source} (line {line})")
    return " -> ".join(steps + [path[-1]])


# ------------------------------------------------------------------------------------------------------------
def test_the_package_is_found():
    assert f"{PACKAGE}.data.patient" in MODULES and f"{PACKAGE}.cli" in MODULES
    assert sum(len(e) for e in EDGES.values()) > 50  # the walk sees the imports


def test_no_import_cycle():
    cycles = find_cycles()
    assert not cycles, "import cycles between library modules:\n" + "\n".join(map(describe_cycle, cycles))


def test_no_import_of_private_names():
    problems = []
    for source in MODULES:
        found, aliases = imports_of(source)
        for item in found:
            if item.source == item.target:
                continue
            private_module = [p for p in item.target.split(".")[1:] if p.startswith("_") and p != "__init__"]
            if private_module:
                problems.append(f"{item.where()}: imports private module {item.target}")
            for name in item.names:
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                    problems.append(f"{item.where()}: imports private name {name} from {item.target}")
        for node in ast.walk(TREES[source]):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                problems.append(f"{source}:{node.lineno}: uses private {aliases[node.value.id]}.{node.attr}")
    assert not problems, "\n".join(problems)


def test_stages_only_import_downwards():
    problems = []
    for source, found in EDGES.items():
        rank, group = stage_of(source)
        for item in found:
            target_rank, target_group = stage_of(item.target)
            if target_rank > rank:
                problems.append(f"{item.where()}: {group} imports the later stage {target_group} ({item.target})")
            elif target_rank == rank and target_group != group and group != "top":
                problems.append(f"{item.where()}: {group} imports its peer {target_group} ({item.target})")
    assert not problems, "upward imports (a lower stage must not depend on a higher one):\n" + "\n".join(problems)


def test_every_package_has_a_docstring():
    problems = []
    for folder in sorted({p.parent for p in MODULES.values()}):
        init = folder / "__init__.py"
        if not init.is_file():
            problems.append(f"{folder.relative_to(ROOT.parent)}: no __init__.py")
        elif not ast.get_docstring(TREES[module_name(init)]):
            problems.append(f"{init.relative_to(ROOT.parent)}: no docstring saying what the package holds")
    assert not problems, "\n".join(problems)


# --- the checks themselves ----------------------------------------------------------------------------------
def test_relative_imports_resolve():
    source = f"{PACKAGE}.deep.encode.job"
    node = ast.parse("from ..cache import store").body[0]
    assert resolve_relative(source, node) == f"{PACKAGE}.deep.cache"
    node = ast.parse("from . import outputs").body[0]
    assert resolve_relative(source, node) == f"{PACKAGE}.deep.encode"
    node = ast.parse("from .outputs import JOB_FILE").body[0]
    assert resolve_relative(f"{PACKAGE}.deep.encode", node) == f"{PACKAGE}.deep.encode.outputs"


def test_a_cycle_is_found_and_described(monkeypatch):
    a, b, c = (f"{PACKAGE}.data.patient", f"{PACKAGE}.data.cohort", f"{PACKAGE}.data.geometry")
    fake = {name: [] for name in MODULES}
    fake[a] = [Import(a, b, (), 1)]
    fake[b] = [Import(b, c, (), 2)]
    fake[c] = [Import(c, a, (), 3)]
    monkeypatch.setitem(globals(), "EDGES", fake)
    (cycle,) = find_cycles()
    assert cycle[0] == cycle[-1] and set(cycle) == {a, b, c} and len(cycle) == 4
    assert "(line" in describe_cycle(cycle)
