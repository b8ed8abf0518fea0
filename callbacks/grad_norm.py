"""``GradNormMonitor``: the gradient norm, computed inside the compiled step, with range warnings.

The training guide: a norm near 0 means vanishing gradients or a too-small learning rate; a
large one means exploding gradients (clip them, lower the learning rate).

Example::

    Trainer(model, tx, max_epochs=3, callbacks=[GradNormMonitor(every=50), MetricsLogger(...)])
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import jax

from callbacks.lagged import LaggedFetch
from trainer.events import Callback, DefaultInterval, last_value
from trainer.optim import global_norm
from trainer.step import StepInfo


class GradNormWarning(UserWarning):
    """The gradient norm left the range a ``GradNormMonitor`` was given."""


class GradNormMonitor(Callback):
    """Adds ``grad_norm``, the global norm of the gradients (``trainer.optim.global_norm``), to the step metrics.

    Args:
      every: read the norm on the host every N steps to check the range (no per-step sync).
      warn_below / warn_above: the healthy range; a warning names the step and the norm outside it.
      per_layer: also ``grad_norm/<name>`` for every top-level submodule of the model (of a list of
        layers, ``nnx.Sequential``'s included, each layer: ``grad_norm/layers/0``).

    A warning is given when the norm leaves the range, not again at each check while it stays out on
    that side (a converged model's small gradients would warn at every check); ``warnings`` lists every one.
    """

    step_interval_attributes = ("every",)

    def __init__(self, every: int = DefaultInterval(50), warn_below: float | None = 0.1,
                 warn_above: float | None = 10.0, per_layer: bool = False):
        if not isinstance(every, int) or every <= 0:
            raise ValueError(f"every={every!r} must be a positive integer.")
        if warn_below is not None and warn_above is not None and warn_below >= warn_above:
            raise ValueError(f"warn_below={warn_below} must be smaller than warn_above={warn_above}.")
        self.every = every
        self.warn_below, self.warn_above = warn_below, warn_above
        self.per_layer = per_layer
        self.warnings: list[tuple[int, float]] = []  # every check outside the range: (step, norm)
        self._outside: str | None = None  # the side the last check was outside of, warned about once
        self._fetch = LaggedFetch()

    def probe(self, info: StepInfo) -> dict[str, jax.Array]:
        """The in-step probe: global norm, and per top-level module when asked."""
        # float32 sums, the same expression as the trainer's non-finite guard (XLA computes it once)
        out = {"grad_norm": global_norm(info.grads)}
        if self.per_layer and hasattr(info.grads, "items"):
            for name, sub in _parts(info.grads):
                out[f"grad_norm/{name}"] = global_norm(sub)
        return out

    def on_fit_start(self, trainer: Any) -> None:
        if self.probe not in trainer.probes:
            trainer.probes.append(self.probe)
        if trainer.step == 0:  # a fresh run (a sweep reusing it): not the last run's checks
            self.warnings, self._outside = [], None

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, Any]) -> None:
        self._check(block=False)
        if step % self.every == 0:
            self._fetch.push(step, metrics["grad_norm"])

    def on_fit_end(self, trainer: Any) -> None:
        self._check()

    def _check(self, block: bool = True) -> None:
        while (popped := self._fetch.pop(block)) is not None:
            self._warn_if_outside(*popped)

    def _warn_if_outside(self, step: int, value: Any) -> None:
        popped = (step, value)
        step, norm = popped[0], float(last_value(popped[1]))
        if not math.isfinite(norm):  # NaN compares false both ways: it looked inside the range
            hint = ("non-finite gradients (NaN or inf): a NaNDetector skips or rolls back such steps; lower "
                    "the learning rate or look for a log of 0 or a division by 0")
        elif self.warn_below is not None and norm < self.warn_below:
            hint = "vanishing gradients or a too-small learning rate"
        elif self.warn_above is not None and norm > self.warn_above:
            hint = "exploding gradients: clip them (clip_norm) or lower the learning rate"
        else:
            self._outside = None
            return
        self.warnings.append((step, norm))
        if hint == self._outside:  # still outside on the same side: warned when it left the range
            return
        self._outside = hint
        warnings.warn(f"gradient norm {norm:.4g} at step {step} is outside [{self.warn_below}, "
                      f"{self.warn_above}]: {hint}. Later checks on this side are not warned about until it "
                      "comes back inside (GradNormMonitor.warnings lists every one).", GradNormWarning, stacklevel=2)


def _parts(grads: Any) -> list[tuple[str, Any]]:
    """The top-level parts of the gradients by name; a list of layers (integer keys) by layer."""
    parts = []
    for name, sub in grads.items():
        keys = list(sub.keys()) if hasattr(sub, "keys") else []
        if keys and all(isinstance(k, int) for k in keys):
            parts.extend((f"{name}/{k}", sub[k]) for k in keys)
        else:
            parts.append((str(name), sub))
    return parts
