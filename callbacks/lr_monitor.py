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
from trainer.optim import learning_rates
from trainer.step import StepInfo


class LearningRateMonitor(Callback):
    """Adds the learning rate to the step metrics (logged as the window's last value).

    Args:
      name: the metric's name in the logs.
      hyperparam: the injected hyperparameter read from the optimizer state (``optax.inject_hyperparams``);
        ``learning_rate`` for optax's optimizers, another name for an optimizer of your own (``step_size``).
    """

    def __init__(self, name: str = "learning_rate", hyperparam: str = "learning_rate"):
        self.name = name
        self.hyperparam = hyperparam

    def probe(self, info: StepInfo) -> dict[str, jax.Array]:
        """The in-step probe: the learning rate the step used, read from the optimizer state (one per group of
        ``optax.multi_transform`` with a rate of its own: ``learning_rate/<group>``)."""
        rates = learning_rates(info.opt_state, self.hyperparam)
        return {f"{self.name}/{label}" if label else self.name: rate for label, rate in rates.items()}

    def on_fit_start(self, trainer: Any) -> None:
        rates = learning_rates(trainer.state.opt_state, self.hyperparam)
        if not rates:
            raise ValueError(
                f"LearningRateMonitor cannot find {self.hyperparam!r} in the optimizer state: build the "
                "optimizer with trainer.optim.make_optimizer / OptimConfig, or wrap it with "
                "optax.inject_hyperparams(optax.adamw)(learning_rate=...); an optimizer whose rate has "
                "another name: LearningRateMonitor(hyperparam='step_size')."
            )
        for label in rates:
            trainer.metric_reductions[f"{self.name}/{label}" if label else self.name] = "last"
        if self.probe not in trainer.probes:
            trainer.probes.append(self.probe)
