"""Rebuild the study's NIH sample (``nih-sample/``) from the NIH release's own public files.

The tiny and sample profiles read 618 ChestX-ray14 radiographs (618 patients, every class
present) stored at 512 × 512 px next to the release's label files. Nothing of it is in git; this
module makes it from public sources, so anyone online gets the same folder:

- the images come from the release's 12 ``images_NNN.tar.gz`` archives on the NIH Box
  (:data:`cxrstudy.data.download.NIH_ARCHIVE_URLS`). Each archive is *streamed* (read once,
  never stored): only the 618 wanted members are decoded, reduced from 1024 to 512 px by area
  averaging (each 2 × 2 block's mean) and written as 8-bit PNG. The stream stops as soon as every image
  is found, so up to ~42 GB pass through the network but only ~65 MB land on disk;
- ``Data_Entry_2017_v2020.csv`` and ``BBox_List_2017.csv`` are the release's rows for those
  images, cut from the copies bundled with torchxrayvision.

Every image is checked against ``nih_sample_manifest.csv`` (shipped with the package): its id,
the SHA-256 of the reference sample's pixels, and an 8 × 8 block-mean thumbnail (64 grey
levels, not an image one could use). An image whose thumbnail differs by more than
:data:`THUMBNAIL_TOLERANCE` grey levels is the wrong image or a damaged one: it is not written
and the download fails naming it. Resize rounding may make a rebuilt image differ from the
reference by a grey level here and there; the run says how many are bit-identical.

A rerun keeps the images already in place and streams only the archives not yet finished
(``.download/archives_done.txt``).
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import io
import os
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .download import (NIH_ARCHIVE_URLS, NIH_BOX_FOLDER, USER_AGENT, DownloadError,
                       OfflineError, _bundled_label_dir, _offline_message, target_dir)

MANIFEST = Path(__file__).with_name("nih_sample_manifest.csv")
SAMPLE_SIZE = 512
THUMBNAIL_SIDE = 8
THUMBNAIL_TOLERANCE = 4  # grey levels: resize rounding moves a 64 × 64 block mean by < 1
STATE_DIR = ".download"


@dataclass(frozen=True)
class SampleImage:
    """One manifest row: the image id and what the reference sample's pixels look like."""

    image_id: str
    pixel_sha256: str
    thumbnail: np.ndarray  # [8, 8] uint8 block means


def read_manifest(path: Path = MANIFEST) -> dict[str, SampleImage]:
    """image id → :class:`SampleImage`, in the manifest's order."""
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    return {row["image_id"]: SampleImage(
        row["image_id"], row["pixel_sha256"],
        np.frombuffer(bytes.fromhex(row["thumbnail"]), dtype=np.uint8).reshape(
            THUMBNAIL_SIDE, THUMBNAIL_SIDE)) for row in rows}


def pixel_sha256(pixels: np.ndarray) -> str:
    """SHA-256 of a grey image's shape and pixel bytes (independent of how the PNG was encoded)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


def thumbnail(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """Block means of a square image on a ``side`` × ``side`` grid, rounded to uint8."""
    height, width = pixels.shape
    if height % side or width % side:
        raise ValueError(f"a {width}×{height} image does not split into {side}×{side} blocks")
    blocks = pixels.astype(np.float64).reshape(side, height // side, side, width // side)
    return np.rint(blocks.mean(axis=(1, 3))).astype(np.uint8)


def manifest_row(pixels: np.ndarray, image_id: str) -> dict[str, str]:
    """The manifest's columns for one reference image (how the shipped manifest was written)."""
    return {"image_id": image_id, "pixel_sha256": pixel_sha256(pixels),
            "thumbnail": thumbnail(pixels).tobytes().hex()}


