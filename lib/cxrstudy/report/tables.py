"""The study's tables, one per paper: our numbers (as the notebooks wrote them to
``metrics.json``, with their 95% CIs; nothing is recomputed) beside the paper's reported ones.

A caption says where each paper number comes from, which are not available and why, and — when
our dataset, resolution or model is not the paper's — what differs. The profile's note (e.g. the
tiny profile's "the numbers say nothing") is kept apart from the caption: the page shows it once
at the top, a table's own files (Markdown, LaTeX) carry it for when they are read alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..outputs import dropped_summary
from ..display import ci_columns, format_ci, format_number
from ..tables import AUC_COLUMNS, auc_columns
from .collect import NotebookResults
from ..reference import meets_requirements, source_label

OURS = AUC_COLUMNS
#: The value columns of :data:`OURS` and their CI columns, joined for display.
OUR_INTERVALS = {value: ci_columns(value) for value in ("macro AUC", "micro AUC")}


@dataclass
class ReportTable:
    """A table of the report: ``frame`` holds full-precision numbers (the CSV); ``intervals``
    maps a value column to its (low, high) columns, which the display forms join into one cell;
    ``note``: the profile's note, for the table's files read alone (see :attr:`full_caption`)."""

    name: str
    title: str
    caption: str
    frame: pd.DataFrame
    intervals: dict[str, tuple[str, str]] = field(default_factory=dict)
    note: str = ""

    @property
    def full_caption(self) -> str:
        """The caption followed by the profile's note: for a file read without the page."""
        note = self.note.strip()
        if not note:
            return self.caption
        return f"{self.caption} {note if note.endswith('.') else note + '.'}"

    def display(self, digits: int = 3) -> pd.DataFrame:
        """Rounded, with ``value (low–high)`` cells and ``n/a`` where a paper gives no number."""
        shown = pd.DataFrame(index=self.frame.index)
        hidden = {c for pair in self.intervals.values() for c in pair}
        for col in self.frame.columns:
            if col in hidden:
                continue
            values = self.frame[col]
            if col in self.intervals:
                low, high = self.intervals[col]
                shown[f"{col} (95% CI)"] = [
                    format_ci(v, lo, hi, digits)
                    for v, lo, hi in zip(values, self.frame[low], self.frame[high])]
            elif pd.api.types.is_float_dtype(values) or col.startswith("paper "):
                na = "n/a" if col.startswith("paper ") else ""
                shown[col] = [_fmt(v, digits, na, col) for v in values]
            else:
                shown[col] = ["" if _missing(v) else str(v) for v in values]
        return shown.reset_index(drop=True)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value: Any, digits: int, na: str = "", name: str = "") -> str:
    if _missing(value):
        return na
    return format_number(value, digits, name)


def our_setting(nb: NotebookResults) -> dict[str, Any]:
    """Dataset, resolution and model of a notebook's run, from what it recorded."""
    if nb.setting("resolutions") is not None:  # a resolution study: students and a teacher
        sizes = ", ".join(str(s) for s in nb.setting("resolutions"))
        size = f"{sizes} px (teacher {nb.setting('teacher_image_size')} px)"
        sizes_px = [*nb.setting("resolutions"), nb.setting("teacher_image_size")]
    else:
        size = f"{nb.setting('image_size')} px" if nb.setting("image_size") is not None else "?"
        sizes_px = [nb.setting("image_size")]
    model = nb.setting("backbone") or nb.setting("backbones") or nb.setting("vit") or nb.setting("models")
    if isinstance(model, (list, tuple)):
        model = " + ".join(str(m) for m in model)
    return {"dataset": nb.setting("dataset"), "size": size, "sizes_px": sizes_px, "model": model,
            "synthetic": bool(nb.metrics.get("synthetic_data"))}


def paper_resolutions(setting: dict) -> set[int]:
    """The resolutions a paper names: its image size and, for a distillation study, the
    teacher's (MLCAK: 28 px students, 224 px teacher)."""
    return {s for s in (setting.get("image_size"), setting.get("teacher_image_size")) if s}


