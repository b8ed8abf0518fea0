"""Plots and prediction grids are valid, non-trivial PNGs; the profiler leaves a trace."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import (GradNormMonitor, JsonlWriter, LearningRateMonitor, MetricsLogger, Plots,
                       PredictionGrid, Profiler, read_jsonl)
from conftest import TinyMLP
from trainer import ArrayLoader, OptimConfig, Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_colors=20):
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
    colors = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, len(colors)  # lines, text and axes, not a blank canvas
    assert pixels[..., :3].std() > 0.02
    return pixels


class ImageMLP(nnx.Module):
    def __init__(self, *, rngs):
        self.dense = nnx.Linear(64, 3, rngs=rngs)

    def __call__(self, images):
        return self.dense(images.reshape(images.shape[0], -1))


def test_plots_and_prediction_grid_are_real_pngs(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((96, 8, 8, 1)).astype(np.float32)
    labels = (images[:, :4].mean(axis=(1, 2, 3)) * 6).astype(np.int32) % 3
    data = {"image": images, "label": labels}
    jsonl = JsonlWriter(tmp_path / "metrics.jsonl")
    plots = Plots()
    grid = PredictionGrid({"image": images[:9], "label": labels[:9]})
    trainer = Trainer(ImageMLP(rngs=nnx.Rngs(0)), OptimConfig(learning_rate=1e-2).build(40), max_steps=40,
                      workdir=tmp_path, callbacks=[MetricsLogger([jsonl], log_every=5), GradNormMonitor(every=5),
                                                   LearningRateMonitor(), plots, grid])
    trainer.fit(ArrayLoader(data, 16), eval_data=ArrayLoader(data, 32, shuffle=False))
    names = sorted(p.name for p in plots.written)
    assert names == ["curves.png", "grad_norm.png", "learning_rate.png"]
    for path in plots.written:
        check_png(path)
    pixels = check_png(tmp_path / "plots" / "predictions.png")
    np.testing.assert_array_equal(grid.predicted, np.asarray(trainer.model(images[:9])).argmax(1))
    wrong = (grid.predicted != labels[:9]).sum()
    red = ((pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)).sum()
    assert (red > 0) == (wrong > 0)  # wrong predictions are titled in red
    logged = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "images" in r]
    assert {k for r in logged for k in r["images"]} == {"plots/curves", "plots/grad_norm", "plots/learning_rate",
                                                       "plots/predictions"}



def test_plots_listed_before_the_logger_draw_its_last_windows(tmp_path, data):
    """``Plots`` reads the logger's windows at the fit's end; listed before the logger, whose own
    ``on_fit_end`` writes the last of them, it still draws every one (the last partial), each logged once."""
    from callbacks.plots import collect_series

    class SeenPlots(Plots):
        def on_fit_end(self, trainer):
            self.seen = [step for step, _ in collect_series(trainer)[0]["loss"]]
            super().on_fit_end(trainer)

    plots = SeenPlots()
    logger = MetricsLogger([JsonlWriter(tmp_path / "metrics.jsonl")], log_every=4)
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=14, workdir=tmp_path,
            callbacks=[plots, logger]).fit(ArrayLoader(data, 16))
    assert plots.seen == [4, 8, 12, 14]
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "scalars" in r] == [4, 8, 12, 14]

def test_prediction_grid_refuses_what_it_cannot_draw_at_once_and_reads_one_hot_labels():
    images = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"must be \[N, H, W\] or \[N, H, W, C\].*got shape \(4, 64\)"):
        PredictionGrid({"image": images.reshape(4, 64), "label": np.zeros(4, np.int32)})
    with pytest.raises(ValueError, match="one label per example"):
        PredictionGrid({"image": images, "label": np.zeros(3, np.int32)})
    grid = PredictionGrid({"image": images, "label": np.eye(3, dtype=np.float32)[[0, 2, 1, 2]]})
    np.testing.assert_array_equal(grid.labels, [0, 2, 1, 2])


def test_prediction_grid_refuses_examples_or_names_that_do_not_fit_the_model_before_training(tmp_path):
    rng = np.random.default_rng(0)
    data = {"image": rng.random((32, 8, 8, 1)).astype(np.float32), "label": np.zeros(32, np.int32)}
    cases = {  # ImageMLP takes 8x8x1 images and predicts 3 classes
        r"PredictionGrid's examples: the model cannot take inputs of shapes \(4, 6, 6, 1\)":
            PredictionGrid({"image": np.zeros((4, 6, 6, 1), np.float32), "label": np.zeros(4, np.int32)}),
        "class_names has 2 names, but the model predicts 3 classes":
            PredictionGrid({"image": data["image"][:4], "label": np.zeros(4, np.int32)}, class_names=["a", "b"]),
        "labels go up to 5, but the model predicts 3 classes":
            PredictionGrid({"image": data["image"][:4], "label": np.array([0, 1, 2, 5], np.int32)}),
    }
    for message, grid in cases.items():
        trainer = Trainer(ImageMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=2, workdir=tmp_path, callbacks=[grid])
        with pytest.raises(ValueError, match=message):
            trainer.fit(ArrayLoader(data, 16))
        assert trainer.step == 0 and not (tmp_path / "plots").exists()
    grid = PredictionGrid({"image": data["image"][:4], "label": np.zeros(4, np.int32)}, class_names=["a", "b", "c"])
    Trainer(ImageMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=2, workdir=tmp_path, callbacks=[grid]).fit(
        ArrayLoader(data, 16))
    assert grid.written == tmp_path / "plots" / "predictions.png" and grid.written.is_file()


def test_plots_need_a_folder(data):
    with pytest.raises(ValueError, match="Plots needs a folder"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1, callbacks=[Plots()]).fit(ArrayLoader(data, 32))


@pytest.mark.parametrize("k, traced", [(1, (2, 3)), (4, (1, 4)), (8, (1, 8))])
def test_profiler_writes_a_trace_of_the_chosen_steps(tmp_path, k, traced):
    """With chunks of K, the trace holds the chunk(s) with steps 2-3 (no chunk starts inside them)."""
    from conftest import make_data

    profiler = Profiler(start_step=2, num_steps=2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, workdir=tmp_path, callbacks=[profiler],
                      steps_per_execution=k)
    trainer.fit(ArrayLoader(make_data(n=128), 16))
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000
    assert profiler.traced == traced
