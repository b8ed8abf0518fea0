"""``Throughput``: examples/s, steps/s and the share of wall time spent waiting for data.

JAX dispatches steps asynchronously, so the host can run ahead of the device; every ``every``
steps (and at least ``min_seconds`` apart) this callback waits for the *previous* step to finish
(the current one is already queued, so the device never idles) and measures between such
completions: true rates, not dispatch rates. ``min_seconds`` keeps fast steps from paying for a
wait a hundred times a second (every 50 steps at 5,000 steps/s).

The training guide's "profile data-loading throughput" as numbers in the logs: a ``data_share``
near 1 means the input pipeline, not the model, sets the pace (prefetch, or make loading cheaper).

Example::

    Trainer(model, tx, max_epochs=3, callbacks=[Throughput(every=50), MetricsLogger(...)])
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Mapping

import jax

from trainer.events import Callback, DefaultInterval


class Throughput(Callback):
    """Every ``every`` steps records ``throughput/steps_per_sec``, ``.../examples_per_sec`` and
    ``.../data_share`` (host values handed to the loggers with ``trainer.record``), over windows of
    at least ``min_seconds`` (a shorter window grows to the next multiple of ``every``; 0: no minimum).

    ``clock`` is injectable for tests; ``last`` holds the newest values.
    """

    step_interval_attributes = ("every",)

    def __init__(self, every: int = DefaultInterval(50), min_seconds: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter):
        if not isinstance(every, int) or every <= 0:
            raise ValueError(f"every={every!r} must be a positive integer.")
        if min_seconds < 0:
            raise ValueError(f"min_seconds={min_seconds!r} must be >= 0.")
        self.every = every
        self.min_seconds = float(min_seconds)
        self.clock = clock
        self.last: dict[str, float] = {}
        self._start: tuple[float, int, float] | None = None
        self._examples = 0
        self._previous: Any = None  # (step, loss) of the last execution: a handle to wait on, never read

    def on_fit_start(self, trainer: Any) -> None:
        from callbacks.metrics_logger import MetricsLogger

        if not any(isinstance(cb, MetricsLogger) for cb in trainer.callbacks.callbacks):
            warnings.warn("Throughput hands its values to the loggers (trainer.record), and this trainer has no "
                          "MetricsLogger: they are not shown anywhere (Throughput.last holds the newest). Add "
                          "MetricsLogger([ConsoleWriter()]) to the callbacks.", stacklevel=2)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self._start, self._previous = None, None

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, Any]) -> None:
        previous, self._previous = self._previous, (step, metrics["loss"])
        if self._start is None:  # the first step of an epoch compiles or follows an evaluation
            if previous is not None:
                jax.block_until_ready(previous[1])
                self._start = (self.clock(), previous[0], trainer.data_wait_seconds)
                self._examples = trainer.last_examples
            return
        self._examples += trainer.last_examples
        if step % self.every or (self.min_seconds and self.clock() - self._start[0] < self.min_seconds):
            return  # a window shorter than min_seconds keeps growing
        jax.block_until_ready(previous[1])  # the previous execution is done; this one is queued behind it
        now = self.clock()
        started, start_step, start_wait = self._start
        done, examples = previous[0], self._examples - trainer.last_examples
        elapsed = max(now - started, 1e-9)
        self.last = {
            "throughput/steps_per_sec": (done - start_step) / elapsed,
            "throughput/examples_per_sec": examples / elapsed,
            "throughput/data_share": min(1.0, (trainer.data_wait_seconds - start_wait) / elapsed),
        }
        for name, value in self.last.items():
            trainer.record(name, value)
        self._start = (now, done, trainer.data_wait_seconds)
        self._examples = trainer.last_examples