def caveat(paper: dict, notebooks: list[NotebookResults]) -> str | None:
    """``ours: …; paper: …`` when our dataset, resolution or model differs from the paper's."""
    setting = paper["setting"]
    ran = [nb for nb in notebooks if nb.status != "missing" and nb.metrics]
    if not ran:
        return None
    ours = [our_setting(nb) for nb in ran]
    paper_sizes = paper_resolutions(setting)
    differs = any(
        o["dataset"] != setting.get("dataset_id")
        or not paper_sizes or any(s not in paper_sizes for s in o["sizes_px"])
        or (setting.get("model_id") is None or o["model"] != setting["model_id"])
        for o in ours)
    if not differs:
        return None
    ours_text = "; ".join(f"{nb.name}: {o['dataset']}, {o['size']}, {o['model']}"
                          for nb, o in zip(ran, ours))
    size = (f"{setting['image_size']} px" if setting.get("image_size") else
            "resolution not in our sources")
    if setting.get("teacher_image_size"):
        size += f" (teacher {setting['teacher_image_size']} px)"
    return (f"Not the paper's setting — ours: {ours_text}. Paper: {setting['dataset']}, {size}, "
            f"{setting['model']}.")


def _status_note(nb: NotebookResults) -> str:
    if nb.status == "missing":
        return "missing: no results in this folder"
    if nb.status == "incomplete":
        return "incomplete: no metrics or provenance yet (still running, or interrupted)"
    if nb.status != "ok":
        return f"{nb.status}: see its provenance.json"
    return "" if nb.metrics.get("models") else "no model metrics recorded"


def _auc_numbers(paper: dict) -> list[dict]:
    """The paper's AUC-type numbers (value or not available), i.e. the ones that go beside ours."""
    return [n for n in paper["numbers"]
            if ("AUC" in n["metric"] or "AUROC" in n["metric"]) and "per-class" not in n["metric"]]


def _footnotes(paper: dict, numbers: list[dict]) -> list[str]:
    notes = []
    for n in numbers:
        if "value" in n:
            value = n["value"]
            if isinstance(value, dict):  # a per-class mapping: its numbers are the table's column
                value = f"({len(value)} classes, in the table)"
            notes.append(f"{n['metric']} {value} ({n['setting']}): {paper['short']}, "
                         f"{source_label(n)}" + "".join(f"; {n[extra]}" for extra in ("note", "selection")
                                                      if n.get(extra)))
        else:
            notes.append(f"{n['metric']}: not available — {n['not_available']}")
    return notes


def caption_for(paper: dict, notebooks: list[NotebookResults], what: str,
                numbers: list[dict]) -> str:
    parts = [f"{what}. Paper: {paper['citation']}."]
    parts += _footnotes(paper, numbers)
    missing = [f"{nb.name} ({_status_note(nb)})" for nb in notebooks if _status_note(nb)]
    if missing:
        parts.append("Not in this table: " + ", ".join(missing) + ".")
    warn = caveat(paper, notebooks)
    if warn:
        parts.append(warn)
    if any(our_setting(nb)["synthetic"] for nb in notebooks if nb.metrics):
        parts.append("SYNTHETIC DATA (procedural phantom, not radiographs).")
    return " ".join(p if p.endswith(".") else p + "." for p in parts)


def _our_row(nb: NotebookResults, tag: str, model: dict) -> dict[str, Any]:
    o = model.get("overall") or {}
    return {"notebook": nb.name, "arm": tag, **auc_columns(o),
            "params (M)": model["params"] / 1e6 if model.get("params") is not None else None,
            "note": ""}


def paper_table(pid: str, paper: dict, results: dict[str, NotebookResults], note: str = "") -> ReportTable:
    """Every arm of the paper's notebooks (macro and micro AUC with CIs) beside the paper's AUCs."""
    numbers = _auc_numbers(paper)
    notebooks = [results.get(n) or NotebookResults(n, None, "missing") for n in paper["notebooks"]]
    rows = []
    for nb in notebooks:
        models = nb.metrics.get("models") or {}
        for tag, model in models.items():
            rows.append(_our_row(nb, tag, model))
        if not models:  # missing or failed: keep the paper's numbers for its arms visible
            arms = [a.split("/", 1)[1] for n in numbers for a in n.get("arms", [])
                    if a.startswith(nb.name + "/")] or ["—"]
            rows += [dict({c: None for c in OURS}, notebook=nb.name, arm=a, **{"params (M)": None},
                          note=_status_note(nb)) for a in dict.fromkeys(arms)]
    frame = pd.DataFrame(rows, columns=["notebook", "arm", *OURS, "params (M)", "note"])
    settings = {nb.name: nb.metrics.get("arm_settings") or {} for nb in notebooks}
    for n in numbers:  # several numbers may share a column (one metric, different arms)
        column = f"paper {n['metric']}"
        if column not in frame:
            frame[column] = math.nan
        if "value" not in n:
            continue
        for row, (nb, arm) in enumerate(zip(frame["notebook"], frame["arm"])):
            if f"{nb}/{arm}" not in n.get("arms", []):
                continue
            ran = not pd.isna(frame.loc[row, "macro AUC"])
            same_model, differs = meets_requirements(n, settings[nb].get(arm))
            if same_model or not ran:  # a missing run keeps the paper's number visible
                frame.loc[row, column] = n["value"]
            else:  # a paper number stands only beside the arm that rebuilds the paper's model
                withheld = f"paper {n['value']} not shown: not the paper's model ({differs})"
                frame.loc[row, "note"] = "; ".join(filter(None, [frame.loc[row, "note"], withheld]))
    if frame["note"].eq("").all():
        frame = frame.drop(columns="note")
    title = f"{paper.get('name', pid.upper())}: {paper['title']}"
    caption = caption_for(paper, notebooks, f"Ours against {paper['short']}: test macro and micro "
                          "AUC with patient-bootstrap 95% CIs as the notebooks wrote them", numbers)
    return ReportTable(pid, title, caption, frame, OUR_INTERVALS, note)


