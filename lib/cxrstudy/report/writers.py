"""Write a report table as CSV (full precision), Markdown and LaTeX (rounded, with caption).

The LaTeX writer is a few lines of our own (``booktabs`` tabular in a ``table`` float), so the
report needs no templating package.
"""
from __future__ import annotations

from pathlib import Path

from ..outputs import markdown_table
from .tables import ReportTable

LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "–": "--", "—": "---", "Δ": r"$\Delta$",
                  "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$", "±": r"$\pm$"}


def latex_escape(text: object) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def latex_table(table: ReportTable, digits: int = 3) -> str:
    shown = table.display(digits)
    align = "".join("l" if i < 2 else "r" for i in range(len(shown.columns)))
    lines = [r"\begin{table}[htbp]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(table.full_caption)}}}",
             rf"\label{{tab:{latex_escape(table.name).replace(chr(92) + '_', '-')}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def markdown_report_table(table: ReportTable, digits: int = 3, note: bool = True) -> str:
    """Title, caption, table and — ``note``, for a file read alone — the profile's note below."""
    text = f"**{table.title}**\n\n{table.caption}\n\n{markdown_table(table.display(digits))}\n"
    return text + (f"\n{table.note.strip()}\n" if note and table.note.strip() else "")


def write_table(table: ReportTable, folder: Path, digits: int = 3) -> dict[str, Path]:
    """``<folder>/<name>.csv|md|tex``; returns the paths by format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {fmt: folder / f"{table.name}.{fmt}" for fmt in ("csv", "md", "tex")}
    table.frame.to_csv(paths["csv"], index=False)
    paths["md"].write_text(markdown_report_table(table, digits))
    paths["tex"].write_text(latex_table(table, digits))
    return paths


__all__ = ["latex_escape", "latex_table", "markdown_report_table", "write_table"]
