"""``cxrstudy`` command line: run notebooks, build the report, check and download data,
evaluate checkpoints."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from ..data.availability import DataUnavailableError
    from .runner import RunLockedError, run_notebooks, set_threads

    if args.threads is not None:
        set_threads(args.threads)
    try:
        results = run_notebooks(args.notebooks, args.profile, args.param, force=args.force,
                                results_dir=args.results, progress=not args.quiet,
                                devices=args.devices)
    except (ConfigError, ValueError, DataUnavailableError, RunLockedError) as exc:
        print(f"cxrstudy run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncxrstudy run: interrupted; the notebook's checkpoints are kept and the same "
              "command resumes it", file=sys.stderr)
        return 130
    _print_index(args.results, args.profile)
    bad = [r for r in results if r.status in ("failed", "blocked")]
    if bad:
        print("failed: " + ", ".join(f"{r.name} ({r.status})" for r in bad), file=sys.stderr)
        for r in bad:
            if r.status == "failed":
                print(f"  partial output of {r.name}: {r.output_dir}", file=sys.stderr)
        return 1
    return 0


def _index_path(results: str | None, profile: str):
    from pathlib import Path

    from ..outputs import profile_dir
    from ..paths import repo_root
    from ..report.build import INDEX

    index = profile_dir(results or repo_root() / "results", profile) / INDEX
    try:
        return index.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return index.resolve()


def _print_index(results: str | None, profile: str) -> None:
    """Where the study's page is, once notebook 08 (or `cxrstudy report`) has written it."""
    index = _index_path(results, profile)
    if index.is_file():
        from ..report.collect import notebook_folders

        runs = [run.provenance_file.stat().st_mtime for run in notebook_folders(index.parent)
                if run.provenance_file.is_file()]
        stale = bool(runs) and max(runs) > index.stat().st_mtime
        print(f"report: {index}" + (f" (older than the latest run: `cxrstudy report --profile "
                                     f"{profile}` regenerates it)" if stale else ""))


def _cmd_report(args: argparse.Namespace) -> int:
    from .config import ConfigError, resolve_parameters
    from ..outputs import Outputs
    from ..outputs import profile_dir as profile_folder
    from ..paths import repo_root
    from ..report.build import ReportError, build_report
    from ..report.collect import REPORT_NOTEBOOK
    from ..reference import ReferenceError

    try:
        params = resolve_parameters(args.profile, args.param).get("08_report", {})
        profile_dir = profile_folder(args.results or repo_root() / "results", args.profile)
        report = build_report(profile_dir, args.profile, note=params.get("profile_note", ""),
                              digits=params.get("digits", 3),
                              require_all=params.get("require_all", False),
                              generated_by="cxrstudy report")
    except (ConfigError, ReportError, ReferenceError, FileNotFoundError) as exc:
        print(f"cxrstudy report: {exc}", file=sys.stderr)
        return 2
    for name in report.missing:
        print(f"  missing: {name} (no results under {profile_dir})")
    for name in report.failed:
        print(f"  {report.results[name].status}: {name}")
    print(f"tables: {len(report.tables)} in {Outputs.of_notebook(profile_dir, REPORT_NOTEBOOK).tables}")
    print(f"report: {_index_path(args.results, args.profile)}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    from .config import ConfigError, resolve_parameters

    try:
        resolved = resolve_parameters(args.profile, args.param)
    except ConfigError as exc:
        print(f"cxrstudy params: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(resolved, indent=2, sort_keys=True))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from ..data.check import main_check

    return main_check(args)


def _cmd_data_download(args: argparse.Namespace) -> int:
    from ..data.obtain import main_download

    if args.name == "chestmnist" and getattr(args, "profile", None) and not args.sizes:
        from .config import image_sizes, resolve_parameters
        from ..data.chestmnist import default_size

        wanted = image_sizes(resolve_parameters(args.profile, []), "chestmnist")
        args.sizes = sorted({default_size(size) for size in wanted}) or None
        if args.sizes:
            print(f"chestmnist: the sizes profile {args.profile} reads: "
                  f"{', '.join(f'{s} px' for s in args.sizes)}")
        else:
            print(f"chestmnist: profile {args.profile} does not read ChestMNIST; nothing to fetch")
            return 0
    return main_download(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate import main_evaluate

    return main_evaluate(args)


class _OneLineErrors(argparse.ArgumentParser):
    """A bad option is one line naming it (``cxrstudy run: argument --threads: must be at
    least 1, got 0``), not the whole usage block above it; ``--help`` still gives the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .arguments import whole_number

    parser = _OneLineErrors(prog="cxrstudy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute notebooks with papermill into results/<profile>/")
    run.add_argument("notebooks", nargs="+", help="notebook stems, numbers (01) or 'all'")
    run.add_argument("--profile", default="default", help="params/<profile>.yaml (default: default)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override a parameter (KEY or NOTEBOOK.KEY); repeatable")
    run.add_argument("--force", action="store_true", help="rerun even when outputs are up to date")
    run.add_argument("--results", default=None, help="results folder (default: ./results)")
    run.add_argument("--quiet", action="store_true", help="no per-cell progress bars")
    run.add_argument("--threads", type=whole_number(1), default=None, metavar="N",
                     help="CPU threads per kernel (sets OMP_NUM_THREADS; default: that variable, "
                          "else torch's choice). On a shared machine use fewer than its cores")
    run.add_argument("--devices", default=None, metavar="LIST",
                     help="run notebooks that do not depend on each other at the same time, one "
                          "per device: GPU numbers (0,1,2,3) or cpu (cpu,cpu: two CPU workers, "
                          "the cores shared out unless --threads); each notebook waits for the "
                          "ones it depends on")
    run.set_defaults(func=_cmd_run)

    report = sub.add_parser("report", help="regenerate the tables and results/<profile>/index.html "
                            "from existing results (no training)")
    report.add_argument("--profile", default="default", help="params/<profile>.yaml (default: default)")
    report.add_argument("--results", default=None, help="results folder (default: ./results)")
    report.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter of 08_report (e.g. digits=2); repeatable")
    report.set_defaults(func=_cmd_report)

    params = sub.add_parser("params", help="print the resolved parameters of a profile")
    params.add_argument("--profile", default="default")
    params.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE")
    params.set_defaults(func=_cmd_params)

    data = sub.add_parser("data", help="check or download a dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    from .arguments import add_check_arguments, add_download_arguments

    check = data_sub.add_parser("check", help="counts, prevalence, missing/corrupt files; exit 1 on problems")
    add_check_arguments(check).set_defaults(func=_cmd_data_check)
    download = data_sub.add_parser("download", help="download a dataset (or print registration steps)")
    add_download_arguments(download).set_defaults(func=_cmd_data_download)

    evaluate = sub.add_parser("evaluate", help="evaluate a saved checkpoint on any dataset")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--root", default=None)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--image-size", type=whole_number(1), default=None,
                          help="pixels (default: the size the model was trained at)")
    evaluate.add_argument("--batch-size", type=whole_number(1), default=64)
    evaluate.add_argument("--n-boot", type=whole_number(0), default=1000)
    evaluate.add_argument("--seed", type=int, default=None,
                          help="seed of the patient-level split (default: the checkpoint's own)")
    evaluate.add_argument("--out", default="metrics.json")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command's exit status; a bad command line (or ``--help``) returns argparse's status
    instead of raising it, so a caller in Python gets a number either way."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