def _per_class_ci(nb: NotebookResults, tag: str) -> dict[str, tuple[float, float]]:
    """Per-class CIs from the notebook's ``tables/per_class_auc.csv`` (its ``<tag> low`` and
    ``<tag> high`` columns, see :func:`cxrstudy.tables.per_class_table`)."""
    table = next((t for t in nb.tables if t.name == "per_class_auc"), None)
    if table is None:
        return {}
    frame = pd.read_csv(table.csv)
    low, high = ci_columns(f"{tag} AUC")
    if low not in frame or high not in frame or "class" not in frame:
        return {}
    return {str(c): (float(lo), float(hi)) for c, lo, hi in zip(frame["class"], frame[low], frame[high])}


def per_class_table(pid: str, paper: dict, results: dict[str, NotebookResults],
                    note: str = "") -> ReportTable | None:
    """Classes as rows, every arm's AUC with its CI, and the paper's per-class column."""
    numbers = [n for n in paper["numbers"] if "per-class" in n["metric"]]
    if not numbers:
        return None
    notebooks = [results.get(n) or NotebookResults(n, None, "missing") for n in paper["notebooks"]]
    frame = None
    intervals = {}
    tags = [tag for nb in notebooks for tag in (nb.metrics.get("models") or {})]
    for nb in notebooks:
        for tag, model in (nb.metrics.get("models") or {}).items():
            aucs = model.get("per_class_auc") or {}
            cis = _per_class_ci(nb, tag)
            # an arm two notebooks share (02's and 03's "baseline") is named with its notebook
            arm = tag if tags.count(tag) == 1 else f"{tag} ({nb.name[:2]})"
            column = pd.DataFrame({"class": list(aucs), f"{arm} AUC": [
                math.nan if v is None else v for v in aucs.values()]})
            low, high = intervals[f"{arm} AUC"] = ci_columns(f"{arm} AUC")
            column[low] = [cis.get(c, (math.nan, math.nan))[0] for c in aucs]
            column[high] = [cis.get(c, (math.nan, math.nan))[1] for c in aucs]
            frame = column if frame is None else frame.merge(column, on="class", how="outer", sort=False)
    if frame is None:
        frame = pd.DataFrame({"class": []})
    for n in numbers:
        values = n.get("value") if isinstance(n.get("value"), dict) else {}
        frame[f"paper {n['metric']}"] = [values.get(c, math.nan) for c in frame["class"]]
    caption = caption_for(paper, notebooks, f"Per-class test AUC with 95% CIs against "
                          f"{paper['short']}", numbers)
    return ReportTable(f"{pid}_per_class", f"{paper.get('name', pid.upper())}: per-class AUC", caption, frame,
                       intervals, note)


#: The authors' logged runs and the column of the parameter table each count goes to.
_LOGGED_RUNS = {"baseline": "authors' log without (M)", "mxa": "authors' log with (M)",
                "mxa_kd": "authors' log with + KD (M)"}


