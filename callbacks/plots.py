"""``Plots``: PNG figures of the run at the end of ``fit`` (curves, learning rate, gradient norm).

The series come from the ``MetricsLogger`` in the same run (every window it wrote), else from the
trainer's per-epoch ``history``. The images also go to the logger's writers (``write_images``),
so they show in TensorBoard's image tab.

Example::

    Trainer(model, tx, max_epochs=5, workdir="runs/x",
            callbacks=[MetricsLogger([...]), GradNormMonitor(), LearningRateMonitor(), Plots()])
    # -> runs/x/plots/curves.png, learning_rate.png, grad_norm.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from callbacks.figures import figure_to_array, new_figure, save_png
from callbacks.metrics_logger import MetricsLogger
from trainer.events import Callback
from trainer.loop import PARTIAL_EPOCH


def find_logger(trainer: Any) -> MetricsLogger | None:
    """The first ``MetricsLogger`` among the trainer's callbacks."""
    return next((cb for cb in trainer.callbacks.callbacks if isinstance(cb, MetricsLogger)), None)


class FitEndOutput(Callback):
    """A callback that draws or writes something at the end of ``fit``: where that ``fit`` trained no
    step since a checkpoint's restore (a finished run resumed), the run's outputs stand and nothing is
    drawn or logged again (``nothing_new``)."""

    _restored_at: int | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self._restored_at = None  # a restore of an earlier fit that raised counts no more

    def on_checkpoint_restore(self, trainer: Any, checkpoint: dict) -> None:
        self._restored_at = trainer.step

    def nothing_new(self, trainer: Any) -> bool:
        """At ``on_fit_end``: whether no step ran since a restore in this ``fit`` (and forget the restore)."""
        restored, self._restored_at = self._restored_at, None
        return restored == trainer.step


def collect_series(trainer: Any) -> tuple[dict[str, list[tuple[float, float]]], str]:
    """``{metric: [(x, value), ...]}`` and the x axis' name (``step`` or ``epoch``)."""
    series: dict[str, list[tuple[float, float]]] = {}
    logger = find_logger(trainer)
    if logger is not None:
        logger.write_to_end(trainer)  # listed after this callback, it has not written its last windows yet
    if logger is not None and logger.history:
        for step, scalars in logger.history:
            for name, value in scalars.items():
                series.setdefault(name, []).append((step, value))
        return series, "step"
    for logs in trainer.history:
        for name, value in logs.items():
            if name not in ("epoch", PARTIAL_EPOCH):
                series.setdefault(name, []).append((logs["epoch"] + 1, value))
    return series, "epoch"


def _panel(axes, series, names, xlabel, title):
    for name in names:
        xs, ys = zip(*series[name])
        color = "C1" if "/" in name else "C0"  # train in blue, eval/... in orange, in every panel
        axes.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name, color=color)
    axes.set_xlabel(xlabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()


class Plots(FitEndOutput):
    """Writes ``curves.png`` (loss and accuracy, train and eval), ``learning_rate.png`` and
    ``grad_norm.png`` (when those metrics were logged) into ``directory`` (default
    ``<workdir>/plots``); ``written`` lists the files of the last run.
    """

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.written: list[Path] = []

    def on_fit_start(self, trainer: Any) -> None:
        super().on_fit_start(trainer)
        if self.directory is None and trainer.workdir is None:
            raise ValueError("Plots needs a folder: pass directory= or give the Trainer a workdir.")

    def on_fit_end(self, trainer: Any) -> None:
        if self.nothing_new(trainer):
            return
        folder = Path(self.directory) if self.directory else Path(trainer.workdir) / "plots"
        series, xlabel = collect_series(trainer)
        images = {}
        groups = [[n for n in series if n.endswith(metric) and n.count("/") <= 1] for metric in ("loss", "accuracy")]
        groups = [g for g in groups if g]
        if groups:
            figure = new_figure(6.0 * len(groups), 4.0)
            for i, names in enumerate(groups):
                _panel(figure.add_subplot(1, len(groups), i + 1), series, sorted(names), xlabel,
                       names[0].rsplit("/", 1)[-1])
            figure.tight_layout()
            images["curves"] = figure_to_array(figure)
        for name in ("learning_rate", "grad_norm"):
            if name in series:
                figure = new_figure()
                _panel(figure.add_subplot(1, 1, 1), series, [name], xlabel, name.replace("_", " "))
                figure.tight_layout()
                images[name] = figure_to_array(figure)
        self.written = [save_png(folder / f"{name}.png", image) for name, image in images.items()]
        logger = find_logger(trainer)
        if logger is not None and images:
            logger.write_images(trainer.step, {f"plots/{k}": v for k, v in images.items()})
