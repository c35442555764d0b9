"""The package imports one way: low level <- planning <- front door <- user features.

Every module of ``orthorank/`` is parsed (not imported) and its imports of other orthorank modules
collected, at module level and inside functions. The graph must have no cycle, no import from a
lower layer into a higher one, and no function-level import of an orthorank module (optional
third-party packages such as matplotlib or lm_eval may be imported inside functions).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "orthorank"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE

#: Layers, lowest first; a module may import its own layer and the ones below.
LAYERS: dict[str, tuple[str, ...]] = {
    "low": ("compat", "config", "scoring", "attend", "hooks", "state", "layer", "flops", "plan", "install"),
    "planning": (
        "metrics", "runner", "objective", "search", "recipe", "calibration", "baselines", "selfcalib", "shipped",
        "plancache", "fingerprint", "autoplan", "text", "cliargs",
    ),
    "front": ("patch", ""),  # "" is the package itself (orthorank/__init__.py)
    "features": ("kvcache", "analysis", "eval"),
}
RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}
FEATURES = set(LAYERS["features"])


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SOURCE.rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The orthorank module ``name`` refers to (the longest existing prefix), or ``None``."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names an import statement reads (``from x import y``: ``x.y`` and ``x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names]


def edges() -> list[Edge]:
    modules = all_modules()
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        nested = {id(child) for f in functions for child in ast.walk(f) if child is not f}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported_names(node, module, is_package):
                target = resolve(name, modules)
                if target is not None and target != module:
                    found.append(Edge(module, target, node.lineno, id(node) in nested))
    return found


def group(module: str) -> str:
    """The layer entry of a module: ``plan``, ``kvcache`` (for orthorank.kvcache.cache), or ``""``."""
    parts = module.split(".")[1:]
    return parts[0] if parts else ""


def test_every_module_has_a_layer() -> None:
    unknown = sorted(m for m in all_modules() if group(m) not in RANK)
    assert not unknown, f"modules without a layer in {__name__}.LAYERS: {unknown}"


def test_no_function_level_import_of_the_package() -> None:
    inside = sorted({f"{e.source}:{e.line} imports {e.target}" for e in edges() if e.in_function})
    assert not inside, "imports of orthorank modules inside functions:\n" + "\n".join(inside)


def test_no_upward_import() -> None:
    wrong = []
    for e in edges():
        source, target = group(e.source), group(e.target)
        if source not in RANK or target not in RANK or source == target:
            continue
        if source == "" and e.target == f"{PACKAGE}.kvcache":
            continue  # the top-level API names BudgetCache
        if target in FEATURES:
            wrong.append(f"{e.source}:{e.line} imports the feature {e.target}")
        elif RANK[target] > RANK[source]:
            wrong.append(f"{e.source}:{e.line} ({source or PACKAGE}) imports {e.target} from a higher layer")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in all_modules()}
    for e in edges():
        graph[e.source].add(e.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_graph_is_read() -> None:
    """The parser sees the imports it must judge (a guard against a test that checks nothing)."""
    found = {(e.source, e.target) for e in edges()}
    assert (f"{PACKAGE}.layer", f"{PACKAGE}.scoring") in found
    assert (f"{PACKAGE}.patch", f"{PACKAGE}.install") in found
