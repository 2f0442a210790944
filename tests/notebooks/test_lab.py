"""`make lab` really serves JupyterLab on the study, its notebooks and the results they write
(started on a free loopback port with a known token, checked through the REST API, stopped by
its process group)."""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from _fakes import REPO

VENV = Path(sys.prefix)  # the environment running the tests is the one `make lab` should use
START_TIMEOUT_S = 180    # JupyterLab takes seconds to start, more on a busy 2-core machine
STOP_TIMEOUT_S = 60


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    """(status, body) from the lab server (only ever 127.0.0.1)."""
    assert url.startswith("http://127.0.0.1:"), url
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the whole process group (make, its shell, jupyter), then SIGKILL what is left."""
    pgid = process.pid  # start_new_session: the group id is the leader's pid
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture
def lab(tmp_path):
    """`make lab` in its own process group; yields (base_url, token, process, log path)."""
    if not (VENV / "bin" / "jupyter").is_file():
        pytest.fail(f"no jupyter in {VENV}/bin: the study's environment is incomplete")
    port, token = free_loopback_port(), secrets.token_hex(16)
    log_path = tmp_path / "lab.log"
    env = dict(os.environ, JUPYTER_TOKEN=token,
               # Nothing of this run lands in the user's ~/.jupyter or ~/.local/share/jupyter.
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    stamp = VENV / ".cxrstudy-installed"
    # A taken port must fail the start, not move the server to a port we do not poll; the
    # extension manager stays read-only so nothing asks PyPI; root (CI, containers) must say so.
    args = ["--no-browser", "--ServerApp.port_retries=0", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:
        args.append("--allow-root")
    command = ["make", "--no-print-directory", "-o", str(stamp),  # the venv exists: never rebuild
               "lab", f"VENV={VENV}", f"LAB_PORT={port}", "ARGS=" + " ".join(args)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"`make lab` exited with {process.returncode} before answering:\n"
                            + log_path.read_text(errors="replace")[-4000:])
            try:
                status, _ = get(f"{base_url}/api/status", token)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`make lab` did not answer on {base_url} within {START_TIMEOUT_S} s:\n"
                            + log_path.read_text(errors="replace")[-4000:])
            time.sleep(1)
        yield base_url, token, process, log_path
    finally:
        stop_group(process)


def test_make_lab_serves_the_notebooks_and_stops_by_pid(lab):
    base_url, token, process, log_path = lab

    # the repository root is served: the notebooks and the results they write, side by side
    status, body = get(f"{base_url}/api/contents/", token)
    assert status == 200, body[:500]
    top = {item["name"]: item["type"] for item in json.loads(body)["content"]}
    assert top.get("notebooks") == "directory" and top.get("results") == "directory", sorted(top)
    status, body = get(f"{base_url}/api/contents/notebooks", token)
    assert status == 200, body[:500]
    listed = {item["name"]: item["type"] for item in json.loads(body)["content"]}
    expected = sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert expected, "no notebooks/NN_*.ipynb in the checkout"
    missing = [name for name in expected if listed.get(name) != "notebook"]
    assert not missing, f"not listed as notebooks by the lab: {missing}; listed: {sorted(listed)}"

    # The token is what lets us in: without it the API refuses.
    status, _ = get(f"{base_url}/api/contents/")
    assert status == 403

    status, page = get(f"{base_url}/lab", token)
    assert status == 200
    config = re.search(rb'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
                       page, flags=re.S)
    assert config, "the lab page carries no jupyter-config-data"
    config = json.loads(config.group(1))
    assert config["appName"] == "JupyterLab"
    assert Path(config["serverRoot"]).resolve() == REPO.resolve()
    # the browser opens on the notebooks: the server's root URL redirects there
    request = urllib.request.Request(f"{base_url}/")
    request.add_header("Authorization", f"token {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert urllib.parse.urlparse(response.geturl()).path.rstrip("/") == "/lab/tree/notebooks"

    # Bound to loopback only, as the Makefile's LAB_IP default says.
    assert f"http://127.0.0.1:{base_url.rsplit(':', 1)[1]}/lab" in log_path.read_text(errors="replace")

    stop_group(process)
    assert process.returncode is not None
    assert not group_alive(process.pid), "processes of `make lab` outlived the stop"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"{base_url}/api/status", token)
