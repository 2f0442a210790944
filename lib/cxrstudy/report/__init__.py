"""The study report: every notebook's results of a profile gathered into per-paper tables
(ours with 95% CIs beside the papers' numbers) and a static ``results/<profile>/index.html``.

``reference`` reads the papers' numbers, ``collect`` the notebooks' outputs, ``tables`` builds the
per-paper tables, ``writers`` writes Markdown/CSV/LaTeX, ``index`` the HTML page, and ``build``
ties them together (used by notebook 08 and ``cxrstudy report``).
"""
