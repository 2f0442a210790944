"""What a reader sees of the figures and tables: each figure's caption (saved beside it) under it
in the report, wide figures at full width, tables that scroll instead of widening the page, the
per-run training histories folded away, the profile's note once, learning rates and tiny numbers
in e-notation, and MXA's ROI boxes under names a reader can place."""
import re
import struct
import zlib
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cxrstudy import plots  # noqa: E402
from cxrstudy.display import format_number, format_numbers, is_learning_rate, scientific  # noqa: E402
from cxrstudy.outputs import Outputs  # noqa: E402
from cxrstudy.report.collect import collect  # noqa: E402
from cxrstudy.report.index import is_wide, png_size, readable_stem, render_index  # noqa: E402
from cxrstudy.report.tables import ReportTable  # noqa: E402
from cxrstudy.report.writers import latex_table, markdown_report_table  # noqa: E402

NOTE = "Tiny profile: a machinery test; the numbers say nothing."


def _figure(width_in: float = 4, height_in: float = 3):
    fig, ax = plt.subplots(figsize=(width_in, height_in))
    ax.plot([0, 1], [0, 1])
    return fig


def _page(profile_dir, tables=(), note=""):
    results = collect(profile_dir, [])
    page = profile_dir / "index.html"
    return render_index("tiny", page, list(tables), {}, results, note=note)


def _figcaptions(html: str) -> list[str]:
    return re.findall(r"<figcaption>(.*?)(?: \(<a [^>]*>svg</a>\))?</figcaption>", html)


# --- figure captions ---------------------------------------------------------------------------

def test_a_saved_caption_is_kept_beside_the_figure_and_shown_under_it(tmp_path):
    out = Outputs(tmp_path / "tiny/01_baseline")
    png = out.save_figure(_figure(), "per_class_auc",
                          caption="Per-class test AUC of every model; error bars: 95% CI")
    assert (out.figures / "per_class_auc.txt").read_text() == (
        "Per-class test AUC of every model; error bars: 95% CI\n")
    assert Outputs.figure_caption(png) == "Per-class test AUC of every model; error bars: 95% CI"
    html = _page(tmp_path / "tiny")
    assert _figcaptions(html) == ["Per-class test AUC of every model; error bars: 95% CI"]
    assert 'alt="01_baseline: Per-class test AUC of every model; error bars: 95% CI"' in html


def test_a_figure_without_caption_shows_its_name_as_words_and_loses_an_old_caption(tmp_path):
    out = Outputs(tmp_path / "tiny/01_baseline")
    out.save_figure(_figure(), "per_class_auc", caption="an older figure of this name")
    out.save_figure(_figure(), "per_class_auc")  # saved again, without caption
    assert not (out.figures / "per_class_auc.txt").exists()
    assert Outputs.figure_caption(out.figures / "per_class_auc.png") is None
    assert _figcaptions(_page(tmp_path / "tiny")) == ["per class auc"]
    assert readable_stem("roc__curves_ 2") == "roc curves 2"


def test_a_synthetic_run_keeps_the_warning_in_the_caption_file(tmp_path):
    out = Outputs(tmp_path / "tiny/00_data_exploration", synthetic=True)
    png = out.save_figure(_figure(), "cohort", caption="The cohort")
    assert Outputs.figure_caption(png) == "The cohort — SYNTHETIC DATA (procedural phantom, not radiographs)"


