"""The loop keeps state and running sums flat between steps; reading or replacing them stays exact."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from conftest import TinyMLP
from callbacks import MetricsLogger
from trainer import ArrayLoader, Callback, Trainer
from trainer.carry import Carry


class ReadsState(Callback):
    """Reads the structured state after every step, and hands it back (through the setter) every third."""

    def on_step_end(self, trainer, step, metrics):
        params = trainer.state.params
        assert jax.tree.leaves(params)  # structured: nnx.State with its Variables
        if step % 3 == 0:
            trainer.state = trainer.state.replace(params=params)


def train(data, callbacks=()):
    trainer = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=14,
                      callbacks=list(callbacks))
    trainer.fit(ArrayLoader(data, 16, seed=1))
    return trainer


def test_reading_and_replacing_the_state_between_steps_changes_nothing(data):
    plain, reading = train(data), train(data, [ReadsState()])
    for x, y in zip(jax.tree.leaves(jax.device_get(plain.state.params)),
                    jax.tree.leaves(jax.device_get(reading.state.params))):
        np.testing.assert_array_equal(x, y)
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in reading.history]
    assert int(reading.state.step) == 14


def test_the_loop_does_not_rebuild_the_structured_state_every_step(data, monkeypatch):
    rebuilt = {"state": 0, "sums": 0}

    def counting(kind, original):
        def structure(self):
            rebuilt[kind] += getattr(self, f"_{kind}_flat") is not None
            original(self)
        return structure

    monkeypatch.setattr(Carry, "_structure_state", counting("state", Carry._structure_state))
    monkeypatch.setattr(Carry, "_structure_sums", counting("sums", Carry._structure_sums))
    logger = MetricsLogger([], log_every=2)  # takes its window's sums every 2 steps
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=3, callbacks=[logger])
    trainer.fit(ArrayLoader(data, 16))  # 6 steps an epoch, 18 in all
    assert trainer.step == 18
    # the state is never rebuilt inside the loop (a rebuild per step would give 18 or more), and the
    # sums only when read: every logger window (9) and every epoch's end (3)
    assert rebuilt["state"] <= 2
    assert rebuilt["sums"] <= 9 + 3
