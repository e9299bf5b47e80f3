"""The plot helpers: each figure carries the data, labels and axes it was given (read back from the
matplotlib objects), and bad labels are refused with the counts."""

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pytest

from jinterp import plots


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


def test_patching_heatmap_labels_positions_with_tokens_and_rows_with_layers():
    values = np.array([[0.1, -0.4, 0.0, 0.2], [0.3, 0.0, 0.9, -0.1]])
    tokens = ["<bos>", " When", "\n", " $5"]
    ax = plots.patching_heatmap(values, tokens=tokens, layers=[3, 7], title="resid_pre")
    assert tick_labels(ax.xaxis) == ["<bos>", " When", "\\n", r" \$5"]  # newline and mathtext shown literally
    assert tick_labels(ax.yaxis) == ["3", "7"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("position", "layer", "resid_pre")
    image = ax.images[0]
    np.testing.assert_array_equal(image.get_array(), values)
    assert image.get_clim() == (-0.9, 0.9) and image.cmap.name == "RdBu"  # centred on 0
    assert image.colorbar is not None
    with pytest.raises(ValueError, match="tokens has 3 entries for 4 rows or columns"):
        plots.patching_heatmap(values, tokens=tokens[:3])


def test_head_heatmap_annotates_each_finite_cell():
    values = np.array([[0.5, np.nan, 0.25], [1.0, 0.0, 0.75]])
    ax = plots.head_heatmap(values, centred=False, annotate=True, title="induction score")
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["0.50", "0.25", "1.00", "0.00", "0.75"])  # no text for the NaN cell
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("head", "layer")
    assert tick_labels(ax.xaxis) == ["0", "1", "2"] and tick_labels(ax.yaxis) == ["0", "1"]
    assert ax.images[0].cmap.name == "viridis"


def test_long_axes_label_every_nth_item():
    ax = plots.patching_heatmap(np.zeros((2, 100)), tokens=[f"t{i}" for i in range(100)])
    labels = tick_labels(ax.xaxis)
    assert len(labels) == 34 and labels[:3] == ["t0", "t3", "t6"]  # every third: at most MAX_TICKS shown


def test_head_bars_name_heads_and_colour_the_highlighted():
    values = np.arange(6.0).reshape(2, 3) - 2
    ax = plots.head_bars(values, highlight={(1, 0): "tab:red"}, ylabel="loss increase")
    bars = ax.patches
    assert [b.get_height() for b in bars] == [-2, -1, 0, 1, 2, 3]
    assert tick_labels(ax.xaxis) == ["L0H0", "L0H1", "L0H2", "L1H0", "L1H1", "L1H2"]
    red, grey = matplotlib.colors.to_rgba("tab:red"), matplotlib.colors.to_rgba("tab:grey")
    assert [b.get_facecolor() for b in bars] == [grey, grey, grey, red, grey, grey]
    assert ax.get_ylabel() == "loss increase"
    with pytest.raises(ValueError, match="pass heads= for 1-D values"):
        plots.head_bars(np.ones(3))
    picked = plots.head_bars([0.5, 0.7], heads=[(2, 1), (4, 0)])
    assert tick_labels(picked.xaxis) == ["L2H1", "L4H0"]


def test_grouped_bars_side_by_side_with_a_legend():
    ax = plots.grouped_bars({"learned": [0.9, 0.5], "random": [0.5, 0.4]}, ["a at 2", "b at 3"], ylabel="IIA",
                            colours={"random": "tab:orange"}, ylim=(0, 1.2))
    heights = [b.get_height() for b in ax.patches]
    assert heights == [0.9, 0.5, 0.5, 0.4]
    centres = [b.get_x() + b.get_width() / 2 for b in ax.patches]
    np.testing.assert_allclose(centres, [-0.2, 0.8, 0.2, 1.2])  # float64 geometry, 1e-7 relative: measured 0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["learned", "random"]
    assert tick_labels(ax.xaxis) == ["a at 2", "b at 3"] and ax.get_ylim() == (0, 1.2)


