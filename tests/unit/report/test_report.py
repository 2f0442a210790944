"""The report (notebook 08, ``cxrstudy report``): the papers' numbers each have a source, tables
put ours (with CIs) beside the paper's, captions carry the caveats, missing notebooks are listed,
the index links only to files that exist — on hand-made results and on the real tiny run."""
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest
import yaml

from cxrstudy.pipeline import cli
from cxrstudy import reference
from cxrstudy.report.build import ReportError, build_report
from cxrstudy.pipeline.runner import run_notebooks
from _fakes import write_notebook
from _fakes import REPO

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion"]
PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")


def overall(macro, micro, width=0.1):
    return {"macro_auc": macro, "macro_auc_low": macro - width, "macro_auc_high": macro + width,
            "micro_auc": micro, "micro_auc_low": micro - width, "micro_auc_high": micro + width}


def write_run(root, name, metrics, figures=(), tables=None, status="ok"):
    folder = root / name
    (folder / "figures").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "provenance.json").write_text(json.dumps({
        "status": status, "error": None, "fingerprint": "f" * 16, "params_hash": "a1b2c3",
        "params": {"profile": "tiny", "dataset": metrics.get("dataset")}, "wall_seconds": 12.5,
        "git": {"commit": "0123456789abcdef", "dirty": False}, "device": {"device": "cpu"},
        "packages": {"torch": "2.14.1"}}))
    (folder / f"{name}.ipynb").write_text("{}")
    for fig in figures:
        (folder / "figures" / f"{fig}.png").write_bytes(PNG_1PX)
        (folder / "figures" / f"{fig}.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    for table, frame in (tables or {}).items():
        (folder / "tables").mkdir(exist_ok=True)
        frame.to_csv(folder / "tables" / f"{table}.csv", index=False)
        (folder / "tables" / f"{table}.md").write_text(f"Caption of {table}\n\n| a |\n| --- |\n")


@pytest.fixture
def hand_made(tmp_path):
    """results/tiny with 01, 03, 06 and an explainability notebook; 02 (and others) missing."""
    root = tmp_path / "results" / "tiny"
    model = lambda o, aucs: {"overall": o, "per_class_auc": dict(zip(CLASSES, aucs)),  # noqa: E731
                             "params": 2_000_000}
    write_run(root, "01_baseline", {"dataset": "nih-sample", "image_size": 64, "models": {
        "densenet121": model(overall(0.61, 0.58), [0.6, 0.7, None])},
        "dropped_images": {"00000013_005.png": "cannot decode: truncated"}}, figures=["roc"])
    write_run(root, "03_knowledge_distillation", {
        "dataset": "nih-sample", "image_size": 64, "backbone": "efficientvit_m0", "models": {
            "baseline": model(overall(0.55, 0.52), [0.5, 0.6, 0.55]),
            "authors_baseline": model(overall(0.50, 0.50), [0.5, 0.5, 0.5]),
            "mxa_kd": model(overall(0.70, 0.66), [0.7, 0.8, 0.6])},
        "arm_settings": authors_wiring(["baseline", "authors_baseline", "mxa_kd"])})
    write_run(root, "06_cross_attention", {
        "dataset": "nih-sample", "image_size": 64, "backbones": ["resnet18", "resnet18"], "models": {
            "single": model(overall(0.60, 0.57), [0.62, 0.71, 0.5])}},
        tables={"per_class_auc": pd.DataFrame({"class": CLASSES, "single AUC": [0.62, 0.71, 0.5],
                                               "single low": [0.5, 0.6, None],
                                               "single high": [0.74, 0.82, None]})})
    write_run(root, "07_explainability", {"dataset": "nih-sample", "pointing_game": 0.4},
              figures=["gradcam overlay"], tables={"pointing": pd.DataFrame({"class": CLASSES})})
    expected = ["00_data_exploration", "01_baseline", "02_mxa", "03_knowledge_distillation",
                "04_low_resolution", "05_glori", "06_cross_attention", "07_explainability"]
    return root, expected


def authors_wiring(arms, placement="block_input"):
    """What 03 records of its arms (metrics.json's arm_settings) with MXA placed as given."""
    from cxrstudy.methods.mxa import study as mxa

    return mxa.settings_by_arm(arms, {"mxa_placement": placement})


def build(root, expected, **kw):
    kw.setdefault("note", "Tiny profile: a machinery test; the numbers say nothing.")
    return build_report(root, "tiny", expected=expected, **kw)


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.update([attrs["id"]] if "id" in attrs else [])
        for key in ("href", "src"):
            if attrs.get(key):
                self.links.append(attrs[key])


def check_links(index: Path) -> Links:
    """Every href/src is relative and names a file next to the index (or an anchor on it)."""
    parser = Links()
    parser.feed(index.read_text())
    assert parser.links
    for link in parser.links:
        assert not re.match(r"^[a-z]+:|^//|^/", link), link  # no scheme, no absolute path
        if link.startswith("#"):
            assert link[1:] in parser.ids, link
        else:
            assert (index.parent / unquote(link)).is_file(), link
    return parser


# --- the papers' numbers -------------------------------------------------------------------------

def test_every_paper_reference_entry_has_a_source():
    data = yaml.safe_load((REPO / "params" / "paper_reference.yaml").read_text())
    entries = [(pid, n) for pid, paper in data["papers"].items() for n in paper["numbers"]]
    assert {pid for pid, _ in entries} == {"mxa", "mlcak", "glori", "can"}
    for pid, n in entries:
        assert data["papers"][pid]["citation"] and n["metric"] and n["dataset"] and n["split"], n
        assert n["source"]["where"] and n["source"]["checked"], n
        assert {"table", "page", "url"} <= set(n["source"]), n
        value = n.get("value")  # a number, or per class a mapping of names to numbers
        has_value = isinstance(value, (int, float)) or (
            isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()))
        assert has_value != bool(n.get("not_available")), n
    # what the brief and the notebooks rely on
    assert reference.number("mxa", "micro_auc.mxa_kd")["value"] == 0.85
    assert reference.number("mxa", "micro_auc.baseline")["value"] == 0.66
    assert "not_available" in reference.number("mlcak", "auroc")