def write_manifest(folder: Path, path: Path = MANIFEST) -> int:
    """Write the manifest from a reference ``nih-sample`` folder; returns the number of rows."""
    import pandas as pd

    ids = pd.read_csv(Path(folder) / "Data_Entry_2017_v2020.csv")["Image Index"].tolist()
    rows = [manifest_row(np.asarray(Image.open(Path(folder) / "images" / i).convert("L")), i)
            for i in ids]
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image_id", "pixel_sha256", "thumbnail"])
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def reduce_to_sample(png_bytes: bytes, size: int = SAMPLE_SIZE) -> np.ndarray:
    """A release PNG (1024 px, grey or with extra channels) as the sample's ``size`` px grey
    image by area averaging: for a whole factor (1024 → 512) each output pixel is the mean of
    its k × k block rounded half up (PIL's ``Image.reduce``), else PIL's box filter."""
    with Image.open(io.BytesIO(png_bytes)) as image:
        grey = image.convert("L")
        width, height = grey.size
        if (width, height) == (size, size):
            return np.asarray(grey)
        if width == height and width % size == 0:
            return np.asarray(grey.reduce(width // size))
        return np.asarray(grey.resize((size, size), Image.Resampling.BOX))


class SampleMismatchError(DownloadError):
    """A member of the release does not look like the sample image of the same name."""


def check_image(pixels: np.ndarray, expected: SampleImage) -> bool:
    """True when bit-identical to the reference, False when within resize rounding of it;
    :class:`SampleMismatchError` otherwise."""
    if pixel_sha256(pixels) == expected.pixel_sha256:
        return True
    if pixels.shape != (SAMPLE_SIZE, SAMPLE_SIZE):
        raise SampleMismatchError(f"{expected.image_id}: {pixels.shape[1]}×{pixels.shape[0]} px, "
                                  f"the sample's images are {SAMPLE_SIZE}×{SAMPLE_SIZE}")
    gap = int(np.abs(thumbnail(pixels).astype(int) - expected.thumbnail.astype(int)).max())
    if gap > THUMBNAIL_TOLERANCE:
        raise SampleMismatchError(
            f"{expected.image_id}: its 8×8 thumbnail differs from the manifest's by {gap} grey "
            f"levels (at most {THUMBNAIL_TOLERANCE} allowed): a wrong or damaged image")
    return False


def _write_png(pixels: np.ndarray, dest: Path) -> None:
    part = dest.with_name(dest.name + ".part")
    Image.fromarray(pixels, mode="L").save(part, format="PNG")
    os.replace(part, dest)  # a crash never leaves half an image under the real name


def _present(folder: Path, wanted: Mapping[str, SampleImage]) -> set[str]:
    """Ids whose image is already in place and matches the manifest (checked, not trusted)."""
    present = set()
    for image_id, expected in wanted.items():
        path = folder / "images" / image_id
        if path.is_file():
            try:
                check_image(np.asarray(Image.open(path).convert("L")), expected)
                present.add(image_id)
            except (SampleMismatchError, OSError):
                pass  # rewritten from the release below
    return present


def _stream_archive(url: str, name: str, wanted: Mapping[str, SampleImage], folder: Path,
                    *, timeout: float, progress: bool) -> tuple[int, int]:
    """Read archive ``name`` once from ``url``, writing the wanted members it holds; stops when
    nothing is wanted any more. Returns (written, bit-identical)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"Cannot stream NIH {name}: {url} answered HTTP {exc.code} "
                            f"{exc.reason}.") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise OfflineError(_offline_message(f"the NIH sample ({name})", url,
                                            folder / "images", exc)) from None
    written = identical = 0
    length = response.headers.get("Content-Length")
    bar = tqdm(total=int(length) if length and length.isdigit() else None, unit="B",
               unit_scale=True, unit_divisor=1024, desc=f"{name} (streamed)",
               disable=not progress, leave=False)
    counted = _CountingReader(response, bar)
    try:
        with response, tarfile.open(fileobj=counted, mode="r|gz") as archive:
            for member in archive:
                image_id = Path(member.name).name
                if not member.isfile() or image_id not in wanted:
                    continue
                pixels = reduce_to_sample(archive.extractfile(member).read())
                identical += check_image(pixels, wanted[image_id])
                _write_png(pixels, folder / "images" / image_id)
                written += 1
                del wanted[image_id]
                if not wanted:
                    break
    except (tarfile.TarError, EOFError, OSError, zlib.error, http.client.HTTPException) as exc:
        raise DownloadError(f"The stream of NIH {name} from {url} broke off ({exc}); "
                            f"{written} images were written. Run again to continue.") from None
    finally:
        bar.close()
    return written, identical


class _CountingReader(io.RawIOBase):
    """A response wrapped so that the progress bar counts the bytes tarfile reads."""

    def __init__(self, response, bar):
        self._response, self._bar = response, bar

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        block = self._response.read(size)
        self._bar.update(len(block))
        return block


def _write_label_files(folder: Path, ids: list[str]) -> None:
    """The release's label and box rows of ``ids``, from the copies torchxrayvision bundles."""
    import pandas as pd

    source = _bundled_label_dir()
    for name in ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv"):
        packed = source / f"{name}.gz" if source is not None else None
        if packed is None or not packed.is_file():
            raise DownloadError(f"{name} is not bundled here (torchxrayvision not installed); "
                                f"get it from the NIH folder {NIH_BOX_FOLDER}.")
        table = pd.read_csv(packed)
        rows = table[table["Image Index"].isin(ids)]
        if name.startswith("Data_Entry"):
            rows = rows.set_index("Image Index").loc[ids].reset_index()
            rows = rows[table.columns]
        part = folder / f"{name}.part"
        rows.to_csv(part, index=False)
        os.replace(part, folder / name)


def download_nih_sample(root=None, archives: Mapping[str, str] | None = None, *,
                        manifest: Path = MANIFEST, timeout: float = 30.0,
                        progress: bool = True) -> Path:
    """Build ``<root>/nih-sample`` from the NIH release (see module docstring).

    ``archives``: archive name → URL, in release order (mirrors, tests); default the NIH's own.
    """
    folder = target_dir("nih-sample", root)
    expected = read_manifest(manifest)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    state = folder / STATE_DIR
    state.mkdir(exist_ok=True)
    done_file = state / "archives_done.txt"
    done = set(done_file.read_text().split()) if done_file.is_file() else set()
    wanted = {i: e for i, e in expected.items() if i not in _present(folder, expected)}
    sources = dict(NIH_ARCHIVE_URLS if archives is None else archives)
    total_written = total_identical = 0
    for name, url in sources.items():
        if not wanted:
            break
        if name in done:
            continue
        written, identical = _stream_archive(url, name, wanted, folder, timeout=timeout,
                                             progress=progress)
        total_written += written
        total_identical += identical
        with open(done_file, "a") as stream:
            stream.write(f"{name}\n")
        if progress:
            print(f"  {name}: {written} images; {len(expected) - len(wanted)}/{len(expected)} "
                  f"in place")
    if wanted:
        raise DownloadError(
            f"{len(wanted)} sample images were not in the archives read "
            f"(e.g. {sorted(wanted)[:3]}); delete {done_file} to read every archive again.")
    _write_label_files(folder, list(expected))
    if progress and total_written:
        print(f"nih-sample: {total_written} images written, {total_identical} bit-identical to "
              f"the reference sample, the rest within resize rounding of it")
    return folder


__all__ = ["download_nih_sample", "read_manifest", "write_manifest", "check_image",
           "reduce_to_sample", "pixel_sha256", "thumbnail", "SampleMismatchError", "MANIFEST"]
