"""The shape of the package: layers that only import downwards (so no import cycles), imports at
module level, small files and functions (DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vitfab"

# bottom to top; a unit (subpackage or top-level module) imports only units of lower layers
LAYERS = [
    {"errors"},
    {"files", "records", "progress"},
    {"runtime", "rundir", "options"},
    {"lock"},
    {"data"},
    {"models"},
    {"tome", "precision"},
    {"runtimes"},
    {"evaluate"},
    {"measure"},
    {"train", "export"},
    {"nas"},
    {"report"},
    {"optimize"},
    {"boundary"},
    {"cli"},
    {"__main__", "__init__"},
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """``vitfab.optimize.job`` -> ``optimize``; ``vitfab.cli`` -> ``cli``; ``vitfab`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path):
    """(target module, line, at module level) of every vitfab import in a file, functions included."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t == "vitfab" or t.startswith("vitfab."):
                yield t, node.lineno, id(node) in top


def all_files():
    return sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in all_files()}
    assert units <= set(LAYER_OF), sorted(units - set(LAYER_OF))


def test_imports_only_go_down_so_no_cycle():
    bad = []
    for path in all_files():
        src = unit_of(module_name(path))
        for target, line, _ in imports(path):
            dst = unit_of(target)
            if dst != src and LAYER_OF[dst] >= LAYER_OF[src]:
                bad.append(f"{path.relative_to(SRC)}:{line} {src} (layer {LAYER_OF[src]}) imports {target} "
                           f"(layer {LAYER_OF[dst]})")
    assert not bad, "\n".join(bad)


def test_import_graph_between_units_is_acyclic():
    """Independent of the layer table: a cycle between subpackages is found by a depth-first walk."""
    graph: dict[str, set[str]] = {}
    for path in all_files():
        src = unit_of(module_name(path))
        graph.setdefault(src, set()).update(u for u in (unit_of(t) for t, _, _ in imports(path)) if u != src)
    state: dict[str, int] = {}

    def visit(u, trail):
        state[u] = 1
        for v in graph.get(u, ()):
            assert state.get(v) != 1, "import cycle: " + " -> ".join(trail + [u, v])
            if v not in state:
                visit(v, trail + [u])
        state[u] = 2

    for u in graph:
        if u not in state:
            visit(u, [])


def test_intra_package_imports_sit_at_module_level():
    """Function-level imports are for optional heavy dependencies, never to dodge a cycle; only the
    CLI imports its command modules lazily."""
    late = [f"{p.relative_to(SRC)}:{line} {t}" for p in all_files() if p.name != "cli.py"
            for t, line, top in imports(p) if not top]
    assert not late, "\n".join(late)


def test_small_files_and_functions():
    long_files, long_funcs = [], []
    for path in all_files():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            long_files.append(str(path.relative_to(SRC)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_funcs.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not long_files and not long_funcs, (long_files, long_funcs)
    assert len((SRC / "cli.py").read_text().splitlines()) <= 450
