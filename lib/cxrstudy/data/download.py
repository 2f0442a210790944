"""Fetch the public datasets into the data root, or say exactly how to get the gated ones.

- ``chestmnist``: the MedMNIST v2 ``chestmnist{_S}.npz`` files (S = 28, 64, 128, 224), from the
  URLs and MD5 sums the ``medmnist`` package itself lists (``medmnist.info.INFO``), into
  ``<root>/medmnist/`` under the names its dataset classes open.
- ``nih``: the 12 ``images_NNN.tar.gz`` archives of ChestX-ray14 from the NIH Clinical Center's
  public Box links (the list in the NIH's ``batch_download_zips.py``), extracted into
  ``<root>/nih/images/``; the label files come from the copies bundled with torchxrayvision.
- ``nih-sample``: the study's 618-image NIH sample, rebuilt by streaming the same archives
  (:mod:`cxrstudy.data.nih_sample`; ~65 MB kept, each image checked against a manifest).
- ``chexpert``, ``vindr``: need a registration/data use agreement; the steps are printed.

:func:`cxrstudy.data.obtain.download` fetches a dataset by name (the command line's entry).

Downloads are resumable (HTTP Range requests continue a ``.part`` file from the byte already on
disk), verified (checksum where one is published, else by reading the whole tar) and renamed
into place only when whole. Offline, the first connection error stops everything with a message
that names the dataset, the URL and what to do; there are no retry loops.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.util
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .. import paths

USER_AGENT = "cxrstudy/0.1 (python-urllib)"

# ChestX-ray14 image archives, in order (NIH Clinical Center, batch_download_zips.py;
# folder https://nihcc.app.box.com/v/ChestXray-NIHCC). Each holds ``images/<Image Index>.png``.
NIH_BOX_FOLDER = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_ARCHIVE_URLS: dict[str, str] = {
    f"images_{i + 1:03d}.tar.gz": f"https://nihcc.box.com/shared/static/{key}.gz"
    for i, key in enumerate([
        "vfk49d74nhbxq3nqjg0900w5nvkorp5c", "i28rlmbvmfjbl8p2n3ril0pptcmcu9d1",
        "f1t00wrtdk94satdfb9olcolqx20z2jp", "0aowwzs5lhjrceb3qp67ahp0rd1l1etg",
        "v5e3goj22zr6h8tzualxfsqlqaygfbsn", "asi7ikud9jwnkrnkj99jnpfkjdes7l6l",
        "jn1b4mw4n6lnh74ovmcjb8y48h8xj07n", "tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j",
        "upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj", "l6nilvfa9cg3s28tqv1qc1olm3gnz54p",
        "hhq8fkdgvcari67vfhs7ppg2w6ni4jze", "ioqwiy20ihqwyr8pf4c24eazhh281pbu",
    ])
}

# Known checksums, "algorithm:hexdigest" by file name. The NIH publishes no checksums for the
# ChestX-ray14 archives (its script ends with "please check the checksums" but none are listed
# in any source we could consult), so none are recorded here rather than guessed: the archives
# are verified by reading every member of the tar instead. ChestMNIST's MD5s come from medmnist.
KNOWN_CHECKSUMS: dict[str, str] = {}

# The release's label files, shipped (gzipped) inside torchxrayvision's package data. The
# NIH serves them only through the Box web folder, which has no stable direct links.
NIH_LABEL_FILES = ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv")

CHESTMNIST_SIZES = (28, 64, 128, 224)
MANUAL = ("chexpert", "vindr")


class DownloadError(RuntimeError):
    """A download or extraction failed (the message names the file and what to do)."""


class OfflineError(DownloadError):
    """The server could not be reached at all."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the published checksum."""


# ---- generic pieces ---------------------------------------------------------------------------
def target_dir(name: str, root=None) -> Path:
    """Where dataset ``name`` goes: ``root`` if it already is that folder, else
    ``root/<DATASET_DIRS[name]>``; ``root`` defaults to ``$CXRSTUDY_DATA_ROOT``."""
    folder = paths.DATASET_DIRS.get(name, name)
    if root is None:
        base = paths.data_root()
        if base is None:
            raise paths.DataNotFoundError(
                f"No root given for downloading {name!r} and {paths.DATA_ROOT_ENV} is not set. "
                f"Pass root=... (the data root that will hold {folder}/) or export "
                f"{paths.DATA_ROOT_ENV}=/path/to/data.")
        root = base
    root = Path(root).expanduser()
    return root if root.name == folder else root / folder


