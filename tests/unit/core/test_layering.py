"""The library's layers and its import graph, read from the source (``ast``, so lazy imports
inside functions count too): every import inside ``lib/cxrstudy`` points down (or sideways
within a layer), so a reader can learn the package bottom-up and a low layer never drags in a
high one; no two modules import each other in a loop; each paper's home imports no other paper's.
"""
import ast
import functools
from pathlib import Path

import pytest
from _fakes import REPO

PACKAGE = REPO / "lib" / "cxrstudy"

#: unit → layer (0 = depends on nothing of ours). A unit is a top-level module or subpackage;
#: in ``methods/`` it is the module's role, the same file name in every paper's folder
#: (``methods.model`` is every ``methods/<paper>/model.py``), and in ``pipeline/`` each module.
LAYERS = {
    "paths": 0, "files": 0, "plots": 0, "display": 0, "pipeline.arguments": 0,
    "__init__": 0, "methods.__init__": 0, "pipeline.__init__": 0,
    "data": 1, "metrics": 1, "outputs": 1, "reference": 1,
    "pipeline.config": 1, "pipeline.provenance": 1,
    # the shared building blocks, and each paper's network beside them (models/__init__
    # imports the papers' model modules so that create_model knows every registered name)
    "models": 2, "methods.model": 2, "methods.sigmoid_output": 2, "explore": 2, "rehearsal": 2,
    # the shared trainer and losses, and each paper's loss and training step
    "train": 3, "methods.training": 3, "methods.distillation": 3,
    "evaluate": 4, "experiment": 4, "tables": 4, "teachers": 4,
    "report": 5, "explain": 5,
    # each paper's arms and what its notebook calls
    "methods.study": 6,
    "pipeline.order": 7, "pipeline.runner": 7, "pipeline.workers": 7,
    "pipeline.cli": 8, "__main__": 9,
}


@functools.cache
def _modules() -> dict[str, Path]:
    root = PACKAGE.parent
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def unit(module: str) -> str:
    """``cxrstudy.methods.mlcak.training`` → ``methods.training``; ``cxrstudy.pipeline.runner``
    → ``pipeline.runner``; ``cxrstudy.data.nih`` → ``data``."""
    parts = module.split(".")[1:]
    path = _modules()[module]
    if not parts:
        return "__init__"
    if parts[0] == "methods":
        return "methods.__init__" if path.name == "__init__.py" else f"methods.{parts[-1]}"
    if parts[0] == "pipeline":
        return "pipeline.__init__" if path.name == "__init__.py" else f"pipeline.{parts[1]}"
    return parts[0]


@functools.cache
def _module_imports() -> dict[str, set[str]]:
    """Module → the cxrstudy modules it imports (``from . import x`` names count when ``x`` is
    a module; imports inside functions count)."""
    modules = _modules()
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


def import_edges() -> list[tuple[str, str, str, str]]:
    """(module, its unit, the module it imports, that one's unit) for every cross-unit import."""
    return [(module, unit(module), target, unit(target))
            for module, targets in sorted(_module_imports().items()) for target in sorted(targets)
            if unit(target) != unit(module)]


def test_every_unit_has_a_layer():
    units = {unit(module) for module in _modules()}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


def test_imports_point_down():
    upward = [f"{module} ({source}, layer {LAYERS[source]}) imports {target} ({to}, layer {LAYERS[to]})"
              for module, source, target, to in import_edges()
              if source in LAYERS and to in LAYERS and LAYERS[to] > LAYERS[source]]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("low, high", [("models", "train"), ("models", "evaluate"),
                                       ("explain", "methods.study"), ("report", "methods.study"),
                                       ("experiment", "methods.study"), ("data", "models"),
                                       ("methods.model", "methods.training"),
                                       ("train", "methods.training")])
def test_named_arrows_are_absent(low, high):
    assert not [m for m, source, t, to in import_edges() if source == low and to == high]


def test_nothing_below_the_report_imports_it():
    """The report reads what the notebooks wrote; the papers' numbers it prints beside ours come
    from :mod:`cxrstudy.reference`, below it. Only the command line builds it."""
    importers = {source for _, source, _, to in import_edges() if to == "report"}
    assert importers <= {"pipeline.cli"}, importers


def test_each_paper_has_one_home_that_imports_no_other_paper():
    """``methods/<paper>/`` holds the paper's network, loss, training step and arms; a paper's
    modules import the shared blocks, never another paper's (so each can be read alone)."""
    crossing = [(m, t) for m, targets in _module_imports().items() if m.startswith("cxrstudy.methods.")
                for t in targets if t.startswith("cxrstudy.methods.")
                and t.split(".")[2] != m.split(".")[2]]
    assert not crossing, crossing
    papers = {p.name for p in (PACKAGE / "methods").iterdir() if (p / "__init__.py").is_file()}
    assert papers == {"mxa", "mlcak", "glori", "can"}
    assert not (PACKAGE / "studies").exists()


def test_the_reader_sees_relative_and_lazy_imports():
    """Known arrows are found: relative imports two and three levels up and lazy ones inside
    functions (the papers' studies import experiment only inside their functions)."""
    edges = {(source, to) for _, source, _, to in import_edges()}
    assert ("methods.study", "experiment") in edges  # lazy, three levels up
    assert ("train", "models") in edges
    assert ("models", "methods.model") in edges  # the registry's imports of the papers' models


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


def test_a_paper_module_imported_first_still_finds_every_model():
    """The registry's imports of the papers' models (timm's pattern) work whichever module a
    reader imports first: a fresh interpreter importing one paper's model sees all of them."""
    import subprocess
    import sys

    code = ("import cxrstudy.methods.glori.model as g; from cxrstudy.models import list_models; "
            "names = set(list_models()); "
            "assert {'glori', 'can', 'efficientvit_m0_mxa', 'deit_tiny_mt', 'sigmoid_output'} <= names, names")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(PACKAGE.parent), "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
