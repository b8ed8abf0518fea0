"""``EarlyStopping``: stop when a monitored metric stops improving; optionally restore the best.

Example::

    Trainer(model, tx, max_epochs=50, callbacks=[EarlyStopping("eval/loss", patience=3)])
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from trainer.resume import read_saved_state
from trainer.events import Callback
from trainer.metric_names import resolve_mode
from trainer.other_names import EARLY_STOPPING, other_names


class EarlyStopping(Callback):
    """Requests a stop after ``patience`` checks without an improvement larger than ``min_delta``.

    A check happens at every evaluation that reports ``monitor`` (``eval/...`` metrics), or else at
    every epoch's end (train metrics such as ``loss``). With ``restore_best`` the parameters and
    model state of the best check are put back when it stops the run.

    A monitor nothing reports loses no training: one missing from an epoch's logs (with no
    evaluator running every N steps, nor one of its prefix every N epochs, which may report it
    later) stops the run after that epoch's
    checkpoint, and ``fit`` then raises a ``KeyError`` listing the names there are; one that the
    step evaluations never report is warned about at the end of ``fit``; an ``eval/`` metric in a
    ``fit`` without an ``Evaluator`` or ``eval_data`` is warned about at its start.

    Args:
      monitor: metric name, e.g. ``eval/loss``, ``eval/accuracy``, ``loss``.
      mode: ``min`` (lower is better), ``max``, or ``auto``: read from the name (a loss or error
        lower, an accuracy higher; a name that says neither is refused).
      patience: checks without improvement before stopping.
      min_delta: the smallest change that counts as an improvement.
      restore_best: restore the best state when stopping.
      baseline: a value to beat (Keras's): until a check beats it, the patience runs on even while the
        checks improve (the best of them is still the one restored).
      start_from_epoch: epochs at the start whose checks are skipped (Keras's), for a model that first
        gets worse (a warmup).
    """

    @other_names(EARLY_STOPPING)
    def __init__(self, monitor: str = "eval/loss", mode: str = "auto", patience: int = 3,
                 min_delta: float = 0.0, restore_best: bool = True, *, baseline: float | None = None,
                 start_from_epoch: int = 0):
        mode = resolve_mode(monitor, mode, "EarlyStopping")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience={patience!r} must be a positive integer.")
        if min_delta < 0:
            raise ValueError(f"min_delta={min_delta} must be >= 0.")
        if not isinstance(start_from_epoch, numbers.Integral) or start_from_epoch < 0:
            raise ValueError(f"start_from_epoch={start_from_epoch!r} must be an integer >= 0.")
        if baseline is not None and not (isinstance(baseline, numbers.Real) and math.isfinite(baseline)):
            raise ValueError(f"baseline={baseline!r} must be a finite number (or None).")
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta, self.restore_best = min_delta, restore_best
        self.baseline = None if baseline is None else float(baseline)
        self.start_from_epoch = int(start_from_epoch)
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self._best_state = None
        self._checked_step: int | None = None
        self._missing: KeyError | None = None
        self._reported = False  # an evaluation of this fit reported the monitor (an epoch's logs need not)
        self._seen_in_logs = False  # an epoch's logs held it (a train metric)
        self._evaluators: list = []  # this fit's

    @property
    def state_key(self) -> str:
        """Its checkpointed state is the best of ``monitor`` in ``mode``: a resume that watches another
        metric or direction starts afresh rather than comparing with the other's best."""
        return f"{type(self).__name__}[{self.monitor},{self.mode}]"

    def _better(self, value: float, reference: float | None) -> bool:
        if reference is None:
            return not math.isnan(value)
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def _check(self, trainer: Any, value: float) -> None:
        self._checked_step = trainer.step
        if trainer.epoch < self.start_from_epoch:
            return  # Keras's start_from_epoch: these epochs are neither a best nor a lack of improvement
        self.wait += 1
        if self._better(value, self.best):  # Keras's order: a new best is kept, and never stops the run; the
            self.best, self.best_step, self.best_epoch = value, trainer.step, trainer.epoch  # wait starts again
            if self.baseline is None or self._better(value, self.baseline):  # only once it beats the baseline
                self.wait = 0
            if self.restore_best:  # a copy: the step donates (reuses) the live arrays
                state = trainer.state
                self._best_state = jax.tree.map(jnp.copy, (state.params, state.model_state))
            return
        if self.wait >= self.patience:
            self.stopped_epoch = trainer.epoch
            restored = self._restore_best(trainer) if self.restore_best else ""
            below = (f"; none beat the baseline {self.baseline:.6g}" if self.baseline is not None and self.best is not None
                     and not self._better(self.best, self.baseline) else "")
            best = (f"best {self.best:.6g} at step {self.best_step}{restored}{below}" if self.best is not None else
                    "no check gave a number (every one was NaN)")
            trainer.request_stop(f"EarlyStopping: {self.monitor} did not improve for {self.patience} checks; {best}")

    def _restore_best(self, trainer: Any) -> str:
        """Puts the best parameters back (kept in memory, or after a resume read from the checkpoint of
        the best step); says which, or why not."""
        if self._best_state is not None:  # a copy again: the next step donates it
            params, model_state = jax.tree.map(jnp.copy, self._best_state)
            trainer.state = trainer.state.replace(params=params, model_state=model_state)
            return " (restored)"
        if self.best_step is None:
            return ""
        saved = read_saved_state(trainer, self.best_step)
        if saved is None:
            warnings.warn(f"EarlyStopping: the best parameters (step {self.best_step}) are not kept across a resume "
                          "and no checkpoint of that step remains; the run ends with its last parameters. Keep it with "
                          f"Checkpoint(monitor={self.monitor!r}).", RuntimeWarning, stacklevel=3)
            return " (not restored: no checkpoint of that step remains)"
        trainer.state = trainer.state.replace(params=saved.params, model_state=saved.model_state)
        return f" (restored from checkpoint step {self.best_step})"

    def on_fit_start(self, trainer: Any) -> None:
        self._missing, self._reported, self._seen_in_logs = None, False, False
        self._evaluators = list(trainer.evaluators)  # fit's own (eval_data) are gone by on_fit_end
        if trainer.step == 0:  # a fresh run (a sweep reusing it): nothing of the last (a resume restores after this)
            self.best = self.best_step = self.best_epoch = self.stopped_epoch = self._checked_step = None
            self.wait, self._best_state = 0, None  # (its best parameters were put into the next model)
        if self.monitor.startswith("eval/") and not trainer.evaluators:
            warnings.warn(f"EarlyStopping monitors {self.monitor!r}, but this fit has no Evaluator or eval_data: "
                          "unless a callback of yours evaluates with prefix 'eval/', the first epoch's end stops "
                          "the run with a KeyError. Pass eval_data to fit(...), or monitor a train metric such as "
                          "'loss'.", stacklevel=2)

    def on_eval_end(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        if trainer.fitting and self.monitor in metrics:  # not an evaluate() called after the run
            self._reported = True
            if self._checked_step == trainer.step:
                return  # this step's state was checked already: a second look is no lack of improvement
            self._check(trainer, float(metrics[self.monitor]))

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Mapping[str, float]) -> None:
        if self._checked_step == trainer.step:
            return  # this epoch's evaluation already checked
        if self.monitor not in logs and (self._reported or any(
                e.every_n_steps or (self.monitor.startswith(e.prefix) and not e.due_at_epoch_end(epoch))
                for e in trainer.evaluators)):
            return  # checked at the evaluations (every N steps, or every N epochs: not due this one)
        if self.monitor not in logs:  # stop after this epoch's checkpoint; fit raises at its end
            skipped = logs.get("nonfinite_total", 0) > 0 and "loss" not in logs
            self._missing = KeyError(
                f"EarlyStopping monitors {self.monitor!r}, which epoch {epoch} did not report: every step of it was "
                f"skipped as non-finite (nonfinite_total={logs['nonfinite_total']:g}), so it has no train metrics. "
                "Lower the learning rate or check the data (NaNDetector(policy='raise') stops at the first bad step)."
                if skipped else
                f"EarlyStopping monitors {self.monitor!r}, which no evaluation or epoch reported; available: "
                f"{sorted(logs)}. Fix monitor= or add an Evaluator / eval_data.")
            trainer.request_stop(f"EarlyStopping: {self.monitor!r} is not among the epoch's metrics")
            return
        self._seen_in_logs = True  # a train metric, which no evaluation reports: no "never saw" warning
        self._check(trainer, float(logs[self.monitor]))

    def on_fit_end(self, trainer: Any) -> None:
        if self._missing is not None:
            raise self._missing
        seen = [m for e in self._evaluators for _, m in e.history]
        if not self._reported and not self._seen_in_logs and seen and self.monitor not in seen[-1]:
            warnings.warn(f"EarlyStopping never saw {self.monitor!r}: the evaluations reported {sorted(seen[-1])}, so "
                          "it never checked; fix monitor=.", RuntimeWarning, stacklevel=2)

    def on_checkpoint_restore(self, trainer: Any, checkpoint: dict) -> None:
        self._missing = None  # judged on steps the restore discarded
        self._checked_step = None  # the steps after the restored one are trained (and checked) again

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "best_epoch": self.best_epoch,
                "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("best", "best_step", "best_epoch", "wait", "stopped_epoch"):
            setattr(self, key, state.get(key, getattr(self, key)))
