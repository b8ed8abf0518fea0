"""nnx-trainer's engine: the Trainer, its events, state, compiled steps, data, optimizers and losses.

Public names: ``Trainer``, ``Callback``, ``CallbackList``, ``DefaultInterval``, ``TrainState``,
``ArrayLoader``, ``ArrayLoaderIterator``, ``OptimConfig``, ``make_optimizer``, ``make_schedule``,
``Evaluator``, ``Checkpoint``, ``CheckpointError``, ``load_model``, ``read_model_info``, ``last_value``,
and the modules ``losses``, ``optim``, ``export``.
"""

from trainer import export, losses, optim
from trainer.checkpoint import Checkpoint
from trainer.checkpoint_store import CheckpointError
from trainer.data import ArrayLoader, ArrayLoaderIterator
from trainer.evaluation import Evaluator
from trainer.events import Callback, CallbackList, DefaultInterval, last_value
from trainer.export import load_model, read_model_info
from trainer.optim import OptimConfig, make_optimizer, make_schedule
from trainer.state import TrainState
from trainer.trainer import Trainer

__all__ = [
    "ArrayLoader", "ArrayLoaderIterator", "Callback", "CallbackList", "Checkpoint", "CheckpointError",
    "DefaultInterval", "Evaluator", "OptimConfig", "TrainState", "Trainer", "export", "load_model", "losses",
    "last_value", "make_optimizer", "make_schedule", "optim", "read_model_info",
]
