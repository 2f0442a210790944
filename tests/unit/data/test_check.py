"""Data check: counts, named missing/corrupt files, broken label files, exit status, real sample."""
from __future__ import annotations

import argparse

import pandas as pd
import pytest

import cxrstudy.data as data
from _fakes import FolderCXR, write_fake_folder
from cxrstudy.data.check import CheckReport, check_dataset, main_check


@pytest.fixture(autouse=True)
def _register_fake(monkeypatch):
    monkeypatch.setitem(data._ADAPTERS, "fakefolder", FolderCXR)


def test_missing_and_corrupt_files_are_named_and_not_ok(tmp_path):
    root = write_fake_folder(tmp_path / "f", n=12, missing=[3], corrupt=[7])
    report = check_dataset("fakefolder", root, progress=False)
    assert isinstance(report, CheckReport)
    assert report.images == 12 and report.patients == 6 and report.checked == 12
    assert len(report.missing) == 1 and "img0003.png" in report.missing[0]
    assert str(root / "images" / "img0003.png") in report.missing[0]
    assert len(report.corrupt) == 1 and "img0007.png" in report.corrupt[0]
    assert report.ok is False
    assert report.views == {"PA": 8, "AP": 4}
    assert report.image_shapes == {"40x40": 10}
    prevalence = report.prevalence.set_index("class")
    assert prevalence.loc["Alpha", "positives"] == 6  # even rows of 12
    assert prevalence.loc["Beta", "positives"] == 4   # rows 0, 3, 6, 9
    assert prevalence.loc["Gamma", "unknown"] == 3    # rows 0, 5, 10
    assert prevalence.loc["Gamma", "positives"] == 2  # rows 1 and 11
    assert prevalence.loc["Gamma", "prevalence"] == pytest.approx(2 / 9)
    text = report.to_text()
    assert "PROBLEMS FOUND" in text and "img0003.png" in text and "img0007.png" in text


def test_clean_folder_is_ok_and_main_check_exits_zero(tmp_path, capsys):
    root = write_fake_folder(tmp_path / "f", n=6)
    report = check_dataset("fakefolder", root, progress=False)
    assert report.ok and report.missing == [] and report.corrupt == [] and report.problems == []
    assert isinstance(report.prevalence, pd.DataFrame) and len(report.prevalence) == 3
    args = argparse.Namespace(name="fakefolder", root=str(root), image_size=None, progress=False)
    assert main_check(args) == 0
    assert ": OK" in capsys.readouterr().out


def test_main_check_exits_one_when_files_are_wrong(tmp_path, capsys):
    root = write_fake_folder(tmp_path / "f", n=6, missing=[1])
    assert main_check(["fakefolder", "--root", str(root), "--no-progress"]) == 1
    assert "img0001.png" in capsys.readouterr().out


def test_broken_label_file_is_reported_not_raised(tmp_path):
    root = write_fake_folder(tmp_path / "f", n=4)
    table = pd.read_csv(root / "labels.csv").drop(columns=["Beta"])
    table.to_csv(root / "labels.csv", index=False)
    report = check_dataset("fakefolder", root, progress=False)
    assert not report.ok and report.images == 0
    assert len(report.problems) == 1 and "missing columns ['Beta']" in report.problems[0]
    assert main_check(argparse.Namespace(name="fakefolder", root=str(root))) == 1


def test_absent_folder_and_unknown_name_are_reported(tmp_path):
    report = check_dataset("fakefolder", tmp_path / "nowhere", progress=False)
    assert not report.ok and "FileNotFoundError" in report.problems[0]
    unknown = check_dataset("no-such-dataset", tmp_path, progress=False)
    assert not unknown.ok and "unknown dataset" in unknown.problems[0]


def test_real_nih_sample_is_ok(nih_sample_root):
    pytest.importorskip("cxrstudy.data.nih")
    report = check_dataset("nih", nih_sample_root, progress=False)
    assert report.images == 618 and report.checked == 618
    assert report.missing == [] and report.corrupt == []
    assert report.ok, report.to_text()
    assert report.image_shapes == {"512x512": 618}
    assert report.patients == 618
    assert len(report.prevalence) == 14