def test_mlcak_setting_names_the_abstracts_two_resolutions():
    from cxrstudy.report.tables import caveat, paper_resolutions

    setting = reference.paper("mlcak")["setting"]
    assert (setting["image_size"], setting["teacher_image_size"]) == (28, 224)
    assert paper_resolutions(setting) == {28, 224}
    # a run at the paper's two sizes on VinDr still differs in the model (not named), and the
    # caveat names both of the paper's resolutions
    class Run:
        name, status = "04_low_resolution", "ok"
        metrics = {"models": {"mlcak_28": {}}}

        def setting(self, key):
            return {"dataset": "vindr", "resolutions": [28], "teacher_image_size": 224,
                    "vit": "deit_tiny_mt"}.get(key)

    text = caveat(reference.paper("mlcak"), [Run()])
    assert "Paper: VinDr-CXR, 28 px (teacher 224 px)" in text
    assert "28 px (teacher 224 px), deit_tiny_mt" in text


def test_chexfound_cites_the_version_of_its_pretraining_count():
    model = reference.paper("glori")["setting"]["model"]
    assert "987K" in model and "2502.05142v2" in model and "one million" in model


def test_a_number_without_source_or_value_is_refused():
    good = yaml.safe_load((REPO / "params" / "paper_reference.yaml").read_text())
    reference.check_reference(good)
    no_source = json.loads(json.dumps(good))
    del no_source["papers"]["mxa"]["numbers"][0]["source"]
    with pytest.raises(reference.ReferenceError, match="source"):
        reference.check_reference(no_source)
    neither = json.loads(json.dumps(good))
    del neither["papers"]["mxa"]["numbers"][0]["value"]
    with pytest.raises(reference.ReferenceError, match="not_available"):
        reference.check_reference(neither)


def test_a_paper_number_stands_only_beside_the_arm_that_rebuilds_the_papers_model(hand_made):
    root, expected = hand_made
    metrics_file = root / "03_knowledge_distillation" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    metrics["arm_settings"] = authors_wiring(list(metrics["models"]), placement="mixer")
    metrics_file.write_text(json.dumps(metrics))
    build(root, expected)
    table = pd.read_csv(root / "08_report/tables/mxa.csv")
    arms_03 = table[table["notebook"] == "03_knowledge_distillation"].set_index("arm")
    assert pd.isna(arms_03.loc["mxa_kd", "paper micro AUC"])  # our placement: not theirs
    assert "paper 0.85 not shown" in arms_03.loc["mxa_kd", "note"]
    assert "placement 'mixer' (the paper's model: 'block_input')" in arms_03.loc["mxa_kd", "note"]
    assert arms_03.loc["authors_baseline", "paper micro AUC"] == 0.66  # still the authors' model
    # the caption says how the paper's 0.85 was selected, and that 'micro' is our reading
    md = (root / "08_report/tables/mxa.md").read_text()
    assert "selected on the test set" in md and "is our reading" in md


