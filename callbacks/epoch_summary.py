"""``EpochSummary``: one plain line per epoch with its train and eval metrics and wall time (and one
for the epoch a fit ended inside, ``max_steps`` or a stop, marked ``partial``)."""

from __future__ import annotations

import time
from typing import Any, Mapping, TextIO

from callbacks.writers import check_stream, print_line
from trainer.events import Callback


class EpochSummary(Callback):
    """Prints ``epoch 3/15  loss 0.1234  accuracy 0.9612  eval/loss ...  time 4.1s`` after each epoch.

    Counts (metrics named ``*_total``, such as ``nonfinite_total``, and ``nan_rollbacks``) print as integers.

    It reads only the host values the trainer already gathered at the epoch's end, so it adds no
    device synchronisation.

    Example::

        Trainer(model, tx, max_epochs=3, callbacks=[EpochSummary()])
    """

    def __init__(self, stream: TextIO | None = None):
        check_stream(stream)
        self.stream = stream
        self._started = 0.0
        self._open_epoch: int | None = None  # an epoch this fit started and has not ended
        self._old_row: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        self._open_epoch = None
        self._old_row = trainer.history[-1] if trainer.history else None  # a row this fit did not write

    def on_checkpoint_restore(self, trainer: Any, checkpoint: dict) -> None:
        self._old_row = trainer.history[-1] if trainer.history else None

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._started, self._open_epoch = time.perf_counter(), epoch

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Mapping[str, float]) -> None:
        self._open_epoch = None
        self._print(trainer, epoch, logs, "")

    def on_fit_end(self, trainer: Any) -> None:
        """The epoch the fit ended inside: its row so far (``Trainer.history``'s ``partial_epoch`` row)."""
        row = trainer.history[-1] if trainer.history else {}
        written = row is not self._old_row  # not a row an earlier fit left (a preemption writes none)
        if written and self._open_epoch is not None and row.get("partial_epoch") and row.get("epoch") == self._open_epoch:
            logs = {k: v for k, v in row.items() if k not in ("epoch", "partial_epoch")}
            self._print(trainer, self._open_epoch, logs, f" (partial, to step {trainer.step})")
        self._open_epoch = None

    def _print(self, trainer: Any, epoch: int, logs: Mapping[str, float], note: str) -> None:
        total = f"/{trainer.max_epochs}" if trainer.max_epochs else ""
        values = "  ".join(f"{k} {_format(k, v)}" for k, v in logs.items())
        seconds = time.perf_counter() - self._started
        print_line(f"epoch {epoch + 1}{total}{note}  {values}  time {seconds:.1f}s", self.stream)


COUNTS = ("nan_rollbacks",)  # counts whose names do not end in _total


def _format(name: str, value: float) -> str:
    if (name.endswith("_total") or name in COUNTS) and float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}"  # a learning rate near its end
