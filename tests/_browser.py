"""Headless Chromium for the report tests: find (or install) it, serve a folder on loopback,
and read back what the browser actually rendered.

No Python dependency beyond the standard library: the browser is driven by its own command
line (``--dump-dom`` with a virtual-time budget, ``--screenshot``). The page under test is
loaded inside a same-origin iframe of a small check page that the test server makes up; once
the page and all its images have finished, the check page writes what it saw (visible text,
every image's natural size, every link) as JSON into its own DOM, which ``--dump-dom`` prints.
"""
from __future__ import annotations

import contextlib
import functools
import html
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

CHROMIUM = Path("/usr/bin/chromium")
LOOPBACK = "127.0.0.1"
CHECK_PATH = "/__cxrstudy_check__.html"
# Virtual time only advances while the page is idle (loads pause it), so this bounds the
# page's own timers, not how long a slow machine may take to fetch and decode the images.
VIRTUAL_TIME_BUDGET_MS = 30_000
BROWSER_TIMEOUT_S = 180  # a wedged browser fails the test instead of hanging the session
SERVER_LIFETIME_S = 900  # the test server shuts itself down even if a test never stops it

# Works as root, offline, without a display or a GPU; nothing phones home.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars",
    "--mute-audio", "--no-default-browser-check",
)


class ChromiumUnavailable(RuntimeError):
    """Raised with the reason when /usr/bin/chromium is missing and cannot be installed."""


