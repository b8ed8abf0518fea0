"""``LearningRateMonitor``: logs the learning rate the optimizer used at each step.

The value is read inside the compiled step from the optimizer state (``optax.inject_hyperparams``,
which ``trainer.optim.make_optimizer`` uses), not recomputed from the schedule by hand.

Example::

    Trainer(model, make_optimizer("adamw", learning_rate=schedule), max_steps=1000,
            callbacks=[LearningRateMonitor(), MetricsLogger(...)])
"""

from __future__ import annotations

from typing import Any

import jax

from trainer.events import Callback
from trainer.optim import current_learning_rate
from trainer.step import StepInfo


class LearningRateMonitor(Callback):
    """Adds ``learning_rate`` to the step metrics (logged as the window's last value)."""

    def __init__(self, name: str = "learning_rate"):
        self.name = name

    def probe(self, info: StepInfo) -> dict[str, jax.Array]:
        return {self.name: current_learning_rate(info.opt_state)}

    def on_fit_start(self, trainer: Any) -> None:
        if trainer.learning_rate is None:
            raise ValueError(
                "LearningRateMonitor cannot find a learning rate in the optimizer state: build the "
                "optimizer with trainer.optim.make_optimizer / OptimConfig, or wrap it with "
                "optax.inject_hyperparams(optax.adamw)(learning_rate=...)."
            )
        trainer.metric_reductions[self.name] = "last"
        if self.probe not in trainer.probes:
            trainer.probes.append(self.probe)
