"""``cxrstudy run --force`` reaches training with a fresh checkpoint folder: an interrupted run's
outputs, which a plain rerun resumes in place, are moved aside instead (issue 24: a broken
folder must never be left with no command that starts afresh)."""
import json

from cxrstudy.pipeline.runner import archive_previous


def _interrupted_run(output_dir, fp="same-parameters"):
    (output_dir / "checkpoints" / "arm").mkdir(parents=True)
    (output_dir / "checkpoints" / "arm" / "best.pt").write_text("unfinished")
    (output_dir / "provenance.json").write_text(json.dumps({"status": "interrupted",
                                                            "fingerprint": fp}))


def test_force_archives_an_interrupted_run_that_a_plain_rerun_resumes(tmp_path):
    output_dir = tmp_path / "results" / "tiny" / "01_baseline"
    _interrupted_run(output_dir)
    lines = []
    assert archive_previous(output_dir, "same-parameters", lines.append) is None
    assert (output_dir / "checkpoints" / "arm" / "best.pt").is_file()  # resumed in place

    target = archive_previous(output_dir, "same-parameters", lines.append, force=True)
    assert target is not None and not any(output_dir.iterdir())
    assert (target / "checkpoints" / "arm" / "best.pt").read_text() == "unfinished"
    assert any("earlier outputs moved to" in line for line in lines)
