"""Imports point one way (issue 11, acceptance 4): leaves <- reduce <- deploy <- measure <- search <- report <- cli,
and no module-level import cycle among tpsexplore's modules. Read from the source with `ast`, so a lazy import
inside a function counts for the direction too."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tpsexplore"

# a unit (top-level module or subpackage of tpsexplore) may import only units of a lower rank
RANK = {
    "errors": 0, "stats": 0, "progressbar": 0, "lazy": 0, "writable": 0,
    "models": 0,  # backbones timm lacks (PVT v1, CvT): torch and timm only; backbones registers them
    "manifest": 1, "backbones": 1, "storage": 1,
    "reduce": 2,
    "deploy": 3,
    "measure": 4,
    "search": 5,
    "report": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The tpsexplore modules ``name`` imports (``from . import x`` resolves to the submodule when one exists)."""
    modules = _modules()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t.startswith("tpsexplore.") and t in modules and t != name}


def _unit(module: str) -> str:
    return module.split(".")[1]


def test_imports_point_one_way():
    wrong = []
    for name, path in _modules().items():
        if name == "tpsexplore":
            continue  # the package root re-exports the public API lazily; nothing imports it back
        unit = _unit(name)
        assert unit in RANK, f"{name}: new unit {unit!r}; give it a rank in tests/test_layering.py"
        for target in _imports(name, path, top_level_only=False):
            other = _unit(target)
            if other != unit and RANK[other] >= RANK[unit]:
                wrong.append(f"{name} imports {target} ({unit} rank {RANK[unit]} -> {other} rank {RANK[other]})")
    assert not wrong, "\n".join(wrong)


def test_no_module_level_import_cycle():
    graph = defaultdict(set)
    for name, path in _modules().items():
        graph[name] = _imports(name, path, top_level_only=True)
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package importing its own submodules (re-exports) is not a cycle back into the package
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)