def test_the_roc_figure_is_saved_as_drawn(tmp_path):
    """A caption goes to the report, not onto a real-data figure: the ROC panels keep their axis
    names and the AUC in each legend, and nothing is added to the figure."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 2))
    scores = {"a": np.clip(y + rng.normal(0, 0.6, y.shape), 0, 1), "b": rng.random(y.shape)}
    fig = plots.roc_curves(y, scores, ["Atelectasis", "Effusion"])
    texts_before = len(fig.texts)
    out = Outputs(tmp_path / "tiny/01_baseline")
    out.save_figure(fig, "roc_curves", caption="Per-class ROC curves on the test split")
    assert len(fig.texts) == texts_before
    axes = [ax for ax in fig.axes if ax.get_legend() is not None]
    assert len(axes) == 2 and all(ax.get_legend().get_title().get_text() == "AUC" for ax in axes)
    assert all(re.fullmatch(r"[ab] \(\d\.\d\d\)", t.get_text())
               for ax in axes for t in ax.get_legend().get_texts())
    assert any(ax.get_xlabel() for ax in fig.axes) and any(ax.get_ylabel() for ax in fig.axes)


# --- wide figures, tables that scroll ----------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_png_size_comes_from_the_header(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_header(1668, 347))
    (tmp_path / "b.png").write_bytes(b"not a png at all, but long enough to be read")
    assert png_size(tmp_path / "a.png") == (1668, 347)
    assert png_size(tmp_path / "b.png") is None
    assert png_size(tmp_path / "missing.png") is None


@pytest.mark.parametrize("size, wide", [
    ((1668, 347), True),    # the cohort's four panels in a row
    ((1100, 300), True),
    ((1099, 300), False),
    ((812, 1465), True),    # a grid of many panels
    ((1001, 917), True),    # a 14 × 14 heatmap: its numbers need the room
    ((705, 719), False),    # a forest plot: reads well at half the page
    ((475, 7441), False),   # a narrow strip stays narrow (full width would make it huge)
    (None, False),
])
def test_which_figures_take_the_full_width(size, wide):
    assert is_wide(size) is wide


def test_a_wide_figure_gets_the_wide_class_and_a_small_one_does_not(tmp_path):
    out = Outputs(tmp_path / "tiny/00_data_exploration")
    out.save_figure(_figure(14, 3), "cohort", caption="wide")      # 14 in × 120 dpi ≈ 1680 px
    out.save_figure(_figure(4, 3), "prevalence", caption="small")  # ≈ 480 px
    assert png_size(out.figures / "cohort.png")[0] > 1100
    html = _page(tmp_path / "tiny")
    figures = dict((cap, cls) for cls, cap in re.findall(
        r'<figure( class="wide")?>.*?<figcaption>(.*?)(?: \(<a|</figcaption>)', html))
    assert figures == {"wide": ' class="wide"', "small": ""}
    assert "figure.wide{" in html


def test_every_table_scrolls_in_its_own_box(tmp_path):
    out = Outputs(tmp_path / "tiny/01_baseline")
    out.save_table(pd.DataFrame({f"column {k}": [0.5] for k in range(30)}), "wide", caption="A wide table")
    html = _page(tmp_path / "tiny")
    assert html.count("<table>") >= 2  # the runs table and ours
    assert html.count('<div class="table-wrap"><table') == html.count("<table")
    assert ".table-wrap{overflow-x:auto" in html
    # a long caption keeps a readable width even over a narrow table; a short one does not
    assert html.count('<table class="long-caption">') == 0
    out.save_table(pd.DataFrame({"a": [1]}), "narrow", caption="word " * 60)
    assert _page(tmp_path / "tiny").count('<table class="long-caption"><caption>word word') == 1


# --- training histories folded -----------------------------------------------------------------

def test_the_training_histories_of_a_notebook_are_one_collapsed_block(tmp_path):
    out = Outputs(tmp_path / "tiny/03_knowledge_distillation")
    history = pd.DataFrame({"epoch": [1, 2], "train_loss": [0.7, 0.6], "lr": [1e-4, 5e-5]})
    for arm in ("baseline", "kd", "mxa"):
        out.save_table(history, f"history_{arm}", caption=f"Training history of {arm}")
    out.save_table(pd.DataFrame({"arm": ["kd"], "micro AUC": [0.61]}), "ablation", caption="Ablation")
    html = _page(tmp_path / "tiny")
    blocks = re.findall(r'<details class="histories">(.*?)</details>', html, re.S)
    assert len(blocks) == 1
    assert "<summary>Training histories (3 runs)</summary>" in blocks[0]
    for arm in ("baseline", "kd", "mxa"):
        assert f"<h3>history_{arm}</h3>" in blocks[0] and html.count(f"<h3>history_{arm}</h3>") == 1
    assert "<h3>ablation</h3>" in html and "<h3>ablation</h3>" not in blocks[0]
    assert "<td>1e-04</td>" in blocks[0] and "<td>5e-05</td>" in blocks[0]  # lr column


def test_one_history_says_one_run(tmp_path):
    out = Outputs(tmp_path / "tiny/01_baseline")
    out.save_table(pd.DataFrame({"epoch": [1], "lr": [1e-3]}), "history_densenet121")
    assert "<summary>Training histories (1 run)</summary>" in _page(tmp_path / "tiny")


# --- the profile's note once -------------------------------------------------------------------

def test_the_profile_note_is_shown_once_at_the_top_and_kept_in_the_table_files(tmp_path):
    Outputs(tmp_path / "tiny/01_baseline").save_metrics(models={})
    table = ReportTable("mxa", "MXA: a paper", "Ours against the paper.",
                        pd.DataFrame({"arm": ["mxa"], "macro AUC": [0.6]}), note=NOTE)
    other = ReportTable("baselines", "Baselines (01)", "Baselines.",
                        pd.DataFrame({"arm": ["a"], "macro AUC": [0.5]}), note=NOTE)
    html = _page(tmp_path / "tiny", [table, other], note=NOTE)
    assert html.count("machinery test") == 1
    assert html.index("machinery test") < html.index('<h2 id="runs">')
    assert "<caption>Ours against the paper.</caption>" in html
    # a table's own files are read without the page: there the note follows the table, once
    md = markdown_report_table(table)
    assert md.count("machinery test") == 1
    assert md.split("\n|", 1)[0] == "**MXA: a paper**\n\nOurs against the paper.\n"
    assert md.rstrip().endswith(NOTE)
    assert latex_table(table).count("machinery test") == 1
    assert "machinery test" not in markdown_report_table(table, note=False)
    assert table.full_caption == "Ours against the paper. " + NOTE


# --- numbers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, name, shown", [
    (0.65, "", "0.650"),
    (0.6504, "macro AUC", "0.650"),
    (12.0, "params (M)", "12.000"),
    (1e-4, "lr", "1e-04"),
    (5e-4, "min_lr", "5e-04"),
    (6.792031080967287e-05, "lr", "6.79e-05"),
    (0.001, "learning rate", "1e-03"),
    (0.003, "peak lr", "3e-03"),
    (2e-5, "head_lr", "2e-05"),
    (0.00004, "", "4e-05"),     # would read 0.000
    (-0.00004, "delta", "-4e-05"),
    (0.0004, "", "4e-04"),      # below half of 10^-3: would read 0.000
    (0.0006, "", "0.001"),      # rounds to 0.001: kept in decimals
    (0.0, "", "0.000"),
    (0.0, "lr", "0.000"),
    (np.float32(0.25), "", "0.250"),
    (float("nan"), "lr", ""),
    (None, "", ""),
    (3, "epoch", "3"),          # integers and text as they are
    ("kd", "arm", "kd"),
])
def test_format_number(value, name, shown):
    assert format_number(value, 3, name) == shown


def test_format_number_follows_the_digits():
    assert format_number(0.004, 2) == "4e-03"
    assert format_number(0.004, 3) == "0.004"
    assert format_number(0.65432, 1) == "0.7"
    assert scientific(1.23456e-7, 3) == "1.23e-07" and scientific(1e-6, 6) == "1e-06"


def test_learning_rate_names():
    assert all(is_learning_rate(n) for n in ("lr", "min_lr", "LR", "learning rate (peak)", "head lr"))
    assert not any(is_learning_rate(n) for n in ("val_loss", "clr_weight", "lrp", "macro AUC", ""))


def test_save_table_markdown_shows_learning_rates_in_e_notation(tmp_path):
    out = Outputs(tmp_path / "run")
    frame = pd.DataFrame({"epoch": [1, 2], "val_macro_auc": [0.6, 0.65432],
                          "lr": [6.792031080967287e-05, 1e-4]})
    csv = out.save_table(frame, "history_a", caption="History")
    md = (out.tables / "history_a.md").read_text()
    assert "| 1 | 0.600 | 6.79e-05 |" in md and "| 2 | 0.654 | 1e-04 |" in md
    assert pd.read_csv(csv)["lr"].tolist() == [6.792031080967287e-05, 1e-4]  # CSV: full precision
    shown = format_numbers(frame)
    assert shown["lr"].tolist() == ["6.79e-05", "1e-04"] and shown["epoch"].tolist() == [1, 2]


def test_a_notebook_table_shows_each_ci_in_one_cell_as_its_markdown_does(tmp_path):
    out = Outputs(tmp_path / "tiny/01_baseline")
    out.save_table(pd.DataFrame({"class": ["Mass"], "a AUC": [0.6504], "a low": [0.5], "a high": [0.7],
                                 "p": [0.00002]}), "per_class_auc", caption="Per class")
    html = _page(tmp_path / "tiny")
    assert "<th>a AUC (95% CI)</th><th>p</th>" in html and "<th>a low</th>" not in html
    assert "<td>Mass</td><td>0.650 (0.500–0.700)</td><td>2e-05</td>" in html
    assert "| Mass | 0.650 (0.500–0.700) | 2e-05 |" in (out.tables / "per_class_auc.md").read_text()


def test_report_tables_and_parameters_show_learning_rates_in_e_notation(tmp_path):
    out = Outputs(tmp_path / "tiny/02_mxa")
    out.save_metrics(models={})
    from cxrstudy.files import write_json_atomic

    write_json_atomic(out.provenance_file, {"status": "ok", "params": {
        "lr": 1e-4, "min_lr": 1e-6, "weight_decay": 0.025, "epochs": 1, "output_dir": "x"}})
    table = ReportTable("t", "T", "cap", pd.DataFrame({"arm": ["a"], "lr": [5e-4], "paper lr": [1e-3],
                                                        "macro AUC": [0.00002]}))
    html = _page(tmp_path / "tiny", [table])
    assert "lr=1e-04" in html and "min_lr=1e-06" in html and "weight_decay=0.025" in html
    assert "epochs=1" in html and "output_dir" not in html
    assert "<td>5e-04</td><td>1e-03</td><td>2e-05</td>" in html


# --- MXA's ROI figure --------------------------------------------------------------------------

class _BoxedImages:
    """Just what roi_figure reads of a dataset: items, their metadata, records and boxes."""

    def __init__(self, n: int = 3, size: int = 64):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, size, size, generator=generator)
        self.records = pd.DataFrame({"image_id": [f"img{k}.png" for k in range(n)]})
        self.boxes = pd.DataFrame({"image_id": ["img1.png"], "label": ["Mass"]})

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}

    def meta(self, i):
        boxes = [{"label": "Mass", "x": 10, "y": 10, "w": 20, "h": 20}] if i == 1 else []
        return {"image_id": f"img{i}.png", "boxes": boxes}


def test_the_roi_figure_names_the_mxa_blocks_for_a_reader():
    from cxrstudy.models import create_model
    from cxrstudy.methods.mxa.study import roi_figure

    torch.manual_seed(0)
    model = create_model("efficientvit_m0_mxa", 3, image_size=64)
    fig = roi_figure(model, _BoxedImages(), 2)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["MXA, stage 1 block 1", "MXA, stage 3 block 3"]  # first and last of M0's 6
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["img1.png", "img0.png"]  # the annotated image first
    plt.close(fig)


def test_evidence_legend_names_the_model_and_the_box():
    from cxrstudy.explain.study import evidence_panels

    boxes = np.zeros((2, 4))
    result = SimpleNamespace(
        evidence={"02_mxa/mxa": {"kind": "mxa", "label": "MXA ROI box", "boxes": boxes, "maps": None}},
        maps={"Grad-CAM": {"02_mxa/mxa": np.zeros((2, 8, 8))}})
    maps, predicted = evidence_panels(result, "mxa")
    assert list(predicted) == ["02_mxa/mxa: predicted ROI box"]
    assert list(maps) == ["02_mxa/mxa\nGrad-CAM"]


def test_an_arm_two_notebooks_share_gets_one_column_each_in_the_per_class_table(tmp_path):
    """02 and 03 both train a "baseline": the per-class table names each by its notebook
    instead of pandas' ``_x``/``_y`` suffixes."""
    from cxrstudy.report.tables import per_class_table

    classes = ["Atelectasis", "Effusion"]
    for name, aucs in (("02_mxa", [0.6, 0.7]), ("03_knowledge_distillation", [0.5, 0.8])):
        out = Outputs(tmp_path / "tiny" / name)
        out.save_metrics(dataset="nih-sample", image_size=64, backbone="efficientvit_m0", models={
            "baseline": {"per_class_auc": dict(zip(classes, aucs))},
            "only_" + name[:2]: {"per_class_auc": dict(zip(classes, aucs))}})
    paper = {"citation": "A paper", "short": "A", "notebooks": ["02_mxa", "03_knowledge_distillation"],
             "setting": {"dataset": "CheXpert", "dataset_id": "chexpert", "model": "M5"},
             "numbers": [{"metric": "per-class AUC", "setting": "s", "value": {"Effusion": 0.9},
                          "source": {"where": "table 2"}}]}
    table = per_class_table("mxa", paper, collect(tmp_path / "tiny", []))
    assert list(table.display().columns) == [
        "class", "baseline (02) AUC (95% CI)", "only_02 AUC (95% CI)", "baseline (03) AUC (95% CI)",
        "only_03 AUC (95% CI)", "paper per-class AUC"]
    row = table.frame.set_index("class").loc["Effusion"]
    assert (row["baseline (02) AUC"], row["baseline (03) AUC"], row["paper per-class AUC"]) == (0.7, 0.8, 0.9)
