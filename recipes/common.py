"""What every recipe shares: the standard logging and monitoring callbacks and the run config."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from callbacks import (ConsoleWriter, GradNormMonitor, JsonlWriter, LearningRateMonitor, MetricsLogger, NaNDetector,
                       ProgressBar, TensorBoardWriter, Throughput)

RUN_CONTROL = ("resume", "export", "progress", "steps_per_execution")
"""Flags that steer one invocation, not the run: left out of the config a resumed run compares."""


def run_config(config: Any) -> dict:
    """The recipe config as plain values, without the run-control flags."""
    values = dataclasses.asdict(config)
    for key in RUN_CONTROL:
        values.pop(key, None)
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


def fresh_workdir(config: Any) -> Any:
    """``config`` with its workdir moved to a fresh sibling (``runs/mnist-2``, ...) when it is the
    recipe's default, already holds an earlier run, and ``resume`` is off: running a recipe twice
    starts a second run instead of overwriting the first. A workdir given explicitly that holds a
    run is a ``UsageError`` without ``--resume``: a fresh run would mix its logs and checkpoints
    into the earlier run's (with or without ``--checkpoint``)."""
    from recipes.config_cli import UsageError

    workdir = config.workdir
    default = type(config).__dataclass_fields__["workdir"].default
    if not workdir or config.resume or not holds_a_run(Path(workdir)):
        return config
    if workdir != default:
        found = [name for name in RUN_OUTPUTS if _holds(Path(workdir) / name)]
        advice = ("Continue it with --resume, or choose another --workdir." if "checkpoints" in found else
                  "It has no checkpoints to continue from: choose another --workdir, or move the old one away.")
        raise UsageError(f"--workdir {workdir} holds an earlier run ({', '.join(found)}): a fresh run would mix "
                         f"its logs and checkpoints into it. {advice}")
    n = 2
    while holds_a_run(Path(f"{workdir}-{n}")):
        n += 1
    fresh = f"{workdir}-{n}"
    print(f"{workdir} holds an earlier run: this one writes to {fresh} (--resume continues {workdir}; "
          "--workdir chooses the folder)", file=sys.stderr, flush=True)
    return dataclasses.replace(config, workdir=fresh)


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
