"""``EpochSummary``: one plain line per epoch with its train and eval metrics and wall time."""

from __future__ import annotations

import time
from typing import Any, Mapping, TextIO

from callbacks.writers import check_stream, print_line
from trainer.events import Callback


class EpochSummary(Callback):
    """Prints ``epoch 3/15  loss 0.1234  accuracy 0.9612  eval/loss ...  time 4.1s`` after each epoch.

    Counts (metrics named ``*_total``, such as ``nonfinite_total``) print as integers.

    It reads only the host values the trainer already gathered at the epoch's end, so it adds no
    device synchronisation.

    Example::

        Trainer(model, tx, max_epochs=3, callbacks=[EpochSummary()])
    """

    def __init__(self, stream: TextIO | None = None):
        check_stream(stream)
        self.stream = stream
        self._started = 0.0

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Mapping[str, float]) -> None:
        total = f"/{trainer.max_epochs}" if trainer.max_epochs else ""
        values = "  ".join(f"{k} {_format(k, v)}" for k, v in logs.items())
        seconds = time.perf_counter() - self._started
        print_line(f"epoch {epoch + 1}{total}  {values}  time {seconds:.1f}s", self.stream)


def _format(name: str, value: float) -> str:
    if name.endswith("_total") and float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"  # a learning rate near its end
