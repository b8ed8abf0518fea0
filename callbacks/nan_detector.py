"""``NaNDetector``: non-finite losses or gradients never reach the parameters.

The trainer's guard checks loss and gradients inside the compiled step: a bad step changes
nothing on the device and is counted (``nonfinite_total``, a cumulative metric, so a sparse check
misses nothing). ``policy="raise"`` halts at the first bad step and raises; ``"skip"`` skips bad
steps and raises after ``max_consecutive_skips`` of them in a row.

Example::

    Trainer(model, tx, max_epochs=3, callbacks=[NaNDetector(policy="skip", max_consecutive_skips=5)])
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import jax

from callbacks.lagged import LaggedFetch
from trainer.events import Callback
from trainer.step import BAD_GRADS, BAD_LOSS

POLICIES = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss or gradient it was told not to go past."""


class NaNDetector(Callback):
    """Stops (``raise``) or skips (``skip``) steps whose loss or gradients are not finite.

    Args:
      policy: ``"raise"`` or ``"skip"``.
      max_consecutive_skips: with ``skip``, raise after this many bad steps in a row.
      check_every: read the device's counter every N steps (and at each epoch's end and the fit's
        end). The device halts by itself, so a sparse check loses nothing: the parameters stay
        those from before the bad step.
    """

    def __init__(self, policy: str = "raise", max_consecutive_skips: int = 10, check_every: int = 10):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not known; choose one of {list(POLICIES)} "
                             "(a 'rollback' policy needs checkpoints).")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={max_consecutive_skips!r} must be a positive integer.")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every={check_every!r} must be a positive integer.")
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.check_every = check_every
        self.skipped = 0
        self._fetch = LaggedFetch()

    def on_fit_start(self, trainer: Any) -> None:
        trainer.enable_nonfinite_guard(1 if self.policy == "raise" else self.max_consecutive_skips)

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, Any]) -> None:
        self._check(trainer)
        if step % self.check_every == 0:
            self._fetch.push(step, metrics["nonfinite_total"])

    def on_epoch_end(self, trainer: Any, epoch: int, logs: Mapping[str, float]) -> None:
        self._check(trainer, now=True)

    def on_fit_end(self, trainer: Any) -> None:
        self._check(trainer, now=True)

    def _check(self, trainer: Any, now: bool = False) -> None:
        popped = self._fetch.pop()
        if popped is None and not now:
            return
        total = int(popped[1]) if popped is not None and not now else int(trainer.state.guard["nonfinite_total"])
        if total <= self.skipped:
            return
        guard = jax.device_get(trainer.state.guard)
        if bool(guard["halted"]):
            raise NonFiniteError(self._message(guard))
        warnings.warn(f"skipped {total - self.skipped} step(s) with a non-finite loss or gradients "
                      f"(total {total}) up to step {trainer.step}.", RuntimeWarning, stacklevel=2)
        self.skipped = total

    def _message(self, guard: Mapping[str, Any]) -> str:
        kind = int(guard["halt_kind"])
        what = " and ".join(name for bit, name in ((BAD_LOSS, "loss"), (BAD_GRADS, "gradients")) if kind & bit)
        lr = float(guard["halt_lr"])
        lr_text = f"learning rate {lr:.4g}" if not math.isnan(lr) else "learning rate unknown (not injected)"
        step = int(guard["halt_step"])
        if self.policy == "raise":
            head = f"non-finite {what} at step {step} ({lr_text})"
        else:
            head = (f"{self.max_consecutive_skips} steps in a row had non-finite values, the last at step "
                    f"{step}: non-finite {what} ({lr_text})")
        return (f"{head}. The parameters and optimizer state are those from before that step; nothing "
                "non-finite was written. Lower the learning rate, clip gradients (clip_norm), or check "
                "that batch's data.")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
