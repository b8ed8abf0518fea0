"""One benchmark variant in its own process: ``python -m benchmarks.worker WORKLOAD VARIANT``.

Started by ``benchmarks/suite.py``; speaks the line protocol of ``benchmarks/protocol.py``.
Variants: ``hand``, ``hand_scan10`` (hand-written loops); this project's ``trainer_bare``,
``trainer_default``, ``trainer_k10``, ``trainer_k10_inline`` (prefetch=0), ``trainer_bare_k10``,
``trainer_k10_chunk_guard`` (the guard checked once a chunk on any backend and model size),
``trainer_default_select_guard`` and ``trainer_k10_select_guard`` (the per-step guard a select
instead of a conditional; on a CPU a small model's chunk still checks once); ``trainer_default_unbounded``
and ``trainer_k10_unbounded`` (``dispatch_ahead=None``: the loop runs as far ahead as JAX lets it); ``keras``, ``keras_k10``
(Keras 3 on JAX), ``torch`` (a plain PyTorch loop), ``lightning`` (PyTorch Lightning).
The peers need ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import importlib
import os

from benchmarks.protocol import Pacer

VARIANTS = {
    "hand": ("benchmarks.jax_variants", "run_hand", {}),
    "hand_scan10": ("benchmarks.jax_variants", "run_hand", {"steps_per_execution": 10}),
    "hand_leaves": ("benchmarks.jax_variants", "run_hand", {"over_leaves": True}),
    "hand_leaves_scan10": ("benchmarks.jax_variants", "run_hand", {"over_leaves": True, "steps_per_execution": 10}),
    "trainer_bare": ("benchmarks.jax_variants", "run_trainer", {"callbacks": "none"}),
    "trainer_default": ("benchmarks.jax_variants", "run_trainer", {"callbacks": "default"}),
    "trainer_k10": ("benchmarks.jax_variants", "run_trainer", {"callbacks": "default", "steps_per_execution": 10}),
    "trainer_k10_inline": ("benchmarks.jax_variants", "run_trainer",
                           {"callbacks": "default", "steps_per_execution": 10, "prefetch": 0}),
    "trainer_bare_k10": ("benchmarks.jax_variants", "run_trainer", {"callbacks": "none", "steps_per_execution": 10}),
    "trainer_k10_chunk_guard": ("benchmarks.jax_variants", "run_trainer",
                                {"callbacks": "default", "steps_per_execution": 10, "chunk_guard": True}),
    "trainer_default_select_guard": ("benchmarks.jax_variants", "run_trainer",
                                     {"callbacks": "default", "guard_form": "select"}),
    "trainer_k10_select_guard": ("benchmarks.jax_variants", "run_trainer",
                                 {"callbacks": "default", "steps_per_execution": 10, "guard_form": "select"}),
    "trainer_default_unbounded": ("benchmarks.jax_variants", "run_trainer", {"callbacks": "default", "unbounded": True}),
    "trainer_k10_unbounded": ("benchmarks.jax_variants", "run_trainer",
                              {"callbacks": "default", "steps_per_execution": 10, "unbounded": True}),
    "keras": ("benchmarks.peers_keras", "run", {}),
    "keras_k10": ("benchmarks.peers_keras", "run", {"steps_per_execution": 10}),
    "torch": ("benchmarks.peers_torch", "run_plain", {}),
    "lightning": ("benchmarks.peers_torch", "run_lightning", {}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workload")
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--chunk", type=int, default=50, help="steps per timed chunk")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps after the first")
    args = parser.parse_args(argv)
    module, function, options = VARIANTS[args.variant]
    pacer = Pacer(args.chunk, args.warmup)
    getattr(importlib.import_module(module), function)(args.workload, pacer, **options)
    pacer.send({"event": "error", "message": "the training loop ended before the coordinator said stop"})
    os._exit(1)


if __name__ == "__main__":
    main()
