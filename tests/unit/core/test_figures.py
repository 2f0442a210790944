"""Figures a reader can read: ROC panels with axis names and AUCs, map grids instead of strips."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle

from cxrstudy import plots


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_roc_panels_name_their_axes_and_give_each_models_auc():
    truth = np.array([[0, 1], [0, 1], [1, 0], [1, 0]])
    scores = {"a": np.array([[0.1, 0.9], [0.2, 0.8], [0.9, 0.1], [0.8, 0.2]]),  # perfect
              "b": np.array([[0.9, 0.5], [0.2, 0.5], [0.1, 0.5], [0.8, 0.5]])}
    # b on Mass: positives 0.1, 0.8 vs negatives 0.9, 0.2 → 1 of 4 pairs ordered = 0.25;
    # on Nodule its scores are constant → 0.5
    fig = plots.roc_curves(truth, scores, ["Mass", "Nodule"])
    first, second = fig.axes[:2]
    assert [t.get_text() for t in first.get_legend().get_texts()] == ["a (1.00)", "b (0.25)"]
    assert [t.get_text() for t in second.get_legend().get_texts()] == ["a (1.00)", "b (0.50)"]
    assert first.get_xlabel() == "false positive rate" and first.get_ylabel() == "true positive rate"
    assert second.get_ylabel() == ""  # only the first column names the y axis


def test_many_maps_make_a_grid_not_a_strip():
    image = np.zeros((16, 16), dtype=np.uint8)
    maps = {f"model {i}": np.random.default_rng(i).random((1, 16, 16)) for i in range(13)}
    fig = plots.map_overlays([image], maps, ["img"])
    width, height = fig.get_size_inches()
    assert len(fig.axes) == 18  # 14 panels on a 6 × 3 grid
    assert height < width  # 3 rows of 6, not 14 rows of 1
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["img", "model 0", "model 1"] and titles[13] == "model 12"


def test_each_image_starts_its_own_row_block():
    images = [np.zeros((8, 8), dtype=np.uint8), np.full((8, 8), 255, dtype=np.uint8)]
    maps = {"cam": np.zeros((2, 8, 8))}
    fig = plots.map_overlays(images, maps, ["first", "second"])
    assert [ax.get_title() for ax in fig.axes] == ["first", "cam", "second", "cam"]


def test_predicted_boxes_are_drawn_on_the_plain_images():
    images = [np.zeros((10, 10), dtype=np.uint8)] * 2
    maps = {f"m{i}": np.zeros((2, 10, 10)) for i in range(7)}  # 8 panels: 2 grid rows per image
    predicted = {"ROI": np.array([[0.0, 0.0, 0.5, 0.5], [np.nan] * 4])}
    fig = plots.maps_with_predicted_boxes(images, maps, ["a", "b"], predicted=predicted)
    with_box = [ax.get_title() for ax in fig.axes
                if any(isinstance(p, Rectangle) and p.get_linestyle() == "--" for p in ax.patches)]
    assert with_box == ["a"]  # the second image's box is NaN: skipped