def test_the_mxa_study_reads_its_paper_numbers_from_the_reference():
    from cxrstudy.methods.mxa import study as mxa

    assert mxa.PAPER_MICRO_AUC == {"baseline": 0.66, "mxa_kd": 0.85}
    # the paper's text gives no parameter count we could cite: the authors' logs do
    assert mxa.AUTHORS_PARAMETERS_M == {"efficientvit_m5": {
        "without MXA": 12.094162, "with MXA": 16.14901, "with MXA + KD": 16.155168}}
    assert "2504.02277" in mxa.PAPER and "CheXpert" in mxa.PAPER


# --- tables from hand-made results ---------------------------------------------------------------

def test_paper_table_puts_ours_with_ci_beside_the_papers_number(hand_made):
    root, expected = hand_made
    report = build(root, expected)
    table = pd.read_csv(root / "08_report/tables/mxa.csv")
    row = table[(table["notebook"] == "03_knowledge_distillation") & (table["arm"] == "mxa_kd")].iloc[0]
    assert row["macro AUC"] == 0.70 and row["macro low"] == pytest.approx(0.60)
    assert row["micro AUC"] == 0.66 and row["micro high"] == pytest.approx(0.76)
    assert row["paper micro AUC"] == 0.85
    # the paper's 0.66 sits beside the arm that reproduces its collapsed baseline, not ours
    arms_03 = table[table["notebook"] == "03_knowledge_distillation"].set_index("arm")
    assert arms_03.loc["authors_baseline", "paper micro AUC"] == 0.66
    assert pd.isna(arms_03.loc["baseline", "paper micro AUC"])
    # 02_mxa has no results: listed as missing, with the paper's numbers for its arms kept
    missing = table[table["notebook"] == "02_mxa"].set_index("arm")
    assert list(missing.index) == ["mxa"]  # 02's baseline is trained correctly: no paper number
    assert set(missing["note"]) == {"missing: no results in this folder"}
    # the authors' +MXA-only log (no number in the paper) beside 02's mxa arm
    assert missing.loc["mxa", "paper micro AUC (authors' training log, last epoch)"] == 0.8251
    assert "02_mxa" in report.missing and "04_low_resolution" in report.missing
    md = (root / "08_report/tables/mxa.md").read_text()
    assert "| 03_knowledge_distillation | mxa_kd | 0.700 (0.600–0.800) | 0.660 (0.560–0.760) |" in md
    assert "| 0.850 |" in md
    # the caveat: our dataset, resolution and model are not the paper's; and the profile note
    assert "ours: 03_knowledge_distillation: nih-sample, 64 px, efficientvit_m0" in md
    assert "Paper: CheXpert, 224 px, EfficientViT-M5" in md
    assert "02_mxa (missing: no results in this folder)" in md
    assert "machinery test" in md and "abstract" in md


def test_the_runs_table_shows_the_images_each_notebook_dropped(hand_made):
    root, expected = hand_made
    build(root, expected)
    runs = pd.read_csv(root / "08_report/tables/runs.csv", keep_default_na=False).set_index("notebook")
    assert runs.loc["01_baseline", "dropped images"] == "1 (00000013_005.png)"
    assert runs.loc["03_knowledge_distillation", "dropped images"] == ""  # not recorded there


def test_a_per_class_paper_number_is_named_in_the_caption_not_printed_whole(hand_made):
    root, expected = hand_made
    build(root, expected)
    md = (root / "08_report/tables/mxa_per_class.md").read_text()
    caption = md.split("\n\n")[1]
    assert "per-class AUC (authors' training log, baseline, last epoch) (13 classes, in the table)" \
        in caption
    assert "Lung Opacity" not in caption and "0.817" not in caption  # the numbers are the column's


