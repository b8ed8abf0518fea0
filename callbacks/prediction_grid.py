"""``PredictionGrid``: a grid of input images titled with predicted and true labels, wrong ones in red.

The training guide's "visualise predictions" as a PNG in the workdir at the end of ``fit``, also
sent to the logger's writers (TensorBoard's image tab).

Example::

    Trainer(model, tx, max_epochs=5, workdir="runs/x",
            callbacks=[PredictionGrid({"image": test_x[:25], "label": test_y[:25]})])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from callbacks.figures import figure_to_array, new_figure, save_png
from callbacks.plots import FitEndOutput, find_logger
from trainer.inference import prediction_shape
from trainer.losses import batch_inputs, batch_labels


class PredictionGrid(FitEndOutput):
    """Draws ``examples`` (a batch: dict or ``(images, labels)``) with the model's predictions.

    Args:
      examples: images ``[N, H, W]`` or ``[N, H, W, C]`` (C of 1, 3 or 4) with integer or one-hot
        labels; up to 36 are drawn. Anything else is refused here, and examples the model cannot
        take (or too few ``class_names``) at the start of ``fit``, not after training.
      class_names: names for the label ids (default: the ids), one per class the model predicts.
      path: the PNG (default ``<workdir>/plots/predictions.png``).
    """

    def __init__(self, examples: Mapping[str, Any] | Sequence[Any], class_names: Sequence[str] | None = None,
                 path: str | None = None):
        self.images = np.asarray(batch_inputs(examples))[:36]
        self.labels = np.asarray(batch_labels(examples))[:36]
        if len(self.images) == 0:
            raise ValueError("PredictionGrid got no examples.")
        shape = self.images.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3, 4))):
            raise ValueError(f"PredictionGrid draws images: its examples' inputs must be [N, H, W] or [N, H, W, C] "
                             f"with C of 1, 3 or 4; got shape {shape}. For other inputs, read trainer.predict(...) "
                             "in a callback of your own.")
        if self.labels.ndim == 2:  # one-hot (or soft) labels: the class with the largest value
            self.labels = self.labels.argmax(axis=-1)
        if self.labels.shape != shape[:1]:
            raise ValueError(f"PredictionGrid needs one label per example ({shape[0]}); got labels of shape "
                             f"{self.labels.shape}.")
        self.class_names = class_names
        self.path = path
        self.predicted: np.ndarray | None = None
        self.written: Path | None = None

    def on_fit_start(self, trainer: Any) -> None:
        """Refuses, before training, what would fail when drawing at its end: no file, examples the
        model cannot take or whose predictions are not class scores, labels or names too few for them."""
        super().on_fit_start(trainer)
        if self.path is None and trainer.workdir is None:
            raise ValueError("PredictionGrid needs a file: pass path= or give the Trainer a workdir.")
        try:
            out = prediction_shape(trainer, self.images)
        except ValueError as err:
            raise ValueError(f"PredictionGrid's examples: {err}") from err
        shape = getattr(out, "shape", None)
        if shape is None or len(shape) != 2 or shape[0] != len(self.images):
            raise ValueError(f"PredictionGrid reads class scores [N, classes] from trainer.predict; for its examples "
                             f"the model gives {out}. Override Trainer.predict_step to return them.")
        classes = shape[1]
        if self.labels.max() >= classes:
            raise ValueError(f"PredictionGrid's labels go up to {self.labels.max()}, but the model predicts "
                             f"{classes} classes.")
        if self.class_names is not None and len(self.class_names) < classes:
            raise ValueError(f"class_names has {len(self.class_names)} names, but the model predicts {classes} "
                             "classes; give one name per class.")

    def _name(self, label: int) -> str:
        return str(self.class_names[label]) if self.class_names is not None else str(label)

    def on_fit_end(self, trainer: Any) -> None:
        if self.nothing_new(trainer):
            return
        logits = trainer.predict([self.images])
        self.predicted = np.asarray(logits).argmax(axis=-1)
        n = len(self.images)
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        figure = new_figure(1.4 * cols, 1.6 * rows)
        for i in range(n):
            axes = figure.add_subplot(rows, cols, i + 1)
            image = self.images[i]
            axes.imshow(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image, cmap="gray")
            right = self.predicted[i] == self.labels[i]
            axes.set_title(f"{self._name(self.predicted[i])} ({self._name(self.labels[i])})",
                           color="black" if right else "red", fontsize=8)
            axes.axis("off")
        figure.suptitle("predicted (true); wrong in red", fontsize=9)
        figure.tight_layout()
        image = figure_to_array(figure)
        path = Path(self.path) if self.path else Path(trainer.workdir) / "plots" / "predictions.png"
        self.written = save_png(path, image)
        logger = find_logger(trainer)
        if logger is not None:
            logger.write_images(trainer.step, {"plots/predictions": image})
