"""The static ``results/<profile>/index.html``: every report table, every notebook's figures and
tables, links to the executed notebooks and each run's provenance.

Plain HTML with inline CSS and no external resource; every link is relative to the page, so the
profile folder can be moved, zipped or served as it is.
"""
from __future__ import annotations

import html
import os
import re
import struct
import time
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from ..display import fold_ci, format_number, format_numbers, is_learning_rate
from ..outputs import Outputs
from .collect import NotebookResults
from .tables import ReportTable, status_table

GENERATOR = "cxrstudy.report"
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;
padding:0 1rem;color:#222;line-height:1.45}
h1{font-size:1.6rem}h2{margin-top:2.5rem;border-bottom:1px solid #ccc}h3{margin-top:1.5rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}caption{caption-side:top;text-align:left;font-size:.85rem;color:#444;
padding-bottom:.3rem}.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.5rem 1rem}
.missing{color:#b00020;font-weight:600}figure{display:inline-block;margin:.5rem;max-width:46%;
vertical-align:top}figure.wide{display:block;max-width:100%;margin:.5rem 0}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.8rem;overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;max-width:100%}
.table-wrap caption{white-space:normal;position:sticky;left:0;max-width:min(70rem,calc(100vw - 3rem))}
table.long-caption caption{min-width:min(48rem,90vw)}
nav a{margin-right:.8rem}details{margin:.5rem 0}summary{cursor:pointer}code{font-size:.85rem}
"""
#: A figure at least this wide (px), or a many-panel one (at least ``GRID_MIN_WIDTH`` wide and
#: ``GRID_MIN_PIXELS`` in all), is shown at the page's full width instead of beside another.
WIDE_PX = 1100
GRID_MIN_WIDTH = 700
GRID_MIN_PIXELS = 800_000
#: A table caption longer than this (characters) sets a minimum width: a narrow table would
#: otherwise squeeze it into a column of a few words a line.
LONG_CAPTION = 160
#: Tables named ``history_<tag>`` (one per training run) are folded into one collapsed block.
HISTORY_PREFIX = "history_"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def href(target: Path, page: Path) -> str:
    """Relative, URL-quoted link from ``page`` to ``target``."""
    rel = os.path.relpath(Path(target).resolve(), Path(page).resolve().parent)
    return "/".join(quote(part) for part in Path(rel).parts)


def _e(text: object) -> str:
    return html.escape("" if text is None else str(text))


def frame_html(frame: pd.DataFrame, caption: str | None = None) -> str:
    """The table in a horizontally scrolling box, so a wide one never widens the page."""
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_e('' if pd.isna(v) else v)}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    long = ' class="long-caption"' if caption and len(caption) > LONG_CAPTION else ""
    return (f'<div class="table-wrap"><table{long}>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _rounded(frame: pd.DataFrame, digits: int) -> pd.DataFrame:
    """As the Markdown shows it: a value and its CI columns in one cell, numbers rounded."""
    return format_numbers(fold_ci(frame, digits), digits)


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of a PNG from its header; None for a file that is not a readable PNG."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(24)
    except OSError:
        return None
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def is_wide(size: tuple[int, int] | None) -> bool:
    """A figure too wide, or with too many panels, to read at half the page."""
    if size is None:
        return False
    width, height = size
    return width >= WIDE_PX or (width >= GRID_MIN_WIDTH and width * height >= GRID_MIN_PIXELS)


def readable_stem(name: str) -> str:
    """A figure's file name as words, for one saved without a caption: ``per_class_auc`` → ``per
    class auc``."""
    return re.sub(r"[_\s]+", " ", name).strip()


def figure_html(fig: Path, page: Path, notebook: str) -> str:
    """One figure: the PNG (linking to itself), its SVG when there is one, and its caption
    (:meth:`Outputs.figure_caption`; the file name as words when it was saved without one)."""
    svg = fig.with_suffix(".svg")
    extra = f' (<a href="{href(svg, page)}">svg</a>)' if svg.is_file() else ""
    caption = Outputs.figure_caption(fig) or readable_stem(fig.stem)
    wide = ' class="wide"' if is_wide(png_size(fig)) else ""
    return (f'<figure{wide}><a href="{href(fig, page)}"><img src="{href(fig, page)}" '
            f'alt="{_e(notebook)}: {_e(caption)}"></a>'
            f"<figcaption>{_e(caption)}{extra}</figcaption></figure>")


def _parameter(name: str, value: object) -> str:
    if isinstance(value, float) and value != 0 and (is_learning_rate(name) or abs(value) < 1e-3):
        return f"{name}={format_number(value, 6, name)}"
    return f"{name}={value!r}"


def _anchor(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _links(paths: dict[str, Path], page: Path) -> str:
    return " · ".join(f'<a href="{href(p, page)}">{_e(fmt)}</a>' for fmt, p in paths.items()
                      if Path(p).is_file())


def _table_html(table, page: Path, digits: int) -> str:
    frame = pd.read_csv(table.csv)
    links = _links({"csv": table.csv, "md": table.markdown} if table.markdown else
                   {"csv": table.csv}, page)
    return f"<h3>{_e(table.name)}</h3><p>{links}</p>\n" + frame_html(_rounded(frame, digits), table.caption)


def _histories_html(tables: list, page: Path, digits: int) -> str:
    """The per-run training histories, folded into one collapsed block: read on demand, they
    would otherwise bury the notebook's results under one table per arm."""
    runs = "run" if len(tables) == 1 else "runs"
    inner = "\n".join(_table_html(t, page, digits) for t in tables)
    return (f'<details class="histories"><summary>Training histories ({len(tables)} {runs})</summary>\n'
            f"{inner}\n</details>")


