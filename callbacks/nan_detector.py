"""``NaNDetector``: non-finite losses or gradients never reach the parameters.

The trainer's guard checks loss and gradients inside the compiled step: a bad step changes
nothing on the device and is counted (``nonfinite_total``, a cumulative metric, so a sparse check
misses nothing). ``policy="raise"`` halts at the first bad step and raises; ``"skip"`` skips bad
steps and raises after ``max_consecutive_skips`` of them in a row; ``"rollback"`` restores the newest
good checkpoint (a ``Checkpoint`` callback is required), never trains on the batch that went bad,
and continues, giving up after ``max_rollbacks``; the count so far is logged as ``nan_rollbacks`` (each
rollback's window, and every epoch's row of ``history``). No policy ever writes a non-finite checkpoint.

Example::

    Trainer(model, tx, max_epochs=3, callbacks=[NaNDetector(policy="skip", max_consecutive_skips=5)])
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from callbacks.lagged import LaggedFetch
from trainer.events import Callback, DefaultInterval, last_value
from trainer.loop import has_partial_row
from trainer.step import BAD_GRADS, BAD_LOSS

POLICIES = ("raise", "skip", "rollback")
ROLLBACKS = "nan_rollbacks"  # the logged count of rollbacks so far


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss or gradient it was told not to go past."""


