"""Peak memory of building the preprocessing cache, and the cost of a second build.

Why: the cache (``cxrstudy.data.cache``) must stream — decode a chunk, append it to the file,
forget it — so that building it for the full NIH release (112,120 images) needs no more memory
than building it for the sample. This script builds the cache of ``--images`` phantom radiographs
(:class:`~cxrstudy.data.synthetic.SyntheticDataset`, rendered on the fly, nothing held in memory)
at ``--size`` px in a fresh child process and reads that process's peak resident set size
(``VmHWM``) before and after the build. The pixel file itself is ``images × size²`` bytes
(20,000 × 224² ≈ 1.0 GB by default): a build that held it in memory would show it in the peak.

Then it builds the same cache a second time in the same process, counting image reads: a
finished cache with the same key must be reused without decoding a single image.

Outputs: ``<out>/cache_memory.json`` and ``<out>/cache_memory.md``; an earlier run's files are
moved to ``<out>/_previous/<timestamp>/`` first.

    python benchmarks/cache_memory.py                     # 20,000 images at 224 px (~1 GB file)
    python benchmarks/cache_memory.py --quick             # 2,000 images at 64 px, seconds
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_metadata, write_result_files  # noqa: E402

RESULT_FILES = ("cache_memory.json", "cache_memory.md")
LIMIT_BYTES = 1 << 30  # the performance issue's bound on the build's peak memory (1 GiB)


def _status_bytes(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process from /proc, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class CountingReads:
    """Wraps a dataset's ``read_image`` to count how many images a build decodes."""

    def __init__(self, dataset):
        self.count = 0
        self._read = dataset.read_image
        dataset.read_image = self

    def __call__(self, i):
        self.count += 1
        return self._read(i)


def measure(n_images: int, size: int, chunk_size: int, cache_dir: str) -> dict[str, Any]:
    """In the measuring process: build twice; memory, reads and times of both builds."""
    from cxrstudy.data.cache import ImageCache
    from cxrstudy.data.synthetic import SyntheticDataset

    dataset = SyntheticDataset(image_size=size, n_images=n_images, seed=0)
    reads = CountingReads(dataset)
    reset = _reset_peak()
    before = _status_bytes("VmRSS")
    started = time.perf_counter()
    cache = ImageCache.build(dataset, cache_dir=cache_dir, progress=False, chunk_size=chunk_size)
    first_seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM")
    first_reads = reads.count
    file_bytes = cache.path.stat().st_size
    started = time.perf_counter()
    again = ImageCache.build(dataset, cache_dir=cache_dir, progress=False, chunk_size=chunk_size)
    second_seconds = time.perf_counter() - started
    return {
        "images": n_images, "size": size, "chunk_size": chunk_size,
        "file_bytes": file_bytes, "rss_before_bytes": before, "peak_rss_bytes": peak,
        "build_increment_bytes": peak - before, "peak_reset": reset,
        "first_build_seconds": first_seconds, "first_build_reads": first_reads,
        "second_build_seconds": second_seconds, "second_build_reads": reads.count - first_reads,
        "second_build_same_file": again.path == cache.path,
        "failures": len(cache.failures),
    }


def run(n_images: int, size: int, chunk_size: int, cache_dir: Path) -> dict[str, Any]:
    """Measure in a fresh interpreter (this script with ``--child``): no memory left over from
    the caller, and its peak is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--images", str(n_images),
               "--size", str(size), "--chunk-size", str(chunk_size), "--cache-dir", str(cache_dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process exited with {done.returncode}:\n{done.stderr}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["peak_under_limit"] = row["peak_rss_bytes"] < LIMIT_BYTES
    row["peak_over_file"] = row["peak_rss_bytes"] / row["file_bytes"]
    return row


def markdown(result: dict) -> str:
    r, meta = result["row"], result["metadata"]
    mib = 1 << 20
    lines = [
        "# Preprocessing cache: peak memory of a build", "",
        f"{meta['date']} · {meta['cpu_name']} · {meta['cpu_count']} CPUs · torch {meta['torch']}"
        + (" · QUICK MODE" if result["quick"] else ""), "",
        f"{r['images']:,} phantom images at {r['size']} px, chunks of {r['chunk_size']}: "
        f"pixel file {r['file_bytes'] / mib:,.0f} MiB.", "",
        "| measure | value |", "| --- | --- |",
        f"| resident memory before the build | {r['rss_before_bytes'] / mib:,.0f} MiB |",
        f"| peak resident memory of the process | {r['peak_rss_bytes'] / mib:,.0f} MiB |",
        f"| peak − before (the build's own share) | {r['build_increment_bytes'] / mib:,.0f} MiB |",
        f"| peak ÷ pixel file | {r['peak_over_file']:.2f} |",
        f"| peak under 1 GiB | {'yes' if r['peak_under_limit'] else 'NO'} |",
        f"| first build | {r['first_build_seconds']:.1f} s, {r['first_build_reads']:,} images read |",
        f"| second build | {r['second_build_seconds']:.3f} s, {r['second_build_reads']:,} images read |",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 images at 64 px")
    parser.add_argument("--images", type=int, default=None, help="default 20000 (quick 2000)")
    parser.add_argument("--size", type=int, default=None, help="default 224 (quick 64)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="images per chunk (default: the cache's own)")
    parser.add_argument("--out", default="results/bench", help="output folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None,
                        help="where to build (default: a temp folder, removed afterwards)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from cxrstudy.data.cache import DEFAULT_CHUNK
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    n_images = args.images or (2000 if args.quick else 20000)
    size = args.size or (64 if args.quick else 224)
    chunk = args.chunk_size or DEFAULT_CHUNK
    if n_images < 1 or size < 1 or chunk < 1:
        raise SystemExit("need --images, --size and --chunk-size >= 1")
    if args.child:  # the measuring process: one JSON line on stdout, nothing written
        print(json.dumps(measure(n_images, size, chunk, args.cache_dir)))
        return {}
    print(f"cache memory benchmark: {n_images:,} images at {size} px, chunks of {chunk}", flush=True)
    started = time.perf_counter()
    if args.cache_dir:
        row = run(n_images, size, chunk, Path(args.cache_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="cxrstudy-cache-bench-") as tmp:
            row = run(n_images, size, chunk, Path(tmp))
    result = {"quick": bool(args.quick), "limit_bytes": LIMIT_BYTES, "row": row,
              "metadata": machine_metadata("benchmarks/cache_memory.py", argv,
                                           time.perf_counter() - started)}
    out = Path(args.out)
    moved = write_result_files(out, {RESULT_FILES[0]: result}, {RESULT_FILES[1]: markdown(result)})
    if moved is not None:
        print(f"moved the previous results to {moved}")
    print(markdown(result))
    return json.loads((out / RESULT_FILES[0]).read_text())


if __name__ == "__main__":
    main()
