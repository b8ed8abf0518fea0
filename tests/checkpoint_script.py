"""A small training run for the checkpoint tests, driven from a subprocess.

``python checkpoint_script.py WORKDIR STEPS [--kill-at N] [--term-at N] [--resume] [--out FILE]``
trains a dropout MLP with AdamW and a NaNDetector, checkpointing every 3 steps, and can kill or
signal itself after step N. ``--out`` writes the final parameters and optimizer state (npz).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np
import optax
from flax import nnx

from callbacks import Callback, Checkpoint, JsonlWriter, MetricsLogger, NaNDetector
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, Trainer


class SignalAt(Callback):
    """Sends ``sig`` after step ``step``; with ``again``, once more while the preemption save runs."""

    def __init__(self, step: int, sig: int, again: bool = False):
        self.step, self.sig, self.again = step, sig, again

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            jax.block_until_ready(metrics)
            os.kill(os.getpid(), self.sig)

    def on_checkpoint_save(self, trainer, checkpoint):
        if self.again and trainer.step == self.step:
            self.again = False
            os.kill(os.getpid(), self.sig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--term-at", type=int)
    parser.add_argument("--int-twice-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    callbacks = [MetricsLogger([JsonlWriter(os.path.join(args.workdir, "metrics.jsonl"))], log_every=2),
                 NaNDetector(), Checkpoint(every_n_steps=3, every_n_epochs=None, max_to_keep=2)]
    if args.kill_at:
        callbacks.append(SignalAt(args.kill_at, signal.SIGKILL))
    if args.term_at:
        callbacks.append(SignalAt(args.term_at, signal.SIGTERM))
    if args.int_twice_at:
        callbacks.append(SignalAt(args.int_twice_at, signal.SIGINT, again=True))
    trainer = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=args.steps,
                      workdir=args.workdir, callbacks=callbacks)
    trainer.fit(ArrayLoader(make_data(), 16, seed=1), resume=args.resume)
    if args.out:
        leaves = jax.tree.leaves((trainer.state.params, trainer.state.opt_state, trainer.state.model_state))
        leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in leaves]
        np.savez(args.out, *[np.asarray(x) for x in leaves])


if __name__ == "__main__":
    main()
