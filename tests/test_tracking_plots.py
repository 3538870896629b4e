"""Plots people look at instead of logs: smoothed loss curve, validation preview with a class legend."""

from __future__ import annotations

import numpy as np

from stunet_scale import tracking


def test_smooth_is_a_trailing_mean():
    assert tracking.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert tracking.smooth([2.0, 4.0], 10) == [2.0, 3.0]


def test_progress_plot_draws_raw_and_smoothed_loss(tmp_path, monkeypatch):
    drawn = []
    history = [{"kind": "train", "step": s, "loss": 3.0 - 0.01 * s + (s % 2), "ce": 1.0, "lr": 0.01} for s in range(1, 101)]
    history.append({"kind": "val", "step": 100, "mean_dice": 0.5})
    real_subplots = tracking._plt().subplots

    def spy(*a, **k):
        fig, axes = real_subplots(*a, **k)
        drawn.append(axes[0])
        return fig, axes

    monkeypatch.setattr(tracking._plt(), "subplots", spy)
    assert tracking.plot_progress(history, tmp_path / "progress.png").stat().st_size > 0
    labels = [line.get_label() for line in drawn[0].get_lines()]
    assert "loss (Dice + CE)" in labels and any(lab.startswith("loss, mean of 5") for lab in labels)
    smoothed = next(line for line in drawn[0].get_lines() if line.get_label().startswith("loss, mean"))
    assert np.ptp(smoothed.get_ydata()[10:]) < np.ptp([r["loss"] for r in history[10:100]])  # the swing is gone
    # the trainer's records carry the mean over every step since the last log line: that is the smooth curve
    sparse = [{**r, "loss_avg": 3.0 - 0.01 * r["step"], "loss_n": 25} for r in history if r.get("step", 0) % 25 == 0
              and r["kind"] == "train"]
    drawn.clear()
    tracking.plot_progress(sparse, tmp_path / "sparse.png")
    line = next(ln for ln in drawn[0].get_lines() if ln.get_label() == "loss, mean of the last 25 steps")
    assert list(line.get_ydata()) == [r["loss_avg"] for r in sparse]


def test_preview_legend_names_the_classes_on_the_shown_slice(tmp_path, monkeypatch):
    image = np.random.default_rng(0).normal(size=(20, 16, 12)).astype(np.float32)
    label = np.zeros((20, 16, 12), np.uint8)
    label[2:8, 2:8, 7] = 1  # slice 7 holds the most labelled voxels
    label[10:14, 3:6, 7] = 3
    label[0:3, 0:3, 2] = 2  # a class only on another slice: not in the legend
    pred = label.copy()
    pred[15:18, 10:12, 7] = 4  # a false positive is named too
    seen = {}
    real_legend = tracking._plt().Figure.legend

    def spy(fig, *a, **k):
        seen["labels"] = [h.get_label() for h in k["handles"]]
        return real_legend(fig, *a, **k)

    monkeypatch.setattr(tracking._plt().Figure, "legend", spy)
    names = ["background", "liver", "spleen", "kidney_left", "aorta"]
    out = tracking.plot_preview(image, label, pred, tmp_path / "p.png", "s0001, step 10", names)
    assert out.stat().st_size > 0 and seen["labels"] == ["liver", "kidney_left", "aorta"]
