"""The library's layers: every import inside ``lib/cxrstudy`` points down (or sideways within a
layer), so a reader can learn the package bottom-up and a low layer never drags in a high one.

Read from the source (``ast``), not by importing, so lazy imports inside functions count too.
"""
import ast
from pathlib import Path

import pytest
from _fakes import REPO

PACKAGE = REPO / "lib" / "cxrstudy"

#: top-level module or subpackage → layer (0 = depends on nothing of ours).
LAYERS = {
    "paths": 0, "files": 0, "arguments": 0, "plots": 0, "display": 0,
    "data": 1, "metrics": 1, "outputs": 1, "config": 1, "provenance": 1,
    "models": 2, "explore": 2, "rehearsal": 2,
    "train": 3,
    "evaluate": 4, "experiment": 4, "tables": 4,
    "report": 5, "explain": 5,
    "studies": 6,
    "runner": 7, "workers": 7, "schedule": 7,
    "cli": 8,
}


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_units(path: Path) -> set[str]:
    """The top-level units of cxrstudy that ``path`` imports (absolute or relative)."""
    package = list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cxrstudy.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").startswith("cxrstudy."):
                    found.add(node.module.split(".")[1])
                continue
            base = package[:len(package) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
            found |= {parts[0]} if parts else {a.name for a in node.names}
    return found - {_unit(path), "__init__"}


def import_edges() -> list[tuple[str, str, str]]:
    """(file, its unit, the unit it imports) for every cross-unit import in the package."""
    return [(str(path.relative_to(PACKAGE)), _unit(path), target)
            for path in sorted(PACKAGE.rglob("*.py"))
            for target in sorted(_imported_units(path))]


def test_every_unit_has_a_layer():
    units = {_unit(path) for path in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


def test_imports_point_down():
    upward = [f"{file} ({unit}, layer {LAYERS[unit]}) imports {target} (layer {LAYERS[target]})"
              for file, unit, target in import_edges()
              if target in LAYERS and unit in LAYERS and LAYERS[target] > LAYERS[unit]]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("low, high", [("models", "train"), ("models", "evaluate"),
                                       ("explain", "studies"), ("report", "studies"),
                                       ("experiment", "studies"), ("data", "models")])
def test_named_arrows_are_absent(low, high):
    assert not [f for f, unit, target in import_edges() if unit == low and target == high]


def test_the_reader_sees_relative_and_lazy_imports():
    """Known arrows are found: relative imports two levels up and lazy ones inside functions
    (studies import experiment only inside their functions)."""
    edges = {(unit, target) for _, unit, target in import_edges()}
    assert ("studies", "experiment") in edges  # lazy imports inside studies' functions
    assert ("train", "models") in edges


def _module_imports() -> dict[str, set[str]]:
    """Module → the cxrstudy modules it imports (``from . import x`` names count when ``x`` is
    a module; imports inside functions count)."""
    root = PACKAGE.parent
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = (package[:len(package) - node.level + 1] if node.level else [])
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {c for c in [target] + [f"{target}.{a.name}" for a in node.names]
                          if c in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        graph[name] = found - {name}
    return graph


def test_no_two_modules_import_each_other_in_a_loop():
    """A package's ``__init__`` re-exporting its modules is not a loop; any other cycle is."""
    graph = {m: {t for t in targets if not m.startswith(t + ".")}
             for m, targets in _module_imports().items()}
    state, loops = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                loops.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not loops, loops
    assert "cxrstudy.data.download" in graph["cxrstudy.data.obtain"]  # the graph is read
