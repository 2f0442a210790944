"""Profiles (``params/<profile>.yaml``) and ``-p key=value`` overrides, validated before any work.

A profile has ``shared`` keys (given to every notebook that declares them) and per-notebook
sections under ``notebooks``. The schema is the notebooks themselves: each notebook's cell tagged
``parameters`` declares its keys with default values, and a default's type is the key's type.
So a key nobody declares, or a value of the wrong type, is rejected naming the key — before a
single notebook starts.
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..outputs import parse_run_reference
from ..paths import repo_root

# Keys the runner injects into every notebook; each notebook declares them in its parameters cell.
RUNNER_KEYS = ("profile", "output_dir")


class ConfigError(ValueError):
    """A profile or override that cannot be used; the message names the key and the file."""


@dataclass(frozen=True)
class Rule:
    """What a value of one key must be, beyond its type: ``holds`` tests one number, ``says``
    words it for the error. A list value (``resolutions``, ``fractions``) must hold item by item."""

    holds: Callable[[float], bool]
    says: str


def _at_least(low: float) -> Rule:
    return Rule(lambda value: value >= low, f"at least {low}")


_POSITIVE = Rule(lambda value: value > 0, "greater than 0")
_OPEN_UNIT = Rule(lambda value: 0 < value < 1, "strictly between 0 and 1")
_SHARE = Rule(lambda value: 0 < value <= 1, "in (0, 1]")

#: Ranges that a value's type cannot say, so ``lr=-1`` or ``resolutions=[0]`` is refused before
#: any kernel starts rather than minutes into training. A key absent here is not range-checked;
#: a None value ("off", "all") never is. Every float, here or not, must also be finite.
RULES: dict[str, Rule] = {
    # the training schedule (cxrstudy.train.Schedule), and 03/04's teacher
    "epochs": _at_least(1), "teacher_epochs": _at_least(1), "batch_size": _at_least(1),
    "warmup_epochs": _at_least(0), "lr": _POSITIVE, "lr_grid": _POSITIVE, "min_lr": _at_least(0),
    "weight_decay": _at_least(0), "grad_clip": _POSITIVE, "ema_decay": _OPEN_UNIT,
    "early_stopping_patience": _at_least(1), "num_processes": _at_least(1),
    "num_workers": _at_least(0),
    # image sizes in pixels
    "image_size": _at_least(1), "teacher_image_size": _at_least(1), "display_size": _at_least(1),
    "count_image_size": _at_least(1), "resolutions": _at_least(1),
    "hybrid_resolutions": _at_least(1), "strip_sizes": _at_least(1),
    # shares of the training patients (05's label efficiency)
    "fractions": _SHARE,
    # counts and seeds
    "max_images": _at_least(1), "n_boot": _at_least(0), "seed": _at_least(0),
}

#: Parameters that are off when None (the training schedule's one spelling of "off", see
#: :mod:`cxrstudy.train.config`) and numbers of this type when set. A None default alone would
#: accept anything, so ``-p ema_decay=high``, or ``ema_decay: 0`` in a profile meaning "off", is
#: refused here, before any notebook starts.
OPTIONAL_NUMBERS = {"ema_decay": float, "early_stopping_patience": int, "grad_clip": float}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(key: str, value: Any, where: str) -> None:
    """Refuse a non-finite float (``.nan`` compares false to every bound, so training would
    only fail on a ``nan`` loss that does not name the key) and a number outside the key's rule
    (:data:`RULES`), item by item in a list, naming key, value and source."""
    items = value if isinstance(value, (list, tuple)) else [value]
    what = f"each of {key!r}" if isinstance(value, (list, tuple)) else repr(key)
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where}: {what} must be a finite number, got {value!r}")
    rule = RULES.get(key)
    if rule is None:
        return
    for item in items:
        if _is_number(item) and not rule.holds(item):
            raise ConfigError(f"{where}: {what} must be {rule.says}, got {value!r}")


@dataclass
class NotebookSpec:
    """A study notebook and the parameters its tagged cell declares (name → default)."""

    name: str
    path: Path
    defaults: dict[str, Any]
    depends_on: list[str] = field(default_factory=list)
    # metadata.cxrstudy.runs_after_failed_upstream: the notebook reports on its upstream (08),
    # so it still runs, and says what is missing, when one of them failed
    runs_after_failed_upstream: bool = False


def parameters_cell(notebook: dict) -> dict | None:
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    return None


def read_parameter_defaults(path: Path) -> dict[str, Any]:
    """Parse the cell tagged ``parameters``: plain ``name = literal`` assignments only."""
    notebook = json.loads(Path(path).read_text())
    cell = parameters_cell(notebook)
    if cell is None:
        raise ConfigError(f"{path}: no cell tagged 'parameters'")
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    defaults: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError as exc:
                raise ConfigError(
                    f"{path}: parameter {node.targets[0].id!r} must have a literal default") from exc
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            defaults[node.target.id] = ast.literal_eval(node.value)
    missing = [k for k in RUNNER_KEYS if k not in defaults]
    if missing:
        raise ConfigError(f"{path}: the parameters cell must declare {missing}")
    return defaults


def discover_notebooks(folder: Path | None = None) -> dict[str, NotebookSpec]:
    """All ``NN_name.ipynb`` in ``notebooks/``, in order, with their declared parameters."""
    folder = Path(folder) if folder else repo_root() / "notebooks"
    specs = {}
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        meta = json.loads(path.read_text()).get("metadata", {}).get("cxrstudy", {})
        specs[path.stem] = NotebookSpec(path.stem, path, read_parameter_defaults(path),
                                        list(meta.get("depends_on", [])),
                                        bool(meta.get("runs_after_failed_upstream", False)))
    return specs


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_type(key: str, value: Any, default: Any, where: str) -> Any:
    """Accept ``value`` for a parameter whose default is ``default``; int→float widens."""
    if key in OPTIONAL_NUMBERS and value is not None:
        kind = OPTIONAL_NUMBERS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            raise ConfigError(f"{where}: {key!r} must be {kind.__name__} or null (off), "
                              f"got {_type_name(value)} {value!r}")
        if value == 0:
            raise ConfigError(f"{where}: {key!r} is turned off with null (None), not 0")
        return kind(value)
    if default is None or value is None:
        return value  # a None default declares an optional value of any type
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{where}: {key!r} must be {_type_name(default)} (like its default {default!r}), "
            f"got {_type_name(value)} {value!r}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` or ``notebook.key=value``; the value is read as YAML (3, 0.1, true, [a, b])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 as a string; a user typing it means a number
            value = float(value) if any(ch in value.lower() for ch in ".e") else int(value)
        except ValueError:
            pass
    return key, value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last silently, so a profile's second ``epochs:`` would quietly win over the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key == "<<":  # a merge key may repeat; its keys are the merged mapping's
                    continue
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base loader says so itself
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark,
                        f"key {key!r} is given twice; YAML would keep only the last",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_profile_file(profile: str, params_dir: Path | None = None) -> dict:
    params_dir = Path(params_dir) if params_dir else repo_root() / "params"
    path = params_dir / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in params_dir.glob("*.yaml") if p.stem != "paper_reference")
        raise ConfigError(f"unknown profile {profile!r}: no {path}; known profiles: {', '.join(known)}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{line}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a mapping with shared/notebooks sections, "
                          f"got {type(data).__name__}")
    unknown_top = set(data) - {"description", "shared", "notebooks"}
    if unknown_top:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown_top)} "
                          "(allowed: description, shared, notebooks)")
    data.setdefault("shared", {})
    data.setdefault("notebooks", {})
    data["_path"] = str(path)
    return data


def resolve_parameters(
    profile: str,
    overrides: list[str] | None = None,
    notebooks: dict[str, NotebookSpec] | None = None,
    params_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-notebook parameter dicts for ``profile`` with overrides applied, all keys checked.

    Precedence: notebook default < profile ``shared`` < profile ``notebooks.<name>`` <
    ``-p key=value`` < ``-p <name>.key=value``. Raises :class:`ConfigError` naming the first
    unknown key or mistyped value.
    """
    notebooks = notebooks if notebooks is not None else discover_notebooks()
    data = load_profile_file(profile, params_dir)
    where = data["_path"]
    declared_anywhere = {k for spec in notebooks.values() for k in spec.defaults}

    for key in data["shared"]:
        if key in RUNNER_KEYS:
            raise ConfigError(f"{where}: {key!r} is set by the runner, not by a profile")
        if key not in declared_anywhere:
            raise ConfigError(f"{where}: unknown key {key!r} in shared (no notebook declares it)")
    for name, section in data["notebooks"].items():
        if name not in notebooks:
            raise ConfigError(f"{where}: section for unknown notebook {name!r}; "
                              f"known: {', '.join(notebooks)}")
        for key in section or {}:
            if key not in notebooks[name].defaults or key in RUNNER_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r} for notebook {name}")

    parsed = [parse_override(o) for o in overrides or []]
    for key, _ in parsed:
        nb, _, sub = key.rpartition(".")
        if nb:
            if nb not in notebooks:
                raise ConfigError(f"override {key!r}: unknown notebook {nb!r}")
            if sub not in notebooks[nb].defaults or sub in RUNNER_KEYS:
                raise ConfigError(f"override {key!r}: notebook {nb} has no parameter {sub!r}")
        elif key not in declared_anywhere or key in RUNNER_KEYS:
            raise ConfigError(f"override: unknown key {key!r} (no notebook declares it)")

    resolved: dict[str, dict[str, Any]] = {}
    for name, spec in notebooks.items():
        values = {k: v for k, v in spec.defaults.items() if k not in RUNNER_KEYS}
        layers = [(data["shared"], f"{where} shared"),
                  (data["notebooks"].get(name) or {}, f"{where} notebooks.{name}"),
                  ({k: v for k, v in parsed if "." not in k}, "override"),
                  ({k.split(".", 1)[1]: v for k, v in parsed if k.startswith(name + ".")}, "override")]
        for layer, source in layers:
            for key, value in layer.items():
                if key in spec.defaults:
                    values[key] = check_type(key, value, spec.defaults[key], source)
                    check_range(key, values[key], source)
        values["profile"] = profile
        resolved[name] = values
    return resolved


