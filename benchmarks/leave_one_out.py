"""Which of the default callbacks costs what: steps/s of callback sets inside one long run each.

``python -m benchmarks.leave_one_out --workload transformer --steps-per-execution 10 bare default
without:Checkpoint only:Checkpoint`` builds one Trainer per set (the recipe's defaults as the suite uses them,
``benchmarks.jax_variants.default_callbacks``) and then, round after round, lets each train
``--window`` steps timed between two waits for the device; the sets take turns, so machine noise hits
all alike. Saves, logging windows and epoch ends inside the window count; compiling and the end of
``fit`` (its final save, plots) do not. A set is ``bare`` (no callbacks), ``default``, ``without:A,B``
(the defaults without the classes ``A`` and ``B``) or ``only:A,B``. Ratios are to the first set.

This found the transformer's saves costing 19-28% of its steps on a GPU (``benchmarks/HISTORY.md``,
"On a GPU, fourth run"), where the suite had shown only that the defaults cost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
import warnings
from typing import Any, Sequence

import jax

from trainer import Callback, Trainer


def choose_callbacks(defaults: Sequence[Any], spec: str) -> list:
    """The callbacks ``spec`` names out of ``defaults`` (see the module docstring); unknown names are an error."""
    if spec == "bare":
        return []
    if spec == "default":
        return list(defaults)
    kind, _, listed = spec.partition(":")
    if kind not in ("without", "only") or not listed:
        raise ValueError(f"callback set {spec!r}: use bare, default, without:Name,Name or only:Name,Name.")
    names = set(listed.split(","))
    known = {type(c).__name__ for c in defaults}
    if names - known:
        raise ValueError(f"callback set {spec!r} names {sorted(names - known)}, not among the defaults {sorted(known)}.")
    keep = (lambda c: type(c).__name__ in names) if kind == "only" else (lambda c: type(c).__name__ not in names)
    return [c for c in defaults if keep(c)]


class Window(Callback):
    """Times ``steps`` steps from ``start`` on, waiting for the device at both ends, then stops ``fit``."""

    def __init__(self, steps: int):
        self.steps, self.start, self.seconds = steps, None, []
        self._started = 0.0

    def on_step_end(self, trainer, step, metrics):
        if self.start is None or step < self.start:
            return
        if step == self.start:
            jax.block_until_ready(metrics["loss"])
            self._started = time.perf_counter()
        elif step == self.start + self.steps:
            jax.block_until_ready(metrics["loss"])
            self.seconds.append(time.perf_counter() - self._started)
            trainer.should_stop = True


def build(workload: str, spec: str, steps_per_execution: int, window: int, warmup: int,
          scratch: str | None = None) -> tuple[Trainer, Window]:
    from benchmarks import workloads
    from benchmarks.jax_variants import default_callbacks

    workdir = tempfile.mkdtemp(prefix=f"loo-{workload}-", dir=scratch)
    timer = Window(window)
    trainer = Trainer(workloads.jax_model(workload), workloads.jax_optimizer(workload), max_steps=warmup,
                      max_epochs=10**9, workdir=workdir, steps_per_execution=steps_per_execution,
                      callbacks=[*choose_callbacks(default_callbacks(workload, workdir), spec), timer])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(workloads.batches(workload))  # compiles
    return trainer, timer


def run(workload: str, specs: Sequence[str], steps_per_execution: int = 1, window: int = 300,
        rounds: int = 4, warmup: int | None = None) -> dict[str, list[float]]:
    """Seconds of each set's window, round by round (the sets take turns within a round)."""
    k = steps_per_execution
    warmup = warmup if warmup is not None else 2 * k
    if window % k or warmup % k:
        raise ValueError(f"window={window} and warmup={warmup} must be multiples of steps_per_execution={k}.")
    with tempfile.TemporaryDirectory(prefix=f"loo-{workload}-") as scratch:  # the runs' logs, removed at the end
        return _run(workload, specs, k, window, rounds, warmup, scratch)


def _run(workload: str, specs: Sequence[str], k: int, window: int, rounds: int, warmup: int,
         scratch: str) -> dict[str, list[float]]:
    from benchmarks import workloads
    from benchmarks.jax_variants import default_callbacks

    defaults = default_callbacks(workload, scratch)
    for spec in specs:  # a misspelt set fails before anything compiles
        choose_callbacks(defaults, spec)
    built = {spec: build(workload, spec, k, window, warmup, scratch) for spec in specs}
    batches = workloads.batches(workload)
    for r in range(rounds):
        for spec in list(specs[r % len(specs):]) + list(specs[:r % len(specs)]):
            trainer, timer = built[spec]
            timer.start = trainer.step + warmup
            trainer.max_steps = timer.start + window + k
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*cannot seek")  # a fresh pass of the list is fine here
                trainer.fit(batches)
            trainer.should_stop = False
    return {spec: built[spec][1].seconds for spec in specs}


def table(seconds: dict[str, list[float]], window: int) -> str:
    """Markdown: steps/s median (min-max) and the per-round ratio to the first set."""
    specs = list(seconds)
    base = seconds[specs[0]]
    lines = [f"| callbacks | steps/s median (min-max) | ratio to {specs[0]} (min-max) |", "|---|---|---|"]
    for spec in specs:
        rates = [window / s for s in seconds[spec]]
        ratios = [b / s for s, b in zip(seconds[spec], base)]
        lines.append(f"| {spec} | {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) | "
                     f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="+", help="bare, default, without:Name,Name or only:Name,Name")
    parser.add_argument("--workload", default="transformer", choices=["mnist_cnn", "transformer", "mlp"])
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--window", type=int, default=300, help="timed steps per set and round")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    seconds = run(args.workload, args.sets, args.steps_per_execution, args.window, args.rounds)
    print(f"{args.workload}, steps_per_execution={args.steps_per_execution}, {args.window} steps a window, "
          f"{args.rounds} rounds, {jax.devices()[0].device_kind}")
    print(table(seconds, args.window))


if __name__ == "__main__":
    main()
