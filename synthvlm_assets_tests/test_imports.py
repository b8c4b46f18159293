"""The package's shape: no import cycle (module level, TYPE_CHECKING or inside functions), and the domain code
under the Dagster layer imports no Dagster (only the Pipes protocol package, which a training process speaks)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "synthvlm_assets"
# The Dagster layer: the definitions and what operates a Dagster instance (the CLI, its storage, recovery).
DAGSTER_LAYER = ("synthvlm_assets.defs", "synthvlm_assets.definitions", "synthvlm_assets.cli",
                 "synthvlm_assets.instance", "synthvlm_assets.recovery")  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names (`from a import b` names a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_no_import_cycle():
    modules = _modules()
    graph = {m: sorted(n for n in _imports(p) if n in modules and n != m) for m, p in modules.items()}
    assert sum(map(len, graph.values())) > 50, "too few edges: the walk is broken"
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_domain_code_imports_no_dagster():
    offenders = [
        module
        for module, path in _modules().items()
        if not module.startswith(DAGSTER_LAYER)
        and any(
            top.startswith("dagster") and top != "dagster_pipes" for top in {n.split(".")[0] for n in _imports(path)}
        )
    ]
    assert not offenders, f"domain modules importing Dagster (belongs in defs/): {offenders}"
