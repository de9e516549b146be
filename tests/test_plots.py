"""The MLflow charts: real PNGs, with the lines and bars their data asks for."""

from __future__ import annotations

import sys

import pytest

from pipeline.core import plots

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    """The figures a test inspects stay open in pyplot until closed."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _curve(losses: list[float], val_at: dict[int, float] | None = None) -> list[dict]:
    rows = [{"step": i, "loss": v} for i, v in enumerate(losses)]
    for step, v in (val_at or {}).items():
        rows[step]["val_loss"] = v
    return rows


def test_one_history_keeps_the_train_and_val_labels(tmp_path):
    history = _curve([3.0, 2.5, 2.0, 1.8], {1: 2.7, 3: 2.1})
    fig = plots.loss_curve_figure(history)
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"train loss", "val loss"}
    assert list(lines["train loss"].get_ydata()) == [3.0, 2.5, 2.0, 1.8]
    assert list(lines["val loss"].get_xdata()) == [1, 3]
    assert ax.get_xlabel() == "step" and "nats" in ax.get_ylabel()
    png = plots.loss_curve_png(history, tmp_path / "loss.png")
    assert png == tmp_path / "loss.png" and png.read_bytes()[:8] == PNG_MAGIC


def test_named_histories_draw_one_line_per_method_and_their_val_points(tmp_path):
    histories = {
        "adamw": _curve([3.0, 2.0, 1.5], {2: 1.7}),
        "sam": _curve([3.0, 2.2, 1.6], {2: 1.6}),
        "swa": _curve([3.0, 2.1, 1.7]),  # no val point recorded: no val line
    }
    fig = plots.loss_curve_figure(histories, "fine-tuning loss", "held-out loss")
    (ax,) = fig.axes
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {
        "adamw train loss",
        "adamw held-out loss",
        "sam train loss",
        "sam held-out loss",
        "swa train loss",
    }
    for method in ("adamw", "sam"):  # a method's val point is drawn in its line's colour
        assert (
            lines[f"{method} held-out loss"].get_color()
            == lines[f"{method} train loss"].get_color()
        )
    assert lines["adamw train loss"].get_color() != lines["sam train loss"].get_color()
    assert list(lines["sam held-out loss"].get_ydata()) == [1.6]
    assert ax.get_title() == "fine-tuning loss"
    png = plots.loss_curve_png(histories, tmp_path / "sub" / "ft.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_bar_chart_has_a_panel_per_metric_and_a_bar_per_method(tmp_path):
    results = {
        "adamw": {"loss": 1.0, "sharpness": 0.4},
        "sam": {"loss": 0.9, "sharpness": 0.1},
        "swa": {"loss": 1.1, "sharpness": 0.3},
    }
    fig = plots.bar_chart_figure(results)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "sharpness"]
    assert [p.get_height() for p in fig.axes[1].patches] == [0.4, 0.1, 0.3]
    # a single metric is one panel (not a bare Axes that cannot be iterated)
    (single,) = plots.bar_chart_figure({m: {"loss": r["loss"]} for m, r in results.items()}).axes
    assert len(single.patches) == 3
    png = plots.bar_chart_png(results, tmp_path / "bars.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_loss_by_position_is_one_labelled_curve_over_the_window(tmp_path):
    losses = [4.0, 3.1, 2.6, 2.4, 2.3]
    fig = plots.loss_by_position_figure(losses)
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0, 1, 2, 3, 4]
    assert list(line.get_ydata()) == losses
    assert "position" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    png = plots.loss_by_position_png(losses, tmp_path / "by_position.png")
    assert png == tmp_path / "by_position.png" and png.read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_every_chart_is_none(tmp_path, monkeypatch):
    """The GPU benchmark machine has no matplotlib: no chart, no file, no error."""
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` now raises ImportError
    history = _curve([2.0, 1.0])
    assert plots.loss_curve_png(history, tmp_path / "a.png") is None
    assert plots.loss_curve_png({"adamw": history}, tmp_path / "b.png") is None
    assert plots.bar_chart_png({"adamw": {"loss": 1.0}}, tmp_path / "c.png") is None
    assert plots.loss_by_position_png([2.0, 1.0], tmp_path / "d.png") is None
    assert list(tmp_path.iterdir()) == []
