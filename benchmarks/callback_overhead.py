"""Steps/s of the MNIST recipe with its default callbacks against the same run with none.

Both trainers are built and compiled first; then they take turns running chunks of ``chunk``
steps (A, B, A, B, ...; ``fit`` continues mid-epoch), each chunk timed between finished steps, so
machine noise hits both alike. End-of-fit work (plots) is left out: this measures the per-step cost.
``python benchmarks/callback_overhead.py [chunks] [chunk]`` prints the per-chunk ratios' median.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Callable

import jax

from callbacks import Callback, Plots, PredictionGrid
from recipes.datasets import load_mnist_bundled
from recipes.mnist import MnistConfig, build, default_callbacks


class ChunkTimer(Callback):
    """Waits for the device at the start and end of each ``fit`` call and records the time."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = None

    def on_fit_start(self, trainer):
        jax.block_until_ready(trainer.state)
        self._start = time.perf_counter()

    def on_fit_end(self, trainer):
        jax.block_until_ready(trainer.state)
        self.seconds.append(time.perf_counter() - self._start)


def make_trainer(callbacks: Callable[[MnistConfig, dict], list], train: dict, test: dict):
    config = MnistConfig(workdir=tempfile.mkdtemp(), progress=False, max_steps=1)
    timer = ChunkTimer()
    trainer, loader, _ = build(config, train, test, callbacks=[*callbacks(config, test), timer])
    trainer.fit(loader)  # compile
    return trainer, loader, timer


def per_step_defaults(config: MnistConfig, test: dict) -> list:
    """The recipe's default callbacks, less the end-of-fit plots."""
    return [cb for cb in default_callbacks(config, test) if not isinstance(cb, (Plots, PredictionGrid))]


def compare(variants: dict[str, Callable], chunks: int = 12, chunk: int = 20) -> dict[str, list[float]]:
    train, test = load_mnist_bundled()
    runs = {name: make_trainer(make, train, test) for name, make in variants.items()}
    for _ in range(chunks):
        for trainer, loader, _ in runs.values():
            trainer.max_steps = trainer.step + chunk
            trainer.fit(loader)
    return {name: [chunk / s for s in timer.seconds[1:]] for name, (_, _, timer) in runs.items()}


def main(chunks: int = 12, chunk: int = 20) -> None:
    rates = compare({"none": lambda config, test: [], "defaults": per_step_defaults}, chunks, chunk)
    ratios = [d / n for d, n in zip(rates["defaults"], rates["none"])]
    print(f"no callbacks: median {statistics.median(rates['none']):.3f} steps/s; default callbacks: "
          f"median {statistics.median(rates['defaults']):.3f} steps/s")
    print(f"ratio default/none: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}) over {chunks} interleaved chunks of {chunk} steps")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
