"""Does loading overlap with training? ``python -m benchmarks.prefetch_overlap [--steps 20]``.

The MNIST CNN at batch 128, fed by an iterator that takes as long per batch as a step (it sleeps,
as a reader waiting on disk or a decoder in another process would). Measured, interleaved over
``--repeats`` rounds: the epoch with instant data (the step alone), the iterator alone, and the
epoch with that slow iterator at each ``prefetch`` depth. Without overlap the epoch would take
their sum; the target is at most 1.2x the longer of the two.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from benchmarks import workloads
from trainer import Trainer


class SlowBatches:
    """Re-iterable over ``batches`` that spends ``delay`` seconds producing each one."""

    def __init__(self, batches: list, delay: float):
        self.batches, self.delay = batches, delay

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


def epoch_seconds(trainer: Trainer, data) -> float:
    trainer.max_epochs += 1
    start = time.perf_counter()
    trainer.fit(data)
    jax.block_until_ready(trainer.state)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="batches per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    batches = workloads.batches("mnist_cnn")[:args.steps]
    trainers = {d: Trainer(workloads.jax_model("mnist_cnn"), workloads.jax_optimizer("mnist_cnn"), max_epochs=1,
                           prefetch=d) for d in args.depths}
    for trainer in trainers.values():
        trainer.fit(batches)  # compile
        jax.block_until_ready(trainer.state)
    step_alone = epoch_seconds(trainers[args.depths[0]], batches) / args.steps
    slow = SlowBatches(batches, step_alone)
    rows = {"step_only": [], "data_only": [], **{f"prefetch={d}": [] for d in args.depths}}
    for _ in range(args.repeats):
        rows["step_only"].append(epoch_seconds(trainers[args.depths[0]], batches))
        start = time.perf_counter()
        for _ in slow:
            pass
        rows["data_only"].append(time.perf_counter() - start)
        for d, trainer in trainers.items():
            rows[f"prefetch={d}"].append(epoch_seconds(trainer, slow))
    result = {"delay_per_batch_s": step_alone, "batches": args.steps, "seconds": rows}
    bound = [max(a, b) for a, b in zip(rows["step_only"], rows["data_only"])]
    for d in args.depths:
        ratios = [e / m for e, m in zip(rows[f"prefetch={d}"], bound)]
        result[f"prefetch={d}_over_longer"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        print(f"prefetch={d}: epoch / max(step-only, data-only) = {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}); sum would be "
              f"{statistics.median([(a + b) / m for a, b, m in zip(rows['step_only'], rows['data_only'], bound)]):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
