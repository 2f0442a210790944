"""``python -m cxrstudy.rehearsal [--folder results/rehearsal] [NOTEBOOK ...]`` (``make rehearse``).

Writes the miniature releases and the weight stand-ins once (``<folder>/data``,
``<folder>/home``), then runs the paper profile's notebooks on them with the scale overrides of
:mod:`cxrstudy.rehearsal.scale`, results in ``<folder>/results/paper/`` (report: ``index.html``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .scale import (PROFILE, RELEASE_SIZES, hf_hub_cache, override_arguments,
                    rehearsal_environment, scale_note)

DONE = "rehearsal.json"  # written last: the data and weights are whole
GENERATOR_VERSION = 4  # bump when the generators write other files: the next run rebuilds


def prepare(folder: Path, log=print) -> Path:
    """The data and weight stand-ins under ``folder`` (kept when complete, else rebuilt)."""
    from .releases import write_chexpert, write_nih, write_stand_in_note, write_vindr
    from .weights import write_weight_standins

    folder = Path(folder).resolve()
    stamp = folder / DONE
    wanted = {"sizes": RELEASE_SIZES, "version": GENERATOR_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()).get("prepared") == wanted:
        log(f"rehearsal data and weights: {folder} (already prepared)")
        return folder
    start = time.perf_counter()
    for part in ("data", "home", "cache"):  # the cache too: it is keyed by ids, not pixels
        if (folder / part).exists():
            shutil.rmtree(folder / part)  # only what an earlier prepare wrote
    data, env = folder / "data", rehearsal_environment(folder)
    log(f"writing miniature releases into {data}")
    write_nih(data, n_images=RELEASE_SIZES["nih"], progress=log)
    write_chexpert(data, n_images=RELEASE_SIZES["chexpert"], progress=log)
    write_vindr(data, n_images=RELEASE_SIZES["vindr"], progress=log)
    write_stand_in_note(data)
    log("writing weight stand-ins: " + ", ".join(
        str(p) for p in write_weight_standins(env["HOME"], hf_hub_cache(folder))))
    stamp.write_text(json.dumps({"prepared": wanted}, indent=2))
    log(f"prepared in {time.perf_counter() - start:.0f} s")
    return folder


def run(folder: Path, notebooks: list[str], extra: list[str], force: bool = False,
        threads: int | None = None) -> int:
    """The paper profile on the rehearsal folder, through the ordinary runner (a subprocess, so
    the kernels inherit the rehearsal's environment and nothing else)."""
    folder = Path(folder).resolve()
    command = [sys.executable, "-m", "cxrstudy", "run", *notebooks, "--profile", PROFILE,
               "--results", str(folder / "results"), "--quiet"]
    for value in override_arguments() + [f"08_report.profile_note={json.dumps(scale_note(), ensure_ascii=False)}"]:
        command += ["-p", value]
    for value in extra:
        command += ["-p", value]
    if force:
        command.append("--force")
    if threads:
        command += ["--threads", str(threads)]
    print("rehearsal: " + " ".join(command[2:5]) + " … (scale: "
          + ", ".join(override_arguments()) + ")", flush=True)
    return subprocess.call(command, env=rehearsal_environment(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrstudy.rehearsal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", default=["all"],
                        help="notebook stems or numbers (default: all)")
    parser.add_argument("--folder", default="results/rehearsal",
                        help="where data, weight stand-ins and results go (never committed)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a further override (e.g. 05_glori.fractions=[1.0]); repeatable")
    parser.add_argument("--force", action="store_true", help="rerun up-to-date notebooks")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per kernel")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the data and weight stand-ins, run nothing")
    args = parser.parse_args(argv)
    prepare(Path(args.folder))
    if args.prepare_only:
        return 0
    return run(Path(args.folder), args.notebooks or ["all"], args.param, args.force, args.threads)


if __name__ == "__main__":
    sys.exit(main())