def parameter_table(pid: str, paper: dict, results: dict[str, NotebookResults],
                    note: str = "") -> ReportTable | None:
    """Parameter counts a notebook recorded (``metrics['parameters']``) beside the authors'
    logged ones (``log_n_parameters.*``; their baseline's is that of a three-channel stem)."""
    numbers = [n for n in paper["numbers"] if n["metric"].startswith("parameters")]
    if not numbers:
        return None
    # the authors' logged counts (log_n_parameters.<run>), for the paper's model
    logged = {n["key"].split(".", 1)[1]: n["value"] for n in numbers
              if n["key"].startswith("log_n_parameters.") and "value" in n}
    variant = paper["setting"].get("model_id")
    reported = {variant: {column: logged[run] / 1e6 for run, column in _LOGGED_RUNS.items()
                          if run in logged}} if logged and variant else {}
    notebooks = [results.get(n) or NotebookResults(n, None, "missing") for n in paper["notebooks"]]
    rows = {}
    for nb in notebooks:
        for row in nb.metrics.get("parameters") or []:
            rows[row["model"]] = {"model": row["model"], "ours without (M)": row.get("without MXA (M)"),
                                  "ours with (M)": row.get("with MXA (M)")}
    for variant in reported:
        rows.setdefault(variant, {"model": variant, "ours without (M)": math.nan,
                                  "ours with (M)": math.nan})
    frame = pd.DataFrame(list(rows.values()), columns=["model", "ours without (M)", "ours with (M)"])
    for column in _LOGGED_RUNS.values():
        frame[column] = [reported.get(m, {}).get(column, math.nan) for m in frame["model"]]
    counted = [nb for nb in notebooks if nb.metrics.get("parameters")]
    caption = caption_for(paper, counted or notebooks, "Parameter counts (millions) without and "
                          "with the block, ours beside the authors' training logs (the paper's "
                          "text gives no count we could cite)", numbers)
    return ReportTable(f"{pid}_parameters", f"{paper.get('name', pid.upper())}: parameter counts", caption, frame,
                       note=note)


def baseline_table(results: dict[str, NotebookResults], notebook: str = "01_baseline",
                   note: str = "") -> ReportTable | None:
    """The baselines every paper table can be read against (no paper column: not a paper's)."""
    nb = results.get(notebook)
    if nb is None:
        return None
    rows = [_our_row(nb, tag, m) for tag, m in (nb.metrics.get("models") or {}).items()]
    frame = pd.DataFrame(rows, columns=["notebook", "arm", *OURS, "params (M)", "note"]).drop(columns="note")
    o = our_setting(nb) if nb.metrics else None
    parts = ["Baselines: test macro and micro AUC with patient-bootstrap 95% CIs"]
    if o:
        parts.append(f"{o['dataset']}, {o['size']}")
    if _status_note(nb):
        parts.append(f"{notebook} {_status_note(nb)}")
    caption = " ".join(p if p.endswith(".") else p + "." for p in parts)
    return ReportTable("baselines", "Baselines (01)", caption, frame, OUR_INTERVALS, note)


def _dropped(nb: NotebookResults) -> str:
    """How many images the notebook left out as unreadable, and the first few ids."""
    if "dropped_images" not in (nb.metrics or {}):
        return ""  # not recorded (a notebook that loads no training data, or an older run)
    return dropped_summary(nb.metrics["dropped_images"] or {}) or "0"


def status_table(results: dict[str, NotebookResults]) -> pd.DataFrame:
    """One row per notebook: status, wall time, device, commit, parameter hash, and the images
    it left out as unreadable (listed in its metrics.json)."""
    rows = []
    for nb in results.values():
        prov = nb.provenance
        git = prov.get("git") or {}
        device = prov.get("device") or {}
        commit = (git.get("commit") or "")[:10] + (" (dirty)" if git.get("dirty") else "")
        rows.append({"notebook": nb.name, "status": nb.status,
                     "wall time (s)": prov.get("wall_seconds"),
                     "device": device.get("device", "") + (f" ({', '.join(device['gpus'])})"
                                                            if device.get("gpus") else ""),
                     "git commit": commit, "params hash": prov.get("params_hash", ""),
                     "dropped images": _dropped(nb),
                     "figures": len(nb.figures), "tables": len(nb.tables)})
    return pd.DataFrame(rows, columns=["notebook", "status", "wall time (s)", "device", "git commit",
                                       "params hash", "dropped images", "figures", "tables"])


def study_tables(papers: dict[str, dict], results: dict[str, NotebookResults],
                 note: str = "") -> list[ReportTable]:
    """All the report's tables, in reading order: baselines, then per paper."""
    tables = [t for t in [baseline_table(results, note=note)] if t is not None]
    for pid, paper in papers.items():
        tables.append(paper_table(pid, paper, results, note))
        for extra in (parameter_table(pid, paper, results, note), per_class_table(pid, paper, results, note)):
            if extra is not None:
                tables.append(extra)
    return tables


__all__ = ["ReportTable", "baseline_table", "caveat", "our_setting", "paper_resolutions", "paper_table",
           "parameter_table", "per_class_table", "status_table", "study_tables"]