def test_papers_without_sourced_numbers_say_so(hand_made):
    root, expected = hand_made
    build(root, expected)
    mlcak = (root / "08_report/tables/mlcak.md").read_text()
    assert "not available" in mlcak and "04_low_resolution (missing" in mlcak
    can = pd.read_csv(root / "08_report/tables/can.csv")
    assert can["paper mean AUC"].isna().all() and can.loc[0, "macro AUC"] == 0.60
    assert "| n/a |" in (root / "08_report/tables/can.md").read_text()
    per_class = pd.read_csv(root / "08_report/tables/can_per_class.csv").set_index("class")
    assert per_class.loc["Cardiomegaly", "single AUC"] == 0.71
    assert per_class.loc["Cardiomegaly", "single low"] == 0.60  # from 06's per_class_auc.csv
    assert pd.isna(per_class.loc["Effusion", "single low"])  # no CI there: left empty
    assert per_class["paper per-class AUC"].isna().all()


def test_tables_are_written_as_csv_markdown_and_latex(hand_made):
    root, expected = hand_made
    report = build(root, expected)
    for name, files in report.table_files.items():
        assert set(files) == {"csv", "md", "tex"}, name
        tex = files["tex"].read_text()
        assert tex.count(r"\begin{tabular}") == 1 and r"\caption{" in tex, name
        body = re.sub(r"\\[{}]", "", tex)
        assert body.count("{") == body.count("}"), name  # braces balanced after escaping
    tex = report.table_files["mxa"]["tex"].read_text()
    assert r"03\_knowledge\_distillation & mxa\_kd & 0.700 (0.600--0.800)" in tex
    assert r"95\% CIs" in tex


def test_index_links_only_to_files_that_exist_and_shows_every_notebook(hand_made):
    root, expected = hand_made
    report = build(root, expected)
    parser = check_links(report.index)
    page = report.index.read_text()
    for name in expected:
        assert name in parser.ids, name
    assert "01_baseline/figures/roc.png" in parser.links
    assert "07_explainability/figures/gradcam%20overlay.png" in parser.links  # picked up generically
    assert "07_explainability/07_explainability.ipynb" in parser.links
    for csv in root.glob("*/tables/*.csv"):  # every table, the report's own ones too
        assert csv.relative_to(root).as_posix().replace(" ", "%20") in parser.links, csv
    assert "08_report/metrics.json" in parser.links and 'loading="lazy"' not in page
    assert "Caption of pointing" in page and "0123456789abcdef" in page and "a1b2c3" in page
    assert "missing: no results in this folder" in page
    assert "http://" not in page and "https://" not in page.split("<h2 id=\"papers\">")[0]


def test_a_report_replaces_only_an_earlier_report_of_the_same_profile(hand_made, tmp_path):
    root, expected = hand_made
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    build(root, expected)
    build(root, expected)  # regenerating replaces the report's own files …
    assert json.loads((root / "08_report/metrics.json").read_text())["profile"] == "tiny"
    assert all(p.read_bytes() == data for p, data in before.items())  # … and no notebook output
    other = tmp_path / "copy" / "sample"
    other.mkdir(parents=True)
    (other / "index.html").write_text((root / "index.html").read_text())  # tiny's page in sample/
    with pytest.raises(ReportError, match="another profile"):
        build_report(other, "sample", expected=expected)
    (root / "index.html").write_text("<html>someone's own page</html>")
    with pytest.raises(ReportError, match="not written by cxrstudy.report"):
        build(root, expected)
    assert (root / "index.html").read_text() == "<html>someone's own page</html>"


def test_require_all_fails_naming_the_missing_notebooks(hand_made):
    root, expected = hand_made
    with pytest.raises(ReportError, match="02_mxa"):
        build(root, expected, require_all=True)


def test_report_command_rebuilds_from_existing_results(hand_made, capsys):
    root, _ = hand_made
    assert cli.main(["report", "--profile", "tiny", "--results", str(root.parent)]) == 0
    out = capsys.readouterr().out
    printed = Path(re.search(r"^report: (.+)$", out, re.M).group(1))
    assert printed.resolve() == (root / "index.html").resolve()
    assert "missing: 02_mxa" in out
    assert "machinery test" in (root / "08_report/tables/mxa.md").read_text()  # tiny.yaml's note
    check_links(root / "index.html")
    assert cli.main(["report", "--profile", "tiny", "--results", str(root.parent / "nowhere")]) == 2