def test_lens_grid_rows_are_layers_then_final_with_top_tokens():
    probability = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.9]])
    top = np.array([["the", "a"], [" Mary", " John"], [" Mary", " Mary"]])
    ax = plots.lens_grid(probability, tokens=["When", " Mary"], cell_text=top, value_label="P(IO)")
    assert tick_labels(ax.yaxis) == ["0", "1", "final"]
    assert tick_labels(ax.xaxis) == ["When", " Mary"]
    assert [t.get_text() for t in ax.texts] == list(top.ravel())
    assert ax.images[0].colorbar.ax.get_ylabel() == "P(IO)"
    with pytest.raises(ValueError, match=r"cell_text has shape \(1, 2\), values \(3, 2\)"):
        plots.lens_grid(probability, cell_text=top[:1])


def test_curves_over_training_with_marks_and_separate_x():
    steps = np.array([0, 10, 20])
    ax = plots.curves({"every step": np.arange(1, 21), "eval": steps},
                      {"every step": np.linspace(3, 1, 20), "eval": [3.0, 2.0, 0.5]},
                      marks={"phase change": 10}, yscale="log", ylabel="loss", title="Loss")
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["eval"].get_xdata(), steps)
    np.testing.assert_array_equal(lines["eval"].get_ydata(), [3.0, 2.0, 0.5])
    assert len(lines["every step"].get_xdata()) == 20
    assert list(lines["phase change"].get_xdata()) == [10, 10]  # the vertical mark
    assert ax.get_yscale() == "log" and (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss", "Loss")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["every step", "eval", "phase change"]
    with pytest.raises(ValueError, match="curve 'eval': 2 values for 3 x values"):
        plots.curves(steps, {"eval": [1.0, 2.0]})


def test_layer_curves_put_layers_on_x():
    ax = plots.layer_curves({"P(IO)": [0.1, 0.2, 0.6], "P(S)": [0.1, 0.3, 0.2]}, ylabel="probability")
    for line in ax.get_lines():
        np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2])
    assert ax.get_xlabel() == "residual stream entering layer"


def test_helpers_draw_into_given_axes():
    fig, axes = plt.subplots(1, 2)
    assert plots.head_heatmap(np.ones((2, 2)), ax=axes[0]) is axes[0]
    assert plots.curves([0, 1], {"a": [1, 2]}, ax=axes[1]) is axes[1]
    assert plt.get_fignums() == [fig.number]  # no stray figure


def test_estimates_over_training_with_error_bars_curves_beside_and_marks():
    steps, mean, std = [0, 100, 200], [1.0, 5.0, 2.0], [0.1, 0.5, 0.2]
    ax = plots.estimates_over_training(steps, mean, std, label="LLC", ylabel="estimated LLC",
                                       beside={"loss": ([0, 50, 100, 150, 200], [4.0, 3.0, 1.0, 0.5, 0.4])},
                                       beside_yscale="log", marks={"phase change": (120, "red"), "never": (None, "k")})
    line = ax.lines[0]
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_array_equal(line.get_ydata(), mean)
    bars = ax.collections[0].get_segments()  # one vertical segment per estimate: mean - std to mean + std
    np.testing.assert_allclose([segment[:, 1] for segment in bars], [[0.9, 1.1], [4.5, 5.5], [1.8, 2.2]])  # 0
    twin = [other for other in ax.figure.axes if other is not ax][0]
    assert twin.get_yscale() == "log" and list(twin.lines[0].get_ydata()) == [4.0, 3.0, 1.0, 0.5, 0.4]
    marks = [line for line in ax.lines if line.get_label() == "phase change"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [120, 120]
    assert not [line for line in ax.lines if line.get_label() == "never"]
    assert ax.get_ylabel() == "estimated LLC"
    plt.close(ax.figure)
