"""CPU tuning: dense layers' kernel gradients on sequences as one 2-D product (``trainer.dense_grads``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fit_with_and_without_cpu_tuning, layer_grads
from trainer.dense_grads import dot_general, eligible_denses, is_layer_product, is_sequence_product
from trainer.jaxprs import any_equation


def grads_of(function, layer: nnx.Module, x: np.ndarray, g: np.ndarray):
    return layer_grads(layer, "dot_general", function, x, g)


@pytest.mark.parametrize("make, shape, k", [
    (lambda: nnx.Linear(8, 12, rngs=nnx.Rngs(0)), (3, 5, 8), 1),                    # [batch, time, features]
    (lambda: nnx.Linear(8, 12, rngs=nnx.Rngs(0)), (2, 3, 5, 8), 1),                 # more leading axes
    (lambda: nnx.LinearGeneral(8, (4, 3), rngs=nnx.Rngs(0)), (3, 5, 8), 1),         # attention's q / k / v
    (lambda: nnx.LinearGeneral((4, 3), 8, axis=(-2, -1), rngs=nnx.Rngs(0)), (3, 5, 4, 3), 2),  # its output projection
])
def test_kernel_gradients_match_xla_and_the_rest_is_bitwise(make, shape, k):
    rng = np.random.default_rng(0)
    layer = make()
    x = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=layer(jnp.asarray(x)).shape).astype(np.float32)
    y, dx, dk = grads_of(dot_general, layer, x, g)
    y_xla, dx_xla, dk_xla = grads_of(jax.lax.dot_general, layer, x, g)
    np.testing.assert_array_equal(y, y_xla)
    np.testing.assert_array_equal(dx, dx_xla)
    assert dk.shape == dk_xla.shape
    np.testing.assert_allclose(dk, dk_xla, rtol=2e-5, atol=1e-5)
    # against the definition: every leading position's input times its output gradient, summed, in float64
    rows_x = x.reshape(-1, int(np.prod(x.shape[x.ndim - k:]))).astype(np.float64)
    rows_g = g.reshape(-1, int(np.prod(dk.shape[k:]))).astype(np.float64)
    np.testing.assert_allclose(dk, (rows_x.T @ rows_g).reshape(dk.shape), rtol=1e-4, atol=1e-4)


def test_products_without_a_sequence_axis_are_left_to_xla():
    rng = np.random.default_rng(0)
    layer = nnx.Linear(8, 12, rngs=nnx.Rngs(0))
    x = rng.normal(size=(5, 8)).astype(np.float32)  # [batch, features]: XLA's own gradient is as fast
    g = rng.normal(size=(5, 12)).astype(np.float32)
    for got, want in zip(grads_of(dot_general, layer, x, g), grads_of(jax.lax.dot_general, layer, x, g)):
        np.testing.assert_array_equal(got, want)
    seq = jax.make_jaxpr(lambda x: layer(x))(jnp.zeros((2, 3, 8)))
    flat = jax.make_jaxpr(lambda x: layer(x))(jnp.zeros((2, 8)))
    assert any_equation(seq, is_sequence_product) and not any_equation(flat, is_sequence_product)


class TinySequenceModel(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, tokens):
        return self.out(nnx.relu(self.hidden(self.embed(tokens)))).mean(axis=1)


def test_trainer_uses_them_on_cpu_says_so_and_stays_within_rounding_of_xla(capsys, monkeypatch):
    import trainer.dense_grads as dense_grads

    rewritten = []
    real = dense_grads._dense
    monkeypatch.setattr(dense_grads, "_dense", lambda x, kernel, k: rewritten.append(kernel.shape) or real(x, kernel, k))
    rng = np.random.default_rng(0)
    data = {"image": rng.integers(0, 11, (64, 6)).astype(np.int32), "label": rng.integers(0, 3, 64).astype(np.int32)}
    after_tuned = []
    runs = fit_with_and_without_cpu_tuning(lambda: TinySequenceModel(rngs=nnx.Rngs(0)), data, capsys,
                                           between=lambda: after_tuned.append(len(rewritten)))
    trainer, model, err = runs[True]
    assert any("dense layers on sequences" in note for note in trainer.cpu_settings)
    assert err.count("dense layers on sequences") == 1
    assert model.hidden.dot_general is jax.lax.dot_general  # the user's model is not changed
    assert len(eligible_denses(model)) == 2
    assert sorted(set(rewritten)) == [(8, 16), (16, 3)]  # both layers' products took the rewrite
    assert after_tuned == [len(rewritten)]  # and the untuned step, traced after, none
    trainer, _, err = runs[False]
    assert trainer.cpu_settings == [] and "CPU tuning" not in err
    tuned, plain = (jax.tree.leaves(runs[t][0].state.params) for t in (True, False))
    for a, b in zip(tuned, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


class FlatLayerBesideOwnProduct(nnx.Module):
    """A layer on flat inputs, and a 3-D product of the model's own that is no layer's."""

    def __init__(self, *, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.mix = nnx.Param(jax.random.normal(rngs.params(), (8, 5)) / 3)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, tokens):
        return self.head((self.embed(tokens) @ self.mix[...]).mean(axis=1))


def test_a_models_own_sequence_product_is_not_announced_as_a_layers(capsys):
    model = FlatLayerBesideOwnProduct(rngs=nnx.Rngs(0))
    step = jax.make_jaxpr(lambda t: model(t))(jnp.zeros((2, 6), jnp.int32))
    assert any_equation(step, is_sequence_product)  # the product has the form the rewrite takes...
    assert not any_equation(step, is_layer_product(eligible_denses(model)))  # ...but no layer's kernel
    rng = np.random.default_rng(0)
    data = {"image": rng.integers(0, 11, (64, 6)).astype(np.int32), "label": rng.integers(0, 3, 64).astype(np.int32)}
    trainer, _, err = fit_with_and_without_cpu_tuning(lambda: FlatLayerBesideOwnProduct(rngs=nnx.Rngs(0)), data,
                                                      capsys)[True]
    assert not any("dense layers" in note for note in trainer.cpu_settings)
    assert "dense layers" not in err
