"""CPU tuning: random draws hashed with JAX's unrolled threefry (``trainer.threefry``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TinyMLP
from trainer import ArrayLoader, Trainer, threefry
from trainer.jaxprs import equations

pytestmark = pytest.mark.skipif(not threefry.available(), reason="this jax has no CPU threefry rule to swap")


def test_random_words_counts_threefry_draws_nested_and_legacy_keys():
    def draws(key, legacy_key, rbg_key):
        a = jax.jit(lambda k: jax.random.bernoulli(k, 0.5, (4, 8)))(key)     # 32 words inside a nested jit
        b = jax.random.uniform(legacy_key, (3, 5))                            # a raw uint32 key: 15
        c = jax.lax.scan(lambda k, _: (k, jax.random.normal(k, (2,))), key, length=7)[1]  # a loop body: 2
        d = jax.random.bits(rbg_key, (100,))                                  # another hash: not counted
        return a, b, c, d

    jaxpr = jax.make_jaxpr(draws)(jax.random.key(0), jax.random.PRNGKey(1), jax.random.key(2, impl="rbg"))
    assert threefry.random_words(equations(jaxpr)) == 32 + 15 + 2


def _draw(key, shape=(257,)):
    """A draw's lowered text and its bits, from a fresh function (JAX caches a function's lowering)."""
    lowered = jax.jit(lambda k: jax.random.bits(k, shape)).lower(key)
    return lowered.as_text(), lowered.compile()(key)


def test_the_swap_is_scoped_reentrant_and_gives_the_same_bits():
    key = jax.random.key(3)
    rolled, bits = _draw(key)
    assert "while" in rolled  # JAX's CPU lowering: a rolled loop
    with threefry.unrolled_on_cpu():
        with threefry.unrolled_on_cpu():
            pass
        inner, unrolled_bits = _draw(key)  # still swapped after the nested exit
    assert "while" not in inner and "optimization_barrier" in inner
    assert "while" in _draw(key)[0]  # restored
    np.testing.assert_array_equal(unrolled_bits, bits)


def _fit(tuning: bool, data, k: int):
    model = TinyMLP(dropout=0.5, rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.adam(1e-2), max_steps=8, steps_per_execution=k, cpu_tuning=tuning)
    trainer.fit(ArrayLoader(data, 8, seed=0))
    return trainer, model


@pytest.mark.parametrize("k", [1, 2])
def test_a_step_drawing_enough_words_hashes_them_unrolled_with_the_same_result(k, data, capsys, monkeypatch):
    monkeypatch.setattr(threefry, "UNROLL_MIN_WORDS", 8 * 16)  # the tiny model's dropout mask: 128 words
    lowered = []  # the unrolled rule, counting its uses: the trainer's compilation must go through it
    rule = threefry._UNROLLED.rule
    monkeypatch.setattr(threefry, "_UNROLLED", type(threefry._UNROLLED)(
        lambda ctx, *args: lowered.append(ctx.avals_out[0].shape) or rule(ctx, *args), False))
    tuned, tuned_model = _fit(True, data, k)
    assert (8, 16) in lowered or (4, 8, 16) in lowered  # the hash behind the dropout mask, unrolled
    err = capsys.readouterr().err
    assert any("threefry" in note and "128 random words" in note for note in tuned.cpu_settings)
    assert err.count("unrolled threefry") == 1 and "cpu_tuning=False" in err
    assert isinstance(tuned._train_steps.single, threefry.unrolled_calls)
    count = len(lowered)
    plain, plain_model = _fit(False, data, k)
    assert len(lowered) == count  # JAX's own lowering without the tuning
    assert plain.cpu_settings == [] and not isinstance(plain._train_steps.single, threefry.unrolled_calls)
    for a, b in zip(jax.tree.leaves(nnx.state(tuned_model, nnx.Param)), jax.tree.leaves(nnx.state(plain_model, nnx.Param))):
        np.testing.assert_array_equal(a, b)  # the same dropout masks, step for step
    assert tuned.step == plain.step == 8
    assert "while" in _draw(jax.random.key(0))[0]  # the process keeps JAX's rule


def test_small_draws_keep_jax_lowering(data, capsys):
    trainer, _ = _fit(True, data, 1)
    assert not any("threefry" in note for note in trainer.cpu_settings) and "threefry" not in capsys.readouterr().err
    assert not isinstance(trainer._train_steps.single, threefry.unrolled_calls)
    assert threefry.UNROLL_MIN_WORDS > 128


def test_a_model_without_random_draws_counts_none():
    model = TinyMLP(rngs=nnx.Rngs(0))
    jaxpr = jax.make_jaxpr(lambda x: model(x))(jnp.zeros((4, 8)))
    assert threefry.random_words(equations(jaxpr)) == 0
