"""What produced a result: code version, parameters, packages, device — and a fingerprint of it.

The fingerprint (parameters + notebook source + library source + upstream fingerprints) is what
lets the runner skip a notebook whose outputs are already up to date.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from ..paths import repo_root

TRACKED_PACKAGES = ("torch", "torchvision", "timm", "accelerate", "torchxrayvision", "grad-cam",
                    "papermill", "scikit-learn", "numpy", "pandas", "medmnist", "cxrstudy")


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tree_hash(folder: Path, pattern: str = "*.py") -> str:
    """Hash of every file matching ``pattern`` below ``folder`` (paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob(pattern)):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def notebook_source_hash(path: Path) -> str:
    """Hash of a notebook's cell sources only (outputs and metadata noise do not count)."""
    cells = json.loads(Path(path).read_text()).get("cells", [])
    text = "\n\x00".join("".join(c.get("source", "")) for c in cells)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(params: dict, notebook: Path, upstream: list[str] | None = None) -> str:
    parts = [params_hash(params), notebook_source_hash(notebook),
             tree_hash(repo_root() / "lib" / "cxrstudy"), *(upstream or [])]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def git_state(root: Path | None = None) -> dict[str, Any]:
    root = root or repo_root()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=root, capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "processor": platform.machine()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = "cuda"
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        else:
            info["device"] = "cpu"
    except ImportError:
        info["device"] = "unknown"
    return info


def provenance_record(params: dict, fp: str, status: str, wall_seconds: float,
                      error: str | None = None) -> dict[str, Any]:
    return {
        "status": status,
        "error": error,
        "fingerprint": fp,
        "params": params,
        "params_hash": params_hash(params),
        "git": git_state(),
        "packages": package_versions(),
        "device": device_description(),
        "wall_seconds": round(wall_seconds, 2),
    }
