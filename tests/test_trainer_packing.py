"""Small leaves of the state and sums travel packed, one array per dtype; unpacking gives them back exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TinyMLP
from callbacks import GradNormMonitor, LearningRateMonitor, MetricsLogger, NaNDetector
from trainer import ArrayLoader, Callback, Trainer, make_optimizer
from trainer.packing import SMALL, Layout


def mixed_tree():
    return {"step": jnp.asarray(7, jnp.int32), "lr": jnp.float32(0.25), "halted": jnp.asarray(True),
            "scale": jnp.asarray(1.5, jnp.bfloat16), "count": np.array(3, np.int32),
            "weights": jnp.ones((SMALL + 1,), jnp.float32), "key": jax.random.key(0)}


def test_split_and_unpack_give_back_every_leaf_exactly():
    tree = mixed_tree()
    layout, large, packed = Layout.split(tree)
    assert len(packed) == 4  # int32, float32, bool, bfloat16: one array per dtype of the small leaves
    back = layout.unpacked(large, packed)
    assert back["weights"] is tree["weights"]  # large arrays are not copied
    assert jnp.array_equal(jax.random.key_data(back["key"]), jax.random.key_data(tree["key"]))
    for name in ("step", "lr", "halted", "scale", "count"):
        assert back[name].dtype == tree[name].dtype and back[name].shape == tree[name].shape, name
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(tree[name]))


def test_equal_layouts_are_one_object():
    first, _, _ = Layout.split(mixed_tree())
    second, _, _ = Layout.split(mixed_tree())
    assert first is second
    other, _, _ = Layout.split({**mixed_tree(), "step": jnp.zeros((), jnp.float32)})
    assert other is not first and other != first


def test_a_compiled_function_joins_and_splits_with_the_same_layout():
    tree = mixed_tree()
    layout, large, packed = Layout.split(tree)

    @jax.jit
    def advance(large, packed):
        t = layout.join(large, packed)
        t = dict(t, step=t["step"] + 1, lr=t["lr"] * 2, scale=t["scale"] + 1)
        return layout.split_traced(t)

    back = layout.unpacked(*advance(large, packed))
    assert int(back["step"]) == 8 and back["step"].dtype == jnp.int32
    assert float(back["lr"]) == 0.5
    assert float(back["scale"]) == 2.5 and back["scale"].dtype == jnp.bfloat16


def test_a_step_that_changes_a_small_leafs_shape_is_refused_by_name():
    layout, large, packed = Layout.split(mixed_tree())

    def grow(large, packed):
        t = layout.join(large, packed)
        return layout.split_traced(dict(t, count=jnp.zeros((3,), jnp.int32)))

    with pytest.raises(ValueError, match=r"changed the shape of a state leaf from \(\) to \(3,\)"):
        jax.jit(grow)(large, packed)


def test_the_train_step_moves_only_large_leaves_and_one_array_per_dtype(data):
    class Carried(Callback):  # what the last step handed back, before the fit's end reads it
        def on_step_end(self, trainer, step, metrics):
            self.state, self.sums = trainer._carry._state_flat, trainer._carry._sums_flat

    carried = Carried()
    logger = MetricsLogger([], log_every=2)  # hands its sums over every 2 steps: a new split each time
    callbacks = [NaNDetector(policy="skip"), GradNormMonitor(every=2), LearningRateMonitor(), carried, logger]
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), make_optimizer("adamw", learning_rate=1e-2), max_epochs=3,
                      callbacks=callbacks)
    trainer.fit(ArrayLoader(data, 16))
    _, state_large, state_packed = carried.state
    _, sums_large, sums_packed = carried.sums
    state_leaves = jax.tree.leaves(trainer.state)
    small = [x for x in state_leaves if x.size <= SMALL and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)]
    assert len(small) >= 10  # step, guard, optimizer count and hyperparameters, RNG count...
    assert len(state_packed) == len({x.dtype for x in small}) and len(state_large) == len(state_leaves) - len(small)
    assert sums_large == [] and len(sums_packed) <= 2
    assert trainer._train_steps.single._cache_size() == 1  # 9 hand-overs of the sums, one compiled step


def test_packed_training_matches_a_plain_optax_loop(data):
    """The trainer (packed carry) and a hand-written optax loop give the same parameters.

    To float tolerance, not bitwise: they are different XLA programs, whose fusions may contract
    a multiply-add differently. A packed scalar put back in the wrong place (a learning rate for
    a decay rate) would be off by far more.
    """
    model = TinyMLP(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=6)
    trainer.fit(ArrayLoader(data, 16, shuffle=False))

    def loss_fn(p, batch):
        logits = nnx.merge(graphdef, p, rest)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    @jax.jit
    def step(p, opt, batch):
        grads = jax.grad(loss_fn)(p, batch)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(params)
    for batch, _ in zip(ArrayLoader(data, 16, shuffle=False), range(6)):
        params, opt = step(params, opt, batch)
    for ours, theirs in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unroll", [1, True])
def test_scan_packed_gives_each_step_output_as_a_plain_scan_does(unroll):
    """The step's scalar outputs leave the loop packed, one row per dtype: sliced apart they are exactly
    what ``lax.scan`` stacks, in their dtypes, beside outputs that do not pack (vectors, PRNG keys)."""
    from trainer.packing import scan_packed

    tree = mixed_tree()
    layout, large, packed = Layout.split(tree)

    def step(t, x):
        t = dict(t, step=t["step"] + 1, lr=t["lr"] * x)
        out = {"loss": t["lr"] * 3, "count": t["step"] * 2, "ok": t["lr"] > 1, "half": t["scale"] / 2,
               "vector": t["weights"] * x, "key": jax.random.fold_in(t["key"], t["step"]),
               "nested": {"weak": x + 1.0}}
        return t, out

    xs = jnp.asarray([0.5, 2.0, 4.0, 8.0], jnp.float32)
    (large_end, packed_end), got = jax.jit(lambda a, p: scan_packed(step, layout, (a, p), xs, unroll=unroll))(
        large, packed)
    end, want = jax.lax.scan(step, tree, xs)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for name in ("loss", "count", "ok", "half", "vector"):
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
    np.testing.assert_array_equal(np.asarray(got["nested"]["weak"]), np.asarray(want["nested"]["weak"]))
    assert jnp.array_equal(jax.random.key_data(got["key"]), jax.random.key_data(want["key"]))
    back = layout.unpacked(large_end, packed_end)
    assert int(back["step"]) == int(end["step"]) == 11 and float(back["lr"]) == float(end["lr"])
