"""The papers' reported numbers, read from ``params/paper_reference.yaml`` (their one source).

Each number carries where it comes from; a number we could not source is recorded with the
reason instead of a value. :func:`check_reference` refuses an entry without a source, so a
number cannot slip in unreferenced. A ``value`` is one number or, for a per-class metric, a
mapping of class names to numbers (the report's per-class table reads it so). ``requires``
(optional) names the settings of the model the number was measured on (e.g. the MXA block's
placement): the number stands only beside a run that recorded the same (:func:`meets_requirements`).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .paths import repo_root

REFERENCE_FILE = "paper_reference.yaml"
NUMBER_FIELDS = ("key", "metric", "dataset", "split", "setting", "source")
SOURCE_FIELDS = ("where", "table", "page", "url", "checked")


class ReferenceError(ValueError):
    """An entry of the paper reference file without a source, a value or a reason."""


def reference_path(params_dir: Path | None = None) -> Path:
    return (Path(params_dir) if params_dir else repo_root() / "params") / REFERENCE_FILE


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_per_class(value: Any) -> bool:
    """A non-empty mapping of class names to numbers."""
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and _is_number(v) for k, v in value.items()))


def check_reference(data: dict, where: str = REFERENCE_FILE) -> dict:
    """Every number names its metric, dataset, split, setting and source, and has exactly one of
    ``value`` (a number, or a per-class mapping of names to numbers) or ``not_available`` (a
    non-empty reason). Returns ``data``."""
    papers = data.get("papers") if isinstance(data, dict) else None
    if not papers:
        raise ReferenceError(f"{where}: no 'papers'")
    for pid, paper in papers.items():
        for field in ("title", "citation", "short", "url", "notebooks", "setting", "numbers"):
            if field not in paper:
                raise ReferenceError(f"{where}: paper {pid!r} has no {field!r}")
        for i, number in enumerate(paper["numbers"]):
            label = f"{where}: {pid}.numbers[{i}] ({number.get('key', '?')})"
            missing = [f for f in NUMBER_FIELDS if not number.get(f)]
            if missing:
                raise ReferenceError(f"{label}: missing {missing}")
            source = number["source"]
            missing = [f for f in SOURCE_FIELDS if f not in source]
            if missing or not source.get("where") or not source.get("checked"):
                raise ReferenceError(f"{label}: source needs {list(SOURCE_FIELDS)} "
                                     "('where' and 'checked' non-empty)")
            requires = number.get("requires")
            if requires is not None and (not isinstance(requires, dict) or not requires):
                raise ReferenceError(f"{label}: 'requires' must map run settings to the values "
                                     f"of the paper's model")
            has_value = _is_number(number.get("value")) or _is_per_class(number.get("value"))
            reason = number.get("not_available")
            if has_value == bool(reason):
                raise ReferenceError(f"{label}: give either a numeric 'value' (or a mapping of "
                                     "class names to numbers) or a 'not_available' reason, not "
                                     "both or neither")
    return data


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ReferenceError(f"the paper reference file {file} is missing")
    return check_reference(yaml.safe_load(file.read_text()) or {}, str(file))


def load_reference(params_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Paper id → its entry (title, citation, setting, numbers …), validated."""
    return _load(str(reference_path(params_dir)))["papers"]


def paper(pid: str, params_dir: Path | None = None) -> dict[str, Any]:
    papers = load_reference(params_dir)
    if pid not in papers:
        raise KeyError(f"no paper {pid!r} in {REFERENCE_FILE}; known: {', '.join(papers)}")
    return papers[pid]


def number(pid: str, key: str, params_dir: Path | None = None) -> dict[str, Any]:
    """One reported number (with its source) by paper id and key."""
    for entry in paper(pid, params_dir)["numbers"]:
        if entry["key"] == key:
            return entry
    raise KeyError(f"paper {pid!r} reports no {key!r} in {REFERENCE_FILE}")


def values_by_prefix(pid: str, prefix: str, params_dir: Path | None = None) -> dict[str, float]:
    """``{rest of key: value}`` for the keys ``<prefix>.<rest>`` that have a value."""
    return {e["key"][len(prefix) + 1:]: e["value"] for e in paper(pid, params_dir)["numbers"]
            if e["key"].startswith(prefix + ".") and "value" in e}


def meets_requirements(entry: dict[str, Any], settings: dict[str, Any] | None
                       ) -> tuple[bool, str]:
    """Whether a run with ``settings`` (what its notebook recorded for the arm) is the model the
    number was measured on: every ``requires`` of the entry holds. No ``requires``: any run.
    Returns (ok, what differs)."""
    requires = entry.get("requires") or {}
    if not requires:
        return True, ""
    if not settings:
        return False, "its settings were not recorded"
    differs = [f"{key} {settings.get(key)!r} (the paper's model: {value!r})"
               for key, value in requires.items() if settings.get(key) != value]
    return not differs, "; ".join(differs)


def source_label(entry: dict[str, Any]) -> str:
    """Short citation of where a number comes from, for a table cell."""
    src = entry["source"]
    parts = [src["where"]] + ([f"table {src['table']}"] if src.get("table") else []) + (
        [f"p. {src['page']}"] if src.get("page") else [])
    return ", ".join(str(p) for p in parts)


__all__ = ["ReferenceError", "check_reference", "load_reference", "meets_requirements", "number",
           "paper",
           "reference_path", "source_label", "values_by_prefix"]
