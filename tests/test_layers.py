"""The layers point one way: stages (``transforms``) never import the composition root
(``pipeline``), and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "transforms")


def imports_of(path: Path) -> set[str]:
    """The project modules ``path`` imports at module level or inside functions."""
    found: set[str] = set()
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.rsplit(".", node.level)[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}
    return {n for n in found if n.split(".")[0] in PACKAGES}


def modules() -> dict[str, set[str]]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out[name] = imports_of(path)
    known = set(out)
    return {m: {i for i in deps if i in known} for m, deps in out.items()}


def test_no_stage_module_imports_the_composition_root() -> None:
    offenders = {m: sorted(d for d in deps if d.startswith("pipeline"))
                 for m, deps in modules().items() if m.startswith("transforms")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_import_cycle() -> None:
    graph = modules()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep == node or dep == node.rsplit(".", 1)[0]:
                continue  # a package's own __init__ re-exporting is not a cycle
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep):], dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


MAX_LINES = 600


def test_no_source_file_is_over_600_lines() -> None:
    """A module a newcomer can read in one sitting; past this, split it by responsibility."""
    roots = [*PACKAGES, "tests", "examples"]
    long = {str(p.relative_to(REPO)): n for root in roots for p in sorted((REPO / root).rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