#: Parameters that give an image resolution in pixels (one number or a list), in any notebook.
IMAGE_SIZE_KEYS = ("image_size", "resolutions", "hybrid_resolutions", "teacher_image_size",
                   "display_size")


def image_sizes(resolved: dict[str, dict[str, Any]], dataset: str) -> set[int]:
    """Every resolution the notebooks reading ``dataset`` ask for, in resolved parameters."""
    sizes: set[int] = set()
    for params in resolved.values():
        if params.get("dataset") != dataset:
            continue
        for key in IMAGE_SIZE_KEYS:
            value = params.get(key)
            values = value if isinstance(value, (list, tuple)) else [value]
            sizes |= {int(v) for v in values if isinstance(v, (int, float)) and v}
    return sizes


def run_references(params: dict[str, Any]) -> dict[str, str]:
    """``run:`` values among ``params`` (in lists and mappings too), as key → value."""
    found: dict[str, str] = {}

    def visit(key: str, value: Any) -> None:
        if parse_run_reference(value) is not None:
            found[key] = value
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{key}[{index}]", item)
        elif isinstance(value, dict):
            for sub, item in value.items():
                visit(f"{key}.{sub}", item)

    for key, value in params.items():
        visit(key, value)
    return found


def notebook_dependencies(notebooks: dict[str, NotebookSpec],
                          resolved: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Upstream notebooks of each notebook for one profile, in study order: the ones its
    metadata declares (``cxrstudy.depends_on``, in its order: it feeds the fingerprint), then
    the ones its resolved parameters name with ``run:<notebook>/…``. A reference to an unknown
    notebook, or to itself, is refused."""
    dependencies = {}
    for name, spec in notebooks.items():
        upstream = list(spec.depends_on)
        for key, value in run_references(resolved.get(name, {})).items():
            target, _ = parse_run_reference(value)
            if target == name:
                raise ConfigError(f"{name}: {key}={value!r} refers to the notebook itself")
            if target not in notebooks:
                raise ConfigError(f"{name}: {key}={value!r} names no notebook; write "
                                  f"run:<notebook>/<tag> with one of {', '.join(notebooks)}")
            if target not in upstream:
                upstream.append(target)
        dependencies[name] = upstream
    return dependencies
