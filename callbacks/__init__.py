"""Plug-ins for the Trainer: each reacts to events and none owns the loop.

``from callbacks import NAME`` for: ``Callback`` (the base class, defined in ``trainer.events``),
``MetricsLogger`` and the writers ``MetricWriter``, ``ConsoleWriter``, ``JsonlWriter``,
``CsvWriter``, ``TensorBoardWriter``; ``ProgressBar``, ``EpochSummary``, ``Evaluator``,
``GradNormMonitor``, ``NaNDetector``, ``EarlyStopping``, ``LambdaCallback`` (hooks as functions), ``LearningRateMonitor``, ``Throughput``,
``Profiler``, ``Plots``, ``PredictionGrid``, ``TextSamples``, ``Checkpoint`` (and its ``CheckpointError``).
"""

from trainer.checkpoint import Checkpoint
from trainer.checkpoint_store import CheckpointError
from trainer.evaluation import Evaluator
from trainer.events import Callback, DefaultInterval, last_value
from callbacks.early_stopping import EarlyStopping
from callbacks.epoch_summary import EpochSummary
from callbacks.grad_norm import GradNormMonitor, GradNormWarning
from callbacks.lambda_callback import LambdaCallback
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.metrics_logger import MetricsLogger
from callbacks.nan_detector import NaNDetector, NonFiniteError
from callbacks.plots import Plots
from callbacks.prediction_grid import PredictionGrid
from callbacks.profiler import Profiler
from callbacks.progress import ProgressBar
from callbacks.tensorboard import TensorBoardWriter
from callbacks.text_samples import TextSamples
from callbacks.throughput import Throughput
from callbacks.writers import ConsoleWriter, CsvWriter, JsonlWriter, MetricWriter, read_jsonl

__all__ = [
    "Callback", "Checkpoint", "CheckpointError", "ConsoleWriter", "CsvWriter", "DefaultInterval", "EarlyStopping",
    "EpochSummary", "Evaluator", "GradNormMonitor", "GradNormWarning", "JsonlWriter", "LambdaCallback", "LearningRateMonitor",
    "MetricWriter", "MetricsLogger", "NaNDetector", "NonFiniteError", "Plots", "PredictionGrid", "Profiler",
    "ProgressBar", "TensorBoardWriter", "TextSamples", "Throughput", "last_value", "read_jsonl",
]
