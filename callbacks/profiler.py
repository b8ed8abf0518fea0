"""``Profiler``: a ``jax.profiler`` trace of chosen steps, for TensorBoard's profile tab.

Example::

    Trainer(model, tx, max_steps=100, workdir="runs/x", callbacks=[Profiler(start_step=20, num_steps=5)])
    # then: tensorboard --logdir runs/x/profile
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax

from trainer.events import Callback


class Profiler(Callback):
    """Traces steps ``start_step`` .. ``start_step + num_steps - 1`` (1-based) into ``logdir``.

    With ``steps_per_execution`` the trace covers whole chunks: from the first chunk that may hold a
    step of that range (it starts at most K-1 steps before it) to the chunk that reaches its end.
    ``traced`` is ``(first, last)``, the steps inside the written trace (``None`` until then).

    Args:
      start_step: the first traced step; skip the first one or two (compilation).
      num_steps: how many steps to trace.
      logdir: where the trace goes (default: ``<workdir>/profile``).
    """

    def __init__(self, start_step: int = 10, num_steps: int = 5, logdir: str | None = None):
        if not isinstance(start_step, int) or start_step < 1:
            raise ValueError(f"start_step={start_step!r} must be a positive integer (steps count from 1).")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be a positive integer.")
        self.start_step, self.num_steps, self.logdir = start_step, num_steps, logdir
        self.trace_dir: Path | None = None
        self._active = self._done = False
        self.traced: tuple[int, int] | None = None
        self._first = 0

    def on_fit_start(self, trainer: Any) -> None:
        if self.logdir is None and trainer.workdir is None:
            raise ValueError("Profiler needs a folder: pass logdir= or give the Trainer a workdir.")
        self.trace_dir = Path(self.logdir) if self.logdir else Path(trainer.workdir) / "profile"

    def on_step_start(self, trainer: Any, step: int) -> None:
        reaches = step + trainer.steps_per_execution - 1 >= self.start_step  # a chunk may hold start_step
        if reaches and step < self.start_step + self.num_steps and not self._active and not self._done:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.trace_dir))
            self._active, self._first = True, step

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, Any]) -> None:
        if self._active and step >= self.start_step + self.num_steps - 1:
            self._stop(step, metrics)

    def _stop(self, step: int, wait_for: Any = None) -> None:
        if wait_for is not None:
            jax.block_until_ready(wait_for)  # the traced steps finish inside the trace
        jax.profiler.stop_trace()
        self._active, self._done, self.traced = False, True, (self._first, step)

    def on_fit_end(self, trainer: Any) -> None:
        if self._active:
            self._stop(trainer.step)

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        if self._active:
            self._stop(trainer.step)