def _notebook_section(nb: NotebookResults, page: Path, digits: int) -> str:
    out = [f'<h2 id="{_anchor(nb.name)}">{_e(nb.name)}</h2>']
    if nb.status == "missing":
        out.append('<p class="missing">missing: no results in this folder (not run for this '
                   'profile, or removed)</p>')
        return "\n".join(out)
    files = {"executed notebook": nb.executed, "metrics.json": nb.outputs.metrics_file,
             "provenance.json": nb.outputs.provenance_file}
    links = _links({k: v for k, v in files.items() if v is not None}, page)
    status = f'<span class="missing">{_e(nb.status)}</span>' if nb.status != "ok" else "ok"
    out.append(f"<p>status: {status} · {links}</p>")
    if nb.provenance.get("error"):
        out.append(f"<pre>{_e(nb.provenance['error'][:2000])}</pre>")
    out += [figure_html(fig, page, nb.name) for fig in nb.figures]
    histories = [t for t in nb.tables if t.name.startswith(HISTORY_PREFIX)]
    for table in nb.tables:
        if table.name.startswith(HISTORY_PREFIX):
            if table is histories[0]:
                out.append(_histories_html(histories, page, digits))
            continue
        out.append(_table_html(table, page, digits))
    prov = nb.provenance
    if prov:
        packages = ", ".join(f"{k} {v}" for k, v in sorted((prov.get("packages") or {}).items()) if v)
        params = ", ".join(_parameter(k, v) for k, v in sorted((prov.get("params") or {}).items())
                           if k != "output_dir")
        git = prov.get("git") or {}
        device = prov.get("device") or {}
        out.append("<details><summary>provenance</summary><ul>"
                   f"<li>git commit: <code>{_e(git.get('commit'))}</code>"
                   f"{' (uncommitted changes)' if git.get('dirty') else ''}</li>"
                   f"<li>params hash: <code>{_e(prov.get('params_hash'))}</code>; fingerprint "
                   f"<code>{_e(prov.get('fingerprint'))}</code></li>"
                   f"<li>wall time: {_e(prov.get('wall_seconds'))} s</li>"
                   f"<li>device: {_e(device)}</li><li>packages: {_e(packages)}</li>"
                   f"<li>parameters: <code>{_e(params)}</code></li></ul></details>")
    return "\n".join(out)


def render_index(profile: str, page: Path, tables: list[ReportTable],
                 table_files: dict[str, dict[str, Path]], results: dict[str, NotebookResults],
                 note: str = "", digits: int = 3, report_files: dict[str, Path] | None = None) -> str:
    """The whole page as a string (``page`` is where it will be written, for relative links).
    ``report_files``: the report's own files to link (label → path; they must exist by the time
    the page is read)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    nav = " ".join(f'<a href="#{_anchor(n)}">{_e(n)}</a>' for n in results)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta name="generator" content="{GENERATOR}">',
             f'<meta name="cxrstudy-profile" content="{_e(profile)}">',
             f"<title>cxrstudy — profile {_e(profile)}</title><style>{CSS}</style></head><body>",
             f"<h1>cxrstudy results — profile <code>{_e(profile)}</code></h1>",
             f"<p>Generated {_e(stamp)} from the notebooks' outputs in this folder "
             "(nothing retrained; regenerate with <code>cxrstudy report --profile "
             f"{_e(profile)}</code>).</p>"]
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    if report_files:
        links = " · ".join(f'<a href="{href(path, page)}">{_e(label)}</a>'
                           for label, path in report_files.items())
        parts.append(f"<p>This report (08_report): {links}</p>")
    parts.append(f"<nav>Notebooks: {nav}</nav>")
    parts.append('<h2 id="runs">Runs</h2>')
    parts.append(frame_html(_rounded(status_table(results), 1),
                            "Every notebook of the study: the runner's status, wall time, device, "
                            "git commit and parameter hash (details under each notebook)"))
    parts.append('<h2 id="papers">Ours beside the papers</h2>')
    for table in tables:
        parts.append(f'<h3 id="{_anchor(table.name)}">{_e(table.title)}</h3>')
        parts.append(f"<p>{_links(table_files.get(table.name, {}), page)}</p>")
        parts.append(frame_html(table.display(digits), table.caption))
    for nb in results.values():
        parts.append(_notebook_section(nb, page, digits))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def is_report_page(path: Path, profile: str | None = None) -> bool:
    """True when ``path`` is an index this module wrote (for ``profile``, if given)."""
    if not Path(path).is_file():
        return False
    head = Path(path).read_text(errors="replace")[:2000]
    if f'<meta name="generator" content="{GENERATOR}">' not in head:
        return False
    return profile is None or f'<meta name="cxrstudy-profile" content="{html.escape(profile)}">' in head


__all__ = ["GENERATOR", "figure_html", "frame_html", "href", "is_report_page", "is_wide", "png_size",
           "readable_stem", "render_index"]
