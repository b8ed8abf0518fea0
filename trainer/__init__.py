"""nnx-trainer's engine: the Trainer, its events, state, compiled steps, data, optimizers and losses.

Public names: ``Trainer``, ``Callback``, ``TrainState``, ``ArrayLoader``, ``ArrayLoaderIterator``,
``OptimConfig``, ``make_optimizer``, ``make_schedule`` and the ``losses`` and ``optim`` modules.
"""

from trainer import losses, optim
from trainer.data import ArrayLoader, ArrayLoaderIterator
from trainer.events import Callback, CallbackList
from trainer.optim import OptimConfig, make_optimizer, make_schedule
from trainer.state import TrainState
from trainer.trainer import Trainer

__all__ = [
    "ArrayLoader", "ArrayLoaderIterator", "Callback", "CallbackList", "OptimConfig", "TrainState",
    "Trainer", "losses", "make_optimizer", "make_schedule", "optim",
]
