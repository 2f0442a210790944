"""The report index as a reader sees it: headless Chromium loads ``results/tiny/index.html`` from a
loopback server; every image must draw, every local link must answer, and the page must show the
run's notebooks, tables and numbers. A hand-made page first proves the checks can fail."""
from __future__ import annotations

import json
import os
import re
import struct
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from _browser import (ChromiumUnavailable, ensure_chromium, image_problems, inspect_page,
                     local_link_problems, png_size, screenshot, serve)

NOTEBOOK_FOLDER = re.compile(r"^\d\d_[A-Za-z0-9_]+$")
SCREENSHOT = Path("screenshots") / "index.png"


def in_ci() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("CXRSTUDY_REQUIRE_DATA") == "1"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """/usr/bin/chromium, installed once per session when missing (root only). In CI a browser
    that cannot be had is a failure; locally without root it is a skip with the reason."""
    may_install = os.geteuid() == 0
    try:
        return ensure_chromium(may_install)
    except ChromiumUnavailable as error:
        if in_ci() or may_install:
            pytest.fail(f"headless Chromium is needed for the report test: {error}")
        pytest.skip(f"headless Chromium is needed for the report test: {error}")


def write_png(path: Path, width: int, height: int, rgb=(200, 30, 30)) -> Path:
    """A solid-colour PNG from the standard library alone (the fixture needs no image package)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_checks_catch_broken_images_and_links(chromium, tmp_path):
    """A page with one of each fault: the checks name exactly those, and nothing that is fine."""
    root = tmp_path / "tiny"
    write_png(root / "01_demo" / "figures" / "roc.png", 64, 48)
    write_png(root / "01_demo" / "figures" / "far_below.png", 33, 20)  # lazy, off-screen
    write_png(root / "01_demo" / "figures" / "with space.png", 21, 10)  # a URL-quoted name
    (root / "01_demo" / "figures" / "corrupt.png").write_bytes(b"not a png at all")
    (root / "01_demo" / "01_demo.ipynb").write_text(json.dumps({"cells": []}))
    (root / "index.html").write_text("""<!doctype html><html><head><title>fixture</title></head>
<body><h1 id="top">Fixture report</h1>
<table><caption>Table 1: macro AUC</caption><tr><td>0.731</td></tr></table>
<img src="01_demo/figures/roc.png" alt="roc"><img src="01_demo/figures/with%20space.png" alt="q">
<img src="01_demo/figures/missing.png" alt="missing">
<img src="01_demo/figures/corrupt.png" alt="corrupt">
<a href="01_demo/01_demo.ipynb">executed</a> <a href="01_demo/figures/with%20space.png">q</a> <a href="01_demo/">folder</a>
<a href="01_demo/gone.ipynb">dead</a> <a href="#top">top</a> <a href="#nowhere">bad anchor</a>
<a href="https://example.org/never-fetched">elsewhere</a>
<div style="height:6000px"></div><img src="01_demo/figures/far_below.png" loading="lazy" alt="far">
</body></html>""")

    with serve(root) as server:
        seen = inspect_page(chromium, server)
        links = local_link_problems(server, seen)
        answered = list(server.requests)

    widths = {img["src"]: img["natural_width"] for img in seen["images"]}
    assert widths["01_demo/figures/roc.png"] == 64
    assert served_path(next(i["url"] for i in seen["images"] if i["alt"] == "q")) == \
        "01_demo/figures/with space.png" and widths["01_demo/figures/with%20space.png"] == 21
    assert widths["01_demo/figures/far_below.png"] == 33, "a lazy image off-screen was not loaded"
    assert sorted(image_problems(seen)) == [
        "01_demo/figures/corrupt.png: not loaded (naturalWidth 0)",
        "01_demo/figures/missing.png: not loaded (naturalWidth 0)"]
    assert sorted(links) == ["#nowhere: no element with id 'nowhere' on the page",
                             "01_demo/gone.ipynb: HTTP 404"]
    assert "Fixture report" in seen["headings"]
    assert [t["caption"] for t in seen["tables"]] == ["Table 1: macro AUC"]
    assert "0.731" in seen["text"]
    assert all(not path.startswith("/never-fetched") for path, _ in answered)


# --- the real index, from the tiny run of every notebook -------------------------------------

@dataclass
class RenderedReport:
    profile_dir: Path
    seen: dict                   # what the browser rendered (see _browser.inspect_page)
    load_requests: list          # (path, status) the server answered while the page loaded
    link_problems: list[str]
    screenshot: Path


def notebook_folders(profile_dir: Path) -> list[Path]:
    return sorted(p for p in profile_dir.iterdir() if p.is_dir() and NOTEBOOK_FOLDER.match(p.name))


def squash(text: str) -> str:
    return " ".join(text.split())


def served_path(url: str) -> str:
    """``http://127.0.0.1:port/01_x/figures/a%20b.png#top`` -> ``01_x/figures/a b.png``."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path).lstrip("/")


