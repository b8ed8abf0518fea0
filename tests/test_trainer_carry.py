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
    # the state is never rebuilt inside the loop (a rebuild per step would give 18 or more), nor the
    # sums: a logger's window (9) and an epoch's end (3) take their part of the packed sums
    assert rebuilt["state"] <= 2
    assert rebuilt["sums"] == 0


def test_taking_one_readers_sums_from_the_flat_carry_leaves_the_others_exact(data):
    """``take_metric_sums`` on the packed sums gives what the structured sums held and zeroes only them."""
    class Reader(Callback):  # a window that is never taken during fit
        def on_fit_start(self, trainer):
            trainer.add_metric_sums("mine")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=5, callbacks=[Reader()])
    trainer.fit(ArrayLoader(data, 16))
    assert trainer._carry._sums_flat is not None  # still flat after fit: the take below is the packed one
    before = jax.device_get(trainer._carry._sums_flat[0].unpacked(*trainer._carry._sums_flat[1:]))
    name = "mine"
    taken = jax.device_get(trainer.take_metric_sums(name))
    assert trainer._carry._sums_flat is not None  # not rebuilt
    assert jax.tree.structure(taken) == jax.tree.structure(before[name])
    for x, y in zip(jax.tree.leaves(taken), jax.tree.leaves(before[name])):
        np.testing.assert_array_equal(x, y)
    assert any(float(m.count) > 0 for m in taken.values())
    after = jax.device_get(trainer._sums)
    assert all(float(x) == 0 for x in jax.tree.leaves(after[name]))
    for x, y in zip(jax.tree.leaves(after["epoch"]), jax.tree.leaves(before["epoch"])):
        np.testing.assert_array_equal(x, y)


def test_sums_taken_packed_read_back_as_the_tree_and_cost_one_device_read(data):
    """``take_metric_sums(name, packed=True)`` hands the same values over packed: a ``LaggedFetch``
    reads them back as the tree, from one array per dtype, with no packing call of its own."""
    from callbacks.lagged import LaggedFetch
    from trainer.packing import Packed

    class Readers(Callback):
        def on_fit_start(self, trainer):
            trainer.add_metric_sums("a")
            trainer.add_metric_sums("b")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=5, callbacks=[Readers()])
    trainer.fit(ArrayLoader(data, 16))
    packed = trainer.take_metric_sums("a", packed=True)
    tree = jax.device_get(trainer.take_metric_sums("b"))  # both readers saw the same 5 steps
    assert isinstance(packed, Packed) and len(packed.arrays) == 2  # float32 totals, int32 counts
    fetch = LaggedFetch()
    fetch.push(5, packed)
    step, values = fetch.pop()
    assert step == 5 and fetch.fetches == 1
    assert jax.tree.structure(values) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(values), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(x, y)
    assert float(values["loss"].count) == 5
    again = trainer.take_metric_sums("a", packed=True)  # restarted at zero
    assert all(float(np.asarray(a).sum()) == 0 for a in again.arrays)