def file_digest(path, algorithm: str = "sha256", chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, expected = checksum.partition(":")
    if not expected or algorithm not in hashlib.algorithms_available:
        raise ValueError(f"checksum must look like 'sha256:<hex>' or 'md5:<hex>', got {checksum!r}")
    return algorithm, expected.lower()


def _offline_message(dataset: str, url: str, dest: Path, exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    return (
        f"Cannot download {dataset}: {url} is unreachable ({reason}).\n"
        f"This machine looks offline, or the host is blocked. To go on: download\n"
        f"  {url}\n"
        f"on a machine with internet access, save it as\n"
        f"  {dest}\n"
        f"and run the same command again (it skips files already in place and resumes a partial\n"
        f"  {dest.name}.part)."
    )


def fetch(url: str, dest, *, checksum: str | None = None, dataset: str = "data",
          timeout: float = 30.0, progress: bool = True, chunk_bytes: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial ``.part``.

    A ``dest`` already present is kept (and checked against ``checksum`` if given; a mismatch is
    an error, never a silent overwrite). ``checksum`` is ``"sha256:<hex>"`` or ``"md5:<hex>"``;
    on a mismatch the download is deleted and :class:`ChecksumError` names the file.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        if checksum is not None:
            _verify(dest, checksum, delete=False)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left after ``offset``: the part is whole
            total = (exc.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return _finish(part, dest, checksum)
            part.unlink()
            return fetch(url, dest, checksum=checksum, dataset=dataset, timeout=timeout,
                         progress=progress, chunk_bytes=chunk_bytes)
        raise DownloadError(f"Cannot download {dataset}: {url} answered HTTP {exc.code} "
                            f"{exc.reason}. Check the URL or fetch it by hand into {dest}."
                            ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise OfflineError(_offline_message(dataset, url, dest, exc)) from None

    with response:
        resumed = bool(offset) and response.status == 206
        if resumed and not _range_starts_at(response.headers.get("Content-Range"), offset):
            response.close()  # some other range than asked for: start over, append nothing
            part.unlink()
            return fetch(url, dest, checksum=checksum, dataset=dataset, timeout=timeout,
                         progress=progress, chunk_bytes=chunk_bytes)
        start = offset if resumed else 0  # a plain 200 answer is the whole file: rewrite
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=dest.name, disable=not progress, leave=False)
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while block := response.read(chunk_bytes):
                    out.write(block)
                    bar.update(len(block))
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(
                f"The download of {dataset} from {url} broke off at {part.stat().st_size} bytes "
                f"({exc}). Run again to resume from there ({part}).") from None
        finally:
            bar.close()
    received = part.stat().st_size
    if total is not None and received != total:
        raise DownloadError(f"The download of {dataset} from {url} stopped at {received} of "
                            f"{total} bytes. Run again to resume from there ({part}).")
    return _finish(part, dest, checksum)


def _range_starts_at(content_range: str | None, offset: int) -> bool:
    """Whether ``Content-Range: bytes START-END/TOTAL`` starts at ``offset``."""
    if not content_range or not content_range.startswith("bytes "):
        return False
    start = content_range[len("bytes "):].split("-", 1)[0]
    return start.isdigit() and int(start) == offset


def _verify(path: Path, checksum: str, delete: bool) -> None:
    algorithm, expected = _parse_checksum(checksum)
    actual = file_digest(path, algorithm)
    if actual != expected:
        if delete:
            path.unlink(missing_ok=True)
        what = "it was deleted; run again to download it afresh" if delete else \
            "delete it to download it again"
        raise ChecksumError(f"{path.name}: {algorithm} is {actual}, expected {expected} ({path}; "
                            f"{what})")


def _finish(part: Path, dest: Path, checksum: str | None) -> Path:
    if checksum is not None:
        _verify(part, checksum, delete=True)
    os.replace(part, dest)
    return dest


def list_tar(path) -> list[tarfile.TarInfo]:
    """Every member of a (gzipped) tar, read to the end: a truncated or damaged archive raises
    :class:`DownloadError` naming it. Used where no checksum is published."""
    try:
        with tarfile.open(path, "r:*") as archive:
            return archive.getmembers()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:  # zlib: damaged gzip
        raise DownloadError(f"{path} is not a readable tar archive ({exc})") from None


def extract_tar(path, dest, prefix: str = "images/", progress: bool = True) -> int:
    """Extract the regular files under ``prefix`` of archive ``path`` into ``dest``.

    The archive is listed in full first (integrity), every name is checked to stay inside
    ``dest``, and files already present with the same size are left alone. Returns the number
    of files the archive holds under ``prefix``.
    """
    dest = Path(dest)
    members = list_tar(path)
    files = [m for m in members if m.isfile()]
    outside = [m.name for m in members
               if m.name.startswith("/") or ".." in Path(m.name).parts or m.issym() or m.islnk()]
    if outside:
        raise DownloadError(f"{path}: refusing to extract unsafe entries, e.g. {outside[:3]}")
    wanted = [m for m in files if m.name.startswith(prefix)]
    if not wanted:
        raise DownloadError(f"{path}: no files under {prefix!r}; is this the right archive?")
    todo = [m for m in wanted
            if not ((dest / m.name).is_file() and (dest / m.name).stat().st_size == m.size)]
    if todo:
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(path, "r:*") as archive:
            for member in tqdm(todo, desc=f"extracting {Path(path).name}", unit="file",
                               disable=not progress, leave=False):
                archive.extract(member, dest, **extra)
    return len(wanted)


# ---- NIH ChestX-ray14 -------------------------------------------------------------------------
def _bundled_label_dir() -> Path | None:
    """torchxrayvision's package data folder, found without importing the package."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if folder.is_dir() else None


def install_nih_labels(folder: Path) -> list[Path]:
    """Put the release's label files into ``folder`` (existing ones are kept)."""
    source = _bundled_label_dir()
    written = []
    for name in NIH_LABEL_FILES:
        dest = folder / name
        if dest.exists():
            continue
        packed = source / f"{name}.gz" if source is not None else None
        if packed is None or not packed.is_file():
            raise DownloadError(
                f"{name} is not bundled here (torchxrayvision not installed). Download it from "
                f"the NIH folder {NIH_BOX_FOLDER} and put it at {dest}.")
        tmp = dest.with_name(dest.name + ".part")
        with gzip.open(packed, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dest)
        written.append(dest)
    return written


def download_nih(root=None, archives: Sequence[str] | Mapping[str, str] | None = None, *,
                 keep_archives: bool = False, timeout: float = 30.0,
                 progress: bool = True) -> Path:
    """Download and extract ChestX-ray14 into ``<root>/nih`` (release layout).

    ``archives``: a subset of archive names (e.g. ``["images_001.tar.gz"]`` for a first
    ~5,000 images), or a mapping name → URL (mirrors, tests); default all 12. Each archive
    lands in ``nih/archives/``, is verified, extracted, marked done and (unless
    ``keep_archives``) deleted, so a rerun skips finished archives.
    """
    folder = target_dir("nih", root)
    if archives is None:
        sources = dict(NIH_ARCHIVE_URLS)
    elif isinstance(archives, Mapping):
        sources = dict(archives)
    else:
        unknown = [a for a in archives if a not in NIH_ARCHIVE_URLS]
        if unknown:
            raise ValueError(f"unknown NIH archives {unknown}; known: {list(NIH_ARCHIVE_URLS)}")
        sources = {a: NIH_ARCHIVE_URLS[a] for a in archives}
    store = folder / "archives"
    store.mkdir(parents=True, exist_ok=True)
    install_nih_labels(folder)
    for name, url in sources.items():
        marker = store / f"{name}.extracted"
        if marker.exists():
            continue
        archive = fetch(url, store / name, checksum=KNOWN_CHECKSUMS.get(name),
                        dataset=f"NIH ChestX-ray14 ({name})", timeout=timeout, progress=progress)
        try:
            count = extract_tar(archive, folder, prefix="images/", progress=progress)
        except DownloadError:
            archive.unlink(missing_ok=True)  # keep nothing damaged in place
            raise
        marker.write_text(f"{count} files\n")
        if not keep_archives:
            archive.unlink()
    return folder


# ---- ChestMNIST -------------------------------------------------------------------------------
def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes in an ``.npz`` read from the .npy headers only (no pixels loaded)."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            with archive.open(entry) as handle:
                version = np.lib.format.read_magic(handle)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shapes[entry.removesuffix(".npy")] = reader(handle)[0]
    return shapes


def download_chestmnist(root=None, sizes: Sequence[int] = CHESTMNIST_SIZES, *,
                        timeout: float = 30.0, progress: bool = True,
                        via_medmnist: bool = False) -> Path:
    """Fetch ``chestmnist{_S}.npz`` for each size into ``<root>/medmnist``.

    By default through :func:`fetch` (resumable) with the URL and MD5 from ``medmnist.info``,
    then the split sizes are checked against medmnist's ``n_samples`` from the file headers.
    ``via_medmnist=True`` instead calls ``medmnist.ChestMNIST(split, download=True, ...)`` per
    split and size (no resume, and each call loads the split's pixels into memory).
    """
    from medmnist.info import INFO

    info = INFO["chestmnist"]
    folder = target_dir("chestmnist", root)
    folder.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        size = int(size)
        if size not in CHESTMNIST_SIZES:
            raise ValueError(f"ChestMNIST comes in sizes {CHESTMNIST_SIZES}, not {size}")
        flag = "" if size == 28 else f"_{size}"
        url = info[f"url{flag}"]
        if via_medmnist:
            import medmnist

            for split in ("train", "val", "test"):
                try:
                    medmnist.ChestMNIST(split=split, download=True, root=str(folder), size=size)
                except RuntimeError as exc:
                    raise OfflineError(_offline_message(f"ChestMNIST ({size}px)", url,
                                                        folder / f"chestmnist{flag}.npz", exc))
            continue
        dest = fetch(url, folder / f"chestmnist{flag}.npz", checksum=f"md5:{info[f'MD5{flag}']}",
                     dataset=f"ChestMNIST ({size}px)", timeout=timeout, progress=progress)
        shapes = _npz_shapes(dest)
        for split, expected in info["n_samples"].items():
            found = shapes.get(f"{split}_images", (None,))[0]
            if found != expected:
                raise DownloadError(f"{dest}: {split}_images has {found} images, medmnist "
                                    f"expects {expected}; delete the file and download again")
    return folder


# ---- gated datasets ---------------------------------------------------------------------------
def registration_steps(name: str, root=None) -> str:
    """The manual steps for a dataset behind a registration, with the paths to use."""
    try:
        folder = target_dir(name, root)
    except paths.DataNotFoundError:
        folder = Path("$CXRSTUDY_DATA_ROOT") / paths.DATASET_DIRS[name]
    base = folder.parent
    if name == "chexpert":
        return "\n".join([
            "CheXpert needs a free registration (Stanford research use agreement); cxrstudy",
            "cannot download it for you. Steps:",
            "  1. Open https://stanfordmlgroup.github.io/competitions/chexpert/ and follow its",
            "     download link (the dataset is now served by Stanford AIMI); register and accept",
            "     the CheXpert research use agreement.",
            "  2. Download CheXpert-v1.0-small.zip (the downsampled JPEG release, about 11 GB),",
            "     not the full-resolution CheXpert-v1.0.",
            f"  3. Unzip it inside {base} so that these exist:",
            f"       {folder}/train.csv",
            f"       {folder}/valid.csv",
            f"       {folder}/train/patient00001/study1/view1_frontal.jpg",
            f"  4. Check it: cxrstudy data check chexpert --root {base}",
        ])
    if name == "vindr":
        return "\n".join([
            "VinDr-CXR is credentialed-access data on PhysioNet; cxrstudy cannot download it for",
            "you. Steps:",
            "  1. Create a PhysioNet account (https://physionet.org/register/) and become a",
            "     credentialed user (https://physionet.org/settings/credentialing/), which",
            "     includes the required human-subjects research training.",
            "  2. Sign the data use agreement on https://physionet.org/content/vindr-cxr/1.0.0/",
            "  3. Download the release's files from that page: the annotations/ folder",
            "     (image-level labels and boxes for train and test) and the train/ and test/",
            "     DICOM folders.",
            f"  4. Put them under {folder}/ keeping the release's folder names, e.g.",
            f"       {folder}/annotations/",
            f"       {folder}/train/",
            f"       {folder}/test/",
            "     DICOMs need pydicom to read (or save <image_id>.png copies next to them).",
            f"  5. Check it: cxrstudy data check vindr --root {base}",
            "  Alternative: the Kaggle competition version (train.csv + train/ DICOMs, 14 local",
            "  labels only; accept the rules on",
            "  https://www.kaggle.com/c/vinbigdata-chest-xray-abnormalities-detection) in the same",
            f"  folder {folder}/.",
        ])
    raise ValueError(f"{name!r} needs no registration")


__all__ = ["download_nih", "download_chestmnist", "fetch", "extract_tar",
           "list_tar", "registration_steps", "MANUAL",
           "DownloadError", "OfflineError", "ChecksumError", "NIH_ARCHIVE_URLS",
           "KNOWN_CHECKSUMS", "target_dir", "file_digest", "install_nih_labels"]
