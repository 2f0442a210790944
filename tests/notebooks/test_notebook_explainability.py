"""The tiny run of 07_explainability: every model the tiny profile trained is explained, the box
counts are the data's, and the scores it wrote are proportions."""
import fnmatch
import json

import pandas as pd

NOTEBOOK = "07_explainability"


def _trained(root, params):
    keys = []
    for notebook in params["sources"]:
        for run in sorted((root / notebook / "checkpoints").glob("*")):
            key = f"{notebook}/{run.name}"
            if ((run / "best.pt").is_file() or (run / "last.pt").is_file()) and \
                    not any(fnmatch.fnmatch(key, p) for p in params["exclude_models"]):
                keys.append(key)
    return keys


def test_explainability_covers_every_trained_model(tiny_results):
    root, _ = tiny_results
    params = json.loads((root / NOTEBOOK / "provenance.json").read_text())["params"]
    metrics = json.loads((root / NOTEBOOK / "metrics.json").read_text())
    trained = _trained(root, params)
    assert len(trained) >= 20  # 01-06 train two dozen models in the tiny profile
    assert sorted(metrics["models_explained"]) == sorted(trained)
    assert {"Grad-CAM", "Grad-CAM++", "EigenCAM", "ScoreCAM"} <= set(metrics["methods"])
    models = pd.read_csv(root / NOTEBOOK / "tables/models.csv")
    assert models["target layer"].notna().all()
    assert set(models.loc[models["model"] == "05_glori/glori", "methods"].iloc[0].split(", ")) >= \
        {"ScoreCAM", "GLoRI attention"}


def test_explainability_box_counts_are_the_datas(tiny_results, nih_sample_root):
    from cxrstudy.data import load_dataset
    from cxrstudy.explain import select_items

    root, _ = tiny_results
    params = json.loads((root / NOTEBOOK / "provenance.json").read_text())["params"]
    metrics = json.loads((root / NOTEBOOK / "metrics.json").read_text())
    data = load_dataset("nih-sample", nih_sample_root, split="all", image_size=64)
    items = select_items(data, root, params["sources"], params["box_splits"],
                         params["max_boxed_images"])
    boxes = data.boxes[data.boxes["image_id"].astype(str).isin(items["image_id"])]
    assert metrics["n_boxes"] == len(boxes) == int(items["boxes"].sum()) > 0
    assert metrics["n_boxed_images"] == boxes["image_id"].nunique() <= params["max_boxed_images"]
    assert metrics["n_boxed_images_seen_in_training"] == 0  # box_splits [test]: unseen only
    table = pd.read_csv(root / NOTEBOOK / "tables/localization.csv")
    grad_cam = table[table["method"] == "Grad-CAM"].groupby("model")["boxes"].sum()
    assert (grad_cam == metrics["n_boxes"]).all() and len(grad_cam) == len(metrics["models_explained"])


def test_explainability_scores_are_proportions_and_figures_exist(tiny_results):
    root, _ = tiny_results
    metrics = json.loads((root / NOTEBOOK / "metrics.json").read_text())
    rows = pd.DataFrame(metrics["localization"])
    assert len(rows) and {"model", "method", "class", "hits", "hit rate", "mean IoU"} <= set(rows)
    for column in ("hit rate", "mean IoU", "mean coverage", "mean mass inside", "chance"):
        values = rows[column].dropna()
        assert values.between(0.0, 1.0).all(), column
    cams = rows[rows["method"] == "Grad-CAM"]
    assert (cams["hits"] <= cams["boxes"]).all()
    assert rows.loc[rows["method"] == "MXA ROI box", "hit rate"].isna().all()  # a box has no peak
    by_method = pd.read_csv(root / NOTEBOOK / "tables/localization_by_method.csv")
    assert set(by_method["method"]) == set(metrics["methods"])
    for figure in ("cams_gradcam", "cams_scorecam", "pointing_game", "evidence_mxa",
                   "evidence_glori", "evidence_cls", "evidence_can"):
        assert (root / NOTEBOOK / f"figures/{figure}.png").stat().st_size > 1000, figure
        assert (root / NOTEBOOK / f"figures/{figure}.svg").is_file(), figure