def test_the_report_runs_after_a_failed_upstream_and_reruns_when_it_recovers(tmp_path):
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir(), params.mkdir()
    write_notebook(nbs, "00_train", 'profile = "x"\noutput_dir = ""\n')
    write_notebook(nbs, "01_other", 'profile = "x"\noutput_dir = ""\n', ["00_train"])
    write_notebook(nbs, "08_report", 'profile = "x"\noutput_dir = ""\n', ["00_train"])
    meta = json.loads((nbs / "08_report.ipynb").read_text())
    meta["metadata"]["cxrstudy"]["runs_after_failed_upstream"] = True
    (nbs / "08_report.ipynb").write_text(json.dumps(meta))
    (params / "tiny.yaml").write_text("description: t\n")
    fail = {"00_train"}

    def executor(spec, params, output_dir, **kwargs):
        output_dir.mkdir(parents=True, exist_ok=True)
        if spec.name in fail:
            raise RuntimeError("boom")

    def run():
        return [r.status for r in run_notebooks("all", "tiny", notebooks_dir=nbs, params_dir=params,
                                                 results_dir=tmp_path / "results", executor=executor,
                                                 log=lambda m: None, check_data=False)]

    assert run() == ["failed", "blocked", "ok"]  # an ordinary dependant is blocked, the report runs
    fail.clear()
    assert run() == ["ok", "ok", "ok"]  # upstream recovered: the report is not "up to date"
    assert run() == ["skipped", "skipped", "skipped"]


# --- the real tiny run (08 runs as part of "all") -----------------------------------------------

def test_tiny_report_tables_hold_the_notebooks_numbers(tiny_results):
    root, _ = tiny_results
    assert (root / "08_report/08_report.ipynb").is_file()
    written = json.loads((root / "08_report/metrics.json").read_text())
    assert written["profile"] == "tiny" and written["generated_by"] == "notebook 08_report"
    table = pd.read_csv(root / "08_report/tables/mxa.csv")
    for nb in ("02_mxa", "03_knowledge_distillation"):
        models = json.loads((root / nb / "metrics.json").read_text())["models"]
        rows = table[table["notebook"] == nb].set_index("arm")
        assert set(rows.index) == set(models), nb
        for arm, model in models.items():
            o = model["overall"]
            for ours, key in (("macro AUC", "macro_auc"), ("macro low", "macro_auc_low"),
                              ("micro AUC", "micro_auc"), ("micro high", "micro_auc_high")):
                assert rows.loc[arm, ours] == pytest.approx(o[key], nan_ok=True), (nb, arm, ours)
    paper = table.set_index(["notebook", "arm"])["paper micro AUC"]
    assert paper[("03_knowledge_distillation", "authors_baseline")] == 0.66
    # tiny runs MXA with our mixer placement: the authors' 0.85 and 0.8251 are not beside it
    assert pd.isna(paper[("03_knowledge_distillation", "mxa_kd")])
    assert pd.isna(paper[("02_mxa", "baseline")]) and pd.isna(paper[("02_mxa", "mxa")])
    notes = table.set_index(["notebook", "arm"])["note"]
    assert "not the paper's model" in notes[("03_knowledge_distillation", "mxa_kd")]
    assert "placement 'mixer'" in notes[("02_mxa", "mxa")]
    md = (root / "08_report/tables/mxa.md").read_text()
    assert "machinery test" in md and "efficientvit_m0" in md and "EfficientViT-M5" in md
    glori = pd.read_csv(root / "08_report/tables/glori.csv")
    models = json.loads((root / "05_glori/metrics.json").read_text())["models"]
    assert dict(zip(glori["arm"], glori["macro AUC"])) == pytest.approx(
        {k: m["overall"]["macro_auc"] for k, m in models.items()}, nan_ok=True)


def test_tiny_index_lists_every_notebook_folder_and_its_links_resolve(tiny_results):
    root, _ = tiny_results
    parser = check_links(root / "index.html")
    folders = [p.name for p in root.iterdir() if p.is_dir() and re.match(r"^\d\d_", p.name)]
    assert len(folders) >= 8
    for name in folders:
        if name != "08_report":
            assert name in parser.ids, name
            assert f"{name}/{name}.ipynb" in parser.links, name
    figures = {link for link in parser.links if link.endswith(".png")}
    assert len(figures) == len(list(root.glob("[0-9][0-9]_*/figures/*.png")))
