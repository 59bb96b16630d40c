"""The import layers of DESIGN.md: no cycles, no upward imports, no function-level imports of mixedjax's own
modules, no reading of another module's underscore attributes.

Each module of ``mixedjax/`` belongs to a layer; a module may import only from layers strictly below it (or
from modules of its own layer that do not import it back: the graph must be acyclic).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "mixedjax"

LAYERS = [
    {"linalg", "optimize", "dfo", "data", "formula", "datasets", "distributions", "cache", "export_cache",
     "crossprod"},
    {"covariance", "terms", "sharding", "sources"},
    {"likelihood", "residuals", "crossed_data", "crossed_likelihood", "lindstrom_bates"},
    {"backends"},
    {"fit"},
    {"ddf", "profile", "bootstrap", "predict", "many", "term_tests", "plots", "tidy"},
    {"inference"},
    {"results"},
    {"model"},
    {"lmer"},
    {"batch", "functional", "cli", "__main__", "__init__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, pathlib.Path]:
    return {p.stem if p.name != "__init__.py" or p.parent == PKG else p.parent.name: p
            for p in PKG.glob("*.py")} | {"datasets": PKG / "datasets" / "__init__.py"}


def _own_imports(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """``(module, line, at module level)`` for every import of a mixedjax module (module level: outside any function,
    e.g. in a top-level ``try``; an import under ``if TYPE_CHECKING`` counts as module level too)."""
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.module and node.module.split(".")[0] == "mixedjax":
                parts = node.module.split(".")
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("mixedjax.")]
        for n in names:
            out.append((n, node.lineno, id(node) not in in_function or _in_type_checking(tree, node)))
    return out


def _in_type_checking(tree: ast.AST, target: ast.AST) -> bool:
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            if any(target is n for n in ast.walk(node)):
                return True
    return False


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        graph[name] = {m for m, _, _ in _own_imports(tree) if m in mods and m != name and
                       not _type_checking_only(tree, m)}
    return graph


def _type_checking_only(tree: ast.AST, module: str) -> bool:
    return all(_in_type_checking(tree, node) for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.level == 1 and (node.module or "").split(".")[0] == module)


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYER_OF))
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"


def test_no_upward_imports():
    bad = []
    for name, deps in _graph().items():
        for d in deps:
            if LAYER_OF[d] > LAYER_OF[name]:
                bad.append(f"{name} (layer {LAYER_OF[name]}) imports {d} (layer {LAYER_OF[d]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]) if d in stack else f"{n} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_level_imports_of_own_modules():
    bad = []
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        for mod, line, top in _own_imports(tree):
            if not top:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {mod} inside a function")
    assert not bad, "\n".join(bad)


def test_no_reading_of_other_modules_private_attributes():
    """``x._name`` is allowed on ``self``/``cls``, on NamedTuples (``_replace``, ``_fields``, ``_asdict``) and
    for pandas' ``_repr_html_``; anything else reads another object's internals."""
    allowed = {"_replace", "_fields", "_asdict", "_make", "_repr_html_", "_metadata", "_constructor"}
    bad = []
    for path in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = ast.unparse(node.value)
                if base in ("self", "cls", "super()") or node.attr in allowed:
                    continue
                bad.append(f"{path.name}:{node.lineno} reads {base}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("bad_source, message", [
    ("from .results import X\n", "upward"),
    ("def f():\n    from .model import X\n", "function-level"),
])
def test_the_checks_catch_violations(bad_source, message):
    """The checkers themselves: an upward import and a function-level import are found."""
    tree = ast.parse(bad_source)
    imports = _own_imports(tree)
    if message == "upward":
        assert LAYER_OF[imports[0][0]] > LAYER_OF["fit"]
    else:
        assert imports and not imports[0][2]