@pytest.fixture(scope="session")
def rendered_report(chromium, tiny_results) -> RenderedReport:
    """One Chromium run reads the page, a second one draws the screenshot into the results."""
    profile_dir, _ = tiny_results
    index = profile_dir / "index.html"
    if not index.is_file():
        pytest.fail(f"the tiny run wrote no {index} (notebook 08_report builds it); "
                    f"there is: {sorted(p.name for p in profile_dir.iterdir())}")
    with serve(profile_dir) as server:
        seen = inspect_page(chromium, server)
        load_requests = list(server.requests)
        link_problems = local_link_problems(server, seen)
        shot = screenshot(chromium, server, profile_dir / SCREENSHOT)
    return RenderedReport(profile_dir, seen, load_requests, link_problems, shot)


def test_report_index_draws_every_figure(rendered_report):
    seen, profile_dir = rendered_report.seen, rendered_report.profile_dir
    assert not image_problems(seen), image_problems(seen)
    drawn = {served_path(img["url"]): img["natural_width"] for img in seen["images"]}
    figures = [png for folder in notebook_folders(profile_dir) for png in folder.glob("figures/*.png")]
    assert figures, f"the tiny run left no figures under {profile_dir}"
    for png in figures:
        relative = png.relative_to(profile_dir).as_posix()
        assert relative in drawn, f"figure {relative} is not on the page"
        assert drawn[relative] == png_size(png)[0], f"{relative} drawn at another size than the file"


def test_report_index_links_all_answer(rendered_report):
    report = rendered_report
    assert not report.link_problems, report.link_problems
    failed = [(path, status) for path, status in report.load_requests
              if status >= 400 and path != "/favicon.ico"]
    assert not failed, f"requests that failed while the page loaded: {failed}"
    origin = urllib.parse.urlsplit(report.seen["url"]).netloc
    linked = {served_path(link["url"]) for link in report.seen["links"]
              if urllib.parse.urlsplit(link["url"]).netloc == origin}
    for folder in notebook_folders(report.profile_dir):
        for name in (f"{folder.name}.ipynb", "provenance.json", "metrics.json"):
            if (folder / name).is_file():
                assert f"{folder.name}/{name}" in linked, f"the page does not link {folder.name}/{name}"
        for csv in folder.glob("tables/*.csv"):
            relative = csv.relative_to(report.profile_dir).as_posix()
            assert relative in linked, f"the page does not link the table {relative}"


def test_report_index_shows_the_runs_tables_and_numbers(rendered_report):
    report = rendered_report
    text, headings = squash(report.seen["text"]), [squash(h) for h in report.seen["headings"]]
    captions = {squash(t["caption"]) for t in report.seen["tables"]}
    assert "tiny" in report.seen["title"]
    folders = notebook_folders(report.profile_dir)
    assert len(folders) >= 7, [f.name for f in folders]
    for folder in folders:
        assert folder.name in text, f"notebook {folder.name} is not on the page"
        if folder.name != "08_report":
            assert folder.name in headings, f"no heading for notebook {folder.name}"
        # A table saved with a caption is shown under that caption; the report's own tables
        # (Markdown "**title**" then the caption) also under their title.
        for md in folder.glob("tables/*.md"):
            head = md.read_text().split("\n|", 1)[0].strip()
            where = md.relative_to(report.profile_dir)
            title = re.match(r"\*\*(.+?)\*\*\s*", head)
            if title:
                assert squash(title.group(1)) in headings, f"{where}: title not a heading"
                head = head[title.end():]
            if head and not head.startswith("|"):
                assert squash(head) in captions, f"{where}: caption not shown"
    # The headline numbers of the run, as metrics.json holds them, rounded as the page shows them.
    baseline = json.loads((report.profile_dir / "01_baseline" / "metrics.json").read_text())
    for model, entry in baseline["models"].items():
        shown = f"{entry['overall']['macro_auc']:.3f}"
        assert shown in text, f"01_baseline {model} macro AUC {shown} is not on the page"
    # Every run's parameter hash (provenance) is on the page.
    for folder in folders:
        provenance = json.loads((folder / "provenance.json").read_text())
        if folder.name != "08_report":
            assert provenance["params_hash"] in text, f"{folder.name}: params hash not shown"


def test_report_index_screenshot_is_a_real_picture(rendered_report):
    from PIL import Image

    shot = rendered_report.screenshot
    assert shot == rendered_report.profile_dir / SCREENSHOT
    assert png_size(shot) == (1280, 2000)
    assert shot.stat().st_size > 20_000, f"{shot} is only {shot.stat().st_size} bytes"
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is None or len(colours) > 50, "the screenshot is nearly blank"
