"""What every recipe shares: the standard logging and monitoring callbacks, the run config, its workdir."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from callbacks import (ConsoleWriter, GradNormMonitor, JsonlWriter, LearningRateMonitor, MetricsLogger, NaNDetector,
                       ProgressBar, TensorBoardWriter, Throughput)

RUN_CONTROL = ("resume", "export", "progress", "steps_per_execution")
"""Flags that steer one invocation, not the run: left out of the config a resumed run compares."""


class DefaultWorkdir(str):
    """A recipe's default ``--workdir`` (``runs/mnist``), a ``str`` everywhere else: left at it, a second run
    moves to a fresh sibling; the same folder given explicitly (``--workdir runs/mnist``) is refused when
    it holds a run. The flag's presence decides, not the string (``recipes.runs.prepare_workdir``)."""


def run_config(config: Any) -> dict:
    """The recipe config as plain values, without the run-control flags."""
    values = dataclasses.asdict(config)
    for key in RUN_CONTROL:
        values.pop(key, None)
    if isinstance(values.get("workdir"), str):
        values["workdir"] = str(values["workdir"])  # a plain string, default or not
    return values


def standard_callbacks(workdir: str | None, *, log_every: int, progress: bool, tensorboard: bool = True,
                       grad_norm: bool = True, nan_policy: str = "raise") -> list:
    """Progress bar, console + JSONL + TensorBoard logging, learning rate, throughput, NaN checks, grad norm."""
    folder = Path(workdir) if workdir else None
    writers = [ConsoleWriter()]
    if folder is not None:
        writers.append(JsonlWriter(folder / "metrics.jsonl"))
        if tensorboard:
            writers.append(TensorBoardWriter(folder / "tb"))
    callbacks = [MetricsLogger(writers, log_every=log_every), LearningRateMonitor(), Throughput(every=log_every),
                 NaNDetector(policy=nan_policy)]
    if progress:
        callbacks.insert(0, ProgressBar())
    if grad_norm:
        callbacks.append(GradNormMonitor(every=log_every))
    return callbacks


RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tb", "plots")
"""What a recipe's run leaves in its workdir: a folder holding any of them holds a run."""


def holds_a_run(path: Path) -> bool:
    """Whether ``path`` holds what a recipe's run leaves (``RUN_OUTPUTS``, not empty: a run that failed
    before writing anything left nothing to mix with)."""
    return any(_holds(path / name) for name in RUN_OUTPUTS)


def _holds(output: Path) -> bool:
    if output.name == "checkpoints":
        return output.is_dir() and any(output.glob("step_*"))
    if output.is_dir():
        return any(output.iterdir())
    return output.is_file() and output.stat().st_size > 0


def build_optimizer(optim: Any, total_steps: int) -> Any:
    """``optim.build`` over the run's ``total_steps`` (at least past the warmup, which a schedule needs),
    warning when the run ends inside its warmup: the rate would never reach the peak the flags name."""
    if total_steps <= optim.warmup_steps:
        warnings.warn(f"the run's {total_steps} steps end inside the --warmup-steps {optim.warmup_steps} warmup: the "
                      f"learning rate never reaches --learning-rate {optim.learning_rate} (lower --warmup-steps).",
                      stacklevel=3)
    return optim.build(total_steps=max(total_steps, optim.warmup_steps + 1))