def install_command() -> list[list[str]]:
    """Debian's package, the same lines as ``.ci/run``."""
    return [["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]]


def ensure_chromium(may_install: bool) -> Path:
    """``/usr/bin/chromium``, installing Debian's ``chromium`` first when allowed and missing."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if not may_install:
        raise ChromiumUnavailable(f"{CHROMIUM} is missing and this user cannot install it "
                                  "(run as root, or `apt-get install chromium`)")
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable(f"{CHROMIUM} is missing and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in install_command():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise ChromiumUnavailable(f"`{' '.join(command)}` failed ({done.returncode}): "
                                      + (done.stderr or done.stdout).strip()[-2000:])
    if not CHROMIUM.is_file():
        raise ChromiumUnavailable(f"apt-get installed chromium but {CHROMIUM} is still missing")
    return CHROMIUM


CHECK_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>check</title></head><body>
<pre id="result">pending</pre>
<iframe id="page" src="__TARGET__" style="width:1280px;height:2000px;border:0"></iframe>
<script>
"use strict";
const frame = document.getElementById("page");
const settle = (img) => img.complete ? Promise.resolve() : new Promise((done) => {
  img.addEventListener("load", done, {once: true});
  img.addEventListener("error", done, {once: true});
});
frame.addEventListener("load", async () => {
  const out = document.getElementById("result");
  try {
    const doc = frame.contentDocument;
    const images = [...doc.images];
    images.forEach((img) => { img.loading = "eager"; });  // lazy images off-screen load too
    await Promise.all(images.map(settle));
    out.textContent = JSON.stringify({
      url: doc.location.href,
      title: doc.title,
      text: doc.body ? doc.body.innerText : "",
      images: images.map((img) => ({src: img.getAttribute("src"), url: img.currentSrc || img.src,
                                    natural_width: img.naturalWidth, alt: img.alt})),
      links: [...doc.querySelectorAll("a[href]")].map((a) => ({href: a.getAttribute("href"),
                                                               url: a.href})),
      ids: [...doc.querySelectorAll("[id]")].map((e) => e.id)
        .concat([...doc.querySelectorAll("a[name]")].map((e) => e.name)),
      tables: [...doc.querySelectorAll("table")].map((t) => ({
        // textContent: a table in a folded <details> (the training histories) draws nothing
        // until opened, and innerText would read its caption as empty
        caption: t.caption ? t.caption.textContent : "",
        rows: t.rows.length})),
      headings: [...doc.querySelectorAll("h1,h2,h3,h4")].map((h) => h.innerText),
    });
  } catch (error) {
    out.textContent = JSON.stringify({error: String(error)});
  }
});
</script></body></html>
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder, the made-up check page, and remembers every (path, status) it sent."""

    def __init__(self, *args, log: list, **kwargs):
        self._log = log
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if urllib.parse.urlsplit(self.path).path == CHECK_PATH:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            target = query.get("target", ["/index.html"])[0]
            body = CHECK_PAGE.replace("__TARGET__", html.escape(target, quote=True)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_request(self, code="-", size="-"):
        self._log.append((urllib.parse.unquote(urllib.parse.urlsplit(self.path).path), int(code)))

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        pass


@dataclass
class Server:
    """A folder served on ``http://127.0.0.1:<free port>/``; ``requests`` is what it answered."""

    root: Path
    base_url: str
    requests: list = field(default_factory=list)

    def url(self, relative: str) -> str:
        return urllib.parse.urljoin(self.base_url, relative)

    def status(self, url: str) -> int:
        """The HTTP status this server gives ``url`` (only ever asked of this server)."""
        if not url.startswith(self.base_url):
            raise ValueError(f"{url} is not on the test server {self.base_url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                response.read()
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


@contextlib.contextmanager
def serve(root: Path) -> Iterator[Server]:
    """Serve ``root`` on loopback in a thread; shut down on exit (or after SERVER_LIFETIME_S)."""
    log: list = []
    handler = functools.partial(_QuietHandler, directory=str(root), log=log)
    httpd = http.server.ThreadingHTTPServer((LOOPBACK, 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name="report-test-server", daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield Server(Path(root), f"http://{LOOPBACK}:{httpd.server_address[1]}/", log)
    finally:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_chromium(chromium: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run with a fresh profile that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="cxrstudy-chromium-") as profile:
        command = [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        # Its own process group: the launcher script, the browser and its helpers stop together.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=BROWSER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.communicate()
            raise RuntimeError(f"chromium did not finish within {BROWSER_TIMEOUT_S} s: {command}")
        finally:
            _kill_group(process.pid)  # helpers that outlived the browser
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr.strip()[-3000:]}")
    return done


def inspect_page(chromium: Path, server: Server, page: str = "index.html") -> dict:
    """What the browser rendered for ``page``: text, images (natural width), links, ids."""
    check_url = server.url(CHECK_PATH) + "?" + urllib.parse.urlencode({"target": "/" + page})
    done = _run_chromium(chromium, "--window-size=1400,2200",
                         f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", "--dump-dom", check_url)
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, flags=re.S)
    if not found:
        raise RuntimeError("the check page was not in chromium's DOM dump:\n" + done.stdout[-2000:]
                           + done.stderr[-2000:])
    text = html.unescape(found.group(1))
    if text == "pending":
        raise RuntimeError(f"chromium stopped before {page} finished loading "
                           f"(virtual time budget {VIRTUAL_TIME_BUDGET_MS} ms)")
    seen = json.loads(text)
    if "error" in seen:
        raise RuntimeError(f"the check page could not read {page}: {seen['error']}")
    return seen


def screenshot(chromium: Path, server: Server, out: Path, page: str = "index.html") -> Path:
    """A PNG of ``page`` as the browser draws it, written to ``out`` (never over a file)."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _run_chromium(chromium, "--window-size=1280,2000",
                  f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", f"--screenshot={out}",
                  server.url(page))
    if not out.is_file():
        raise RuntimeError(f"chromium did not write the screenshot {out}")
    return out


def local_link_problems(server: Server, seen: dict) -> list[str]:
    """Every link of the page that stays on the test server and does not answer 200, or that
    points at an anchor the page does not have. Links elsewhere are never fetched."""
    problems = []
    page_url = seen["url"].split("#", 1)[0]
    ids = set(seen["ids"])
    for link in seen["links"]:
        url = link["url"]
        if not url.startswith(server.base_url):
            continue  # another scheme or host: not ours to contact
        target, _, anchor = url.partition("#")
        if target == page_url and anchor:
            if urllib.parse.unquote(anchor) not in ids:
                problems.append(f"{link['href']}: no element with id {anchor!r} on the page")
            continue
        status = server.status(target)
        if status != 200:
            problems.append(f"{link['href']}: HTTP {status}")
    return problems


def image_problems(seen: dict) -> list[str]:
    """Images the browser could not draw (a missing file or one it cannot decode)."""
    return [f"{img['src']}: not loaded (naturalWidth 0)" for img in seen["images"]
            if not img["natural_width"]]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises if the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