class NaNDetector(Callback):
    """Stops (``raise``) or skips (``skip``) steps whose loss or gradients are not finite.

    Args:
      policy: ``"raise"``, ``"skip"`` or ``"rollback"``.
      max_consecutive_skips: with ``skip``, raise after this many bad steps in a row.
      max_rollbacks: with ``rollback``, raise at the bad step after this many rollbacks.
      check_every: read the device's counter every N steps (and at each epoch's end, at ``max_steps``
        and at the fit's end). The device halts by itself, so a sparse check loses nothing: the parameters stay
        those from before the bad step.
    """

    step_interval_attributes = ("check_every",)

    def __init__(self, policy: str = "raise", max_consecutive_skips: int = 10, check_every: int = DefaultInterval(10),
                 max_rollbacks: int = 3):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not known; choose one of {list(POLICIES)}.")
        if not isinstance(max_rollbacks, int) or max_rollbacks < 0:
            raise ValueError(f"max_rollbacks={max_rollbacks!r} must be a non-negative integer.")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips!r} must be a positive integer.")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every={check_every!r} must be a positive integer.")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.check_every = check_every
        self.max_rollbacks = max_rollbacks
        self.skipped = 0
        self.rollbacks: list[int] = []  # the bad steps rolled back from
        self._fetch = LaggedFetch()
        self._newest: Any = None  # the last step's ``nonfinite_total`` (a device array, unread)
        self._rolling_back = False  # a rollback this detector asked for, until its restore

    def on_fit_start(self, trainer: Any) -> None:
        self._newest = None
        trainer.enable_nonfinite_guard(self.max_consecutive_skips if self.policy == "skip" else 1)
        if self.policy == "rollback":
            if not trainer.checkpoints:
                raise ValueError("NaNDetector(policy='rollback') needs a Checkpoint callback to roll back to.")
            checkpoint = trainer.checkpoints[0]
            if not checkpoint.open(trainer).steps():
                checkpoint.save(trainer, wait=True)  # a starting point, in case the first steps go bad

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, Any]) -> None:
        last = trainer.should_stop or (trainer.max_steps is not None and step >= trainer.max_steps)
        if not last and self._check(trainer):
            return  # rolling back: this step's counter belongs to the state being discarded
        self._newest = metrics["nonfinite_total"]
        if last:  # the run's last step: checked now, so that a rollback it needs still trains to the end
            self._check(trainer, now=True)
        elif step % self.check_every == 0:
            self._fetch.push(step, self._newest)

    def on_epoch_end(self, trainer: Any, epoch: int, logs: dict[str, float]) -> None:
        self._check(trainer, now=True)
        if self.policy == "rollback":
            logs[ROLLBACKS] = float(len(self.rollbacks))  # in ``history``: a restored guard counts 0 bad steps

    def on_fit_end(self, trainer: Any) -> None:
        self._check(trainer, now=True)
        if self.policy == "rollback" and has_partial_row(trainer):
            trainer.history[-1][ROLLBACKS] = float(len(self.rollbacks))

    def on_checkpoint_restore(self, trainer: Any, checkpoint: dict) -> None:
        if self._rolling_back:  # the loggers' next window says how many so far
            self._rolling_back = False
            trainer.record(ROLLBACKS, len(self.rollbacks))

    def _check(self, trainer: Any, now: bool = False) -> bool:
        """Reads the device's counter (the newest that arrived, or ``now`` the last step's); acts on new
        bad steps. True when it requested a rollback."""
        if now:
            # The last step's counter: at an epoch's or the fit's end the loop has just waited for the
            # epoch's metrics, so this read waits for nothing and, unlike ``trainer.state``, rebuilds
            # nothing (the state's rebuild and repack cost the CNN ~28 ms an epoch).
            self._fetch.clear()
            total = (int(last_value(np.asarray(self._newest))) if self._newest is not None
                     else int(trainer.state.guard["nonfinite_total"]))
        else:
            popped = newest = self._fetch.pop(block=False)
            while newest is not None:  # the counter only grows: the newest value that arrived says it all
                popped, newest = newest, self._fetch.pop(block=False)
            if popped is None:
                return False
            total = int(last_value(popped[1]))
        if total <= self.skipped:
            return False
        guard = jax.device_get(trainer.state.guard)
        if bool(guard["halted"]):
            if self.policy == "rollback" and len(self.rollbacks) < self.max_rollbacks:
                bad_step = int(guard["halt_step"])
                self.rollbacks.append(bad_step)
                warnings.warn(f"{self._head(trainer, guard, rolling_back=True)}: rolling back to the newest good "
                              f"checkpoint and skipping that batch (rollback {len(self.rollbacks)} of "
                              f"{self.max_rollbacks}).", RuntimeWarning, stacklevel=2)
                trainer.request_rollback(bad_step)
                self._rolling_back = True
                # the counter restarts with the restored state: counters read from the discarded one
                # (still in flight) would otherwise pass for skips and hide the next bad step
                self.skipped, self._newest = 0, None
                self._fetch.clear()
                return True
            # the steps dispatched after the halt were no-ops: the count says the updates applied
            trainer.step = int(guard["halt_step"]) - 1
            raise NonFiniteError(self._message(trainer, guard))
        warnings.warn(f"skipped {total - self.skipped} step(s) with a non-finite loss or gradients "
                      f"(total {total}) up to step {trainer.step}.", RuntimeWarning, stacklevel=2)
        self.skipped = total
        return False

    def _message(self, trainer: Any, guard: Mapping[str, Any]) -> str:
        if not _params_finite(trainer):  # the guard checks loss and gradients, not the updates
            return (f"{self._head(trainer, guard)}. The parameters are not finite already: an update before this "
                    "step wrote them (the guard checks the loss and gradients, not the updates: a learning rate "
                    "that is not finite, an infinite schedule value say, or an optimizer dividing by zero). Fix the "
                    "learning-rate schedule or the optimizer.")
        return (f"{self._head(trainer, guard)}. The parameters and optimizer state are those from before that step; nothing "
                "non-finite was written. Lower the learning rate, clip gradients (clip_norm), or check "
                "that batch's data.")

    def _head(self, trainer: Any, guard: Mapping[str, Any], rolling_back: bool = False) -> str:
        """What went wrong where: ``non-finite loss at step 8 (learning rate 0.01)``."""
        kind = int(guard["halt_kind"])
        what = " and ".join(name for bit, name in ((BAD_LOSS, "loss"), (BAD_GRADS, "gradients")) if kind & bit)
        lr = float(guard["halt_lr"])
        if _schedule_not_finite(trainer, guard):  # an infinite peak times a warmup fraction, say
            lr_text = "learning rate nan: the schedule itself is not finite"
        elif math.isnan(lr):
            lr_text = "learning rate unknown (not injected)"
        else:
            lr_text = f"learning rate {lr:.4g}"
        step = int(guard["halt_step"])
        if rolling_back or self.policy == "raise":
            return f"non-finite {what} at step {step} ({lr_text})"
        if self.policy == "rollback":
            count = len(self.rollbacks)
            return f"non-finite {what} at step {step} ({lr_text}) after {count} rollback{'' if count == 1 else 's'}"
        return (f"{self.max_consecutive_skips} steps in a row had non-finite values, the last at step "
                f"{step}: non-finite {what} ({lr_text})")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        saved = list(state.get("rollbacks", []))
        if len(saved) > len(self.rollbacks):  # a rollback restores older state: never forget one
            self.rollbacks = saved


def _schedule_not_finite(trainer: Any, guard: Mapping[str, Any]) -> bool:
    """Whether the halted step's learning rate was injected and NaN (the guard's NaN otherwise means
    "not injected")."""
    return math.isnan(float(guard["halt_lr"])) and trainer.learning_rate is not None


def _params_finite(trainer: Any) -> bool:
    """Whether every parameter is finite (read on the host: only when raising)."""
    return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in jax.tree.leaves(trainer.state.params))
