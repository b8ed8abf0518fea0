"""``ProgressBar``: a per-epoch bar (tqdm) with step, loss, steps/s and ETA; plain lines off a terminal.

The loss is fetched every ``refresh_every`` steps without waiting (``LaggedFetch``) and shown once
that step has finished on the device, labelled with its own step; plain lines count finished steps
for their rate. The bar waits for the device only where the loop is about to anyway: at an epoch's
last step, before an evaluation, at the end of an epoch or of ``fit``. tqdm's own count, rate and
ETA follow dispatched steps, at most ``Trainer(dispatch_ahead=...)`` executions ahead.

Example::

    Trainer(model, tx, max_epochs=3, callbacks=[ProgressBar()])
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO

from callbacks.lagged import LaggedFetch
from callbacks.writers import check_stream
from trainer.events import Callback, DefaultInterval, last_value


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressBar(Callback):
    """Shows training progress per epoch.

    Args:
      refresh_every: steps between loss reads (and, off a terminal, between printed lines).
      stream: where to draw (stderr by default).
      plain: force plain lines (``None``: plain when ``stream`` is not a terminal, as in CI logs).
      min_seconds: at least this long between two reads / lines, so that fast steps (thousands a
        second) neither flood a log nor read the device thousands of times.
    """

    step_interval_attributes = ("refresh_every",)

    def __init__(self, refresh_every: int = DefaultInterval(10), stream: TextIO | None = None,
                 plain: bool | None = None, min_seconds: float = 0.5):
        if not isinstance(refresh_every, int) or refresh_every <= 0:
            raise ValueError(f"refresh_every={refresh_every!r} must be a positive integer.")
        check_stream(stream)
        self.refresh_every = refresh_every
        self.stream = stream
        self.plain = plain
        self.min_seconds = min_seconds
        self._last_refresh = -float("inf")
        self._bar = None
        self._fetch = LaggedFetch()
        self._marks: list[tuple[float, int]] = []
        self._done = 0
        self._total: int | None = None

    def _out(self) -> TextIO:
        return self.stream or sys.stderr

    def _is_plain(self) -> bool:
        if self.plain is not None:
            return self.plain
        return not (hasattr(self._out(), "isatty") and self._out().isatty())

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._total = trainer.epoch_length
        self._done = trainer.position
        self._marks = []
        self._epoch = epoch
        total_epochs = f"/{trainer.max_epochs}" if trainer.max_epochs else ""
        self._label = f"epoch {epoch + 1}{total_epochs}"
        if not self._is_plain():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._total, initial=self._done, desc=self._label, file=self._out(),
                             leave=True, dynamic_ncols=True, unit="step")

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, Any]) -> None:
        self._done += trainer.execution_steps
        self._show_finished(block=False)
        if self._bar is not None:
            self._bar.update(trainer.execution_steps)
        if step % self.refresh_every == 0 and time.perf_counter() - self._last_refresh >= self.min_seconds:
            self._last_refresh = time.perf_counter()
            self._fetch.push(step, (metrics["loss"], self._done))
        if trainer.epoch_length is not None and trainer.position >= trainer.epoch_length:
            # the epoch's last step: the loop next waits for the epoch's metrics anyway, so this wait
            # costs nothing and its lines come before the epoch's evaluation and summary
            self._show_finished(block=True)

    def _show_finished(self, block: bool) -> None:
        """Shows every fetched step that has finished (``block``: waits for those pending)."""
        finished = []
        while self._fetch.pending:
            popped = self._fetch.pop(block=block)
            if popped is None:
                break
            finished.append(popped)
        if finished:  # the newest has finished by now: a true progress mark (the older ones' times are unknown)
            self._marks.append((time.perf_counter(), finished[-1][0]))
        for step, (loss, done) in finished:
            self._show(step, float(last_value(loss)), int(done))

    def _show(self, step: int, loss: float, done: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix(step=step, loss=f"{loss:.4f}", refresh=False)
            return
        rate = 0.0
        if len(self._marks) >= 2:  # between finished steps, not dispatched ones
            (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
            rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
        of = f"/{self._total}" if self._total is not None else ""
        speed = f"  {rate:.2f} steps/s" if rate else ""
        eta = f"  eta {_duration((self._total - done) / rate)}" if self._total and rate else ""
        print(f"{self._label}  batch {done}{of}  step {step}  loss {loss:.4f}{speed}{eta}",
              file=self._out(), flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_eval_start(self, trainer: Any) -> None:
        self._show_finished(block=True)  # evaluating reads the trained state: those steps are done

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Mapping[str, float]) -> None:
        self._show_finished(block=True)  # the epoch's steps are done: its metrics were read
        if self._bar is not None and self._bar.total is not None and self._bar.n < self._bar.total:
            self._bar.total = self._bar.n  # fewer steps than batches (a ragged last batch dropped): a full bar
            self._bar.refresh()
        self._close()

    def on_fit_end(self, trainer: Any) -> None:
        self._show_finished(block=True)  # a stop mid-epoch: what was fetched, shown before the end
        self._close()

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        self._fetch.clear()
        self._close()

    def on_checkpoint_restore(self, trainer: Any, checkpoint: Mapping[str, Any]) -> None:
        # a rollback: the steps fetched since the restored one are trained again, and shown then
        self._fetch.clear()
        self._marks = []
        self._close()
