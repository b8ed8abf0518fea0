"""CPU tuning: convolution kernel gradients as matrix products (``trainer.conv_grads``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fit_with_and_without_cpu_tuning, layer_grads
from trainer.conv_grads import conv_general_dilated, eligible_convs, plan


def grads_of(function, layer: nnx.Module, x: np.ndarray, g: np.ndarray):
    return layer_grads(layer, "conv_general_dilated", function, x, g)


@pytest.mark.parametrize("kernel, channels, padding, how", [
    ((3, 3), 1, "SAME", "stacked"),     # a first layer: taps x channels <= 32
    ((5, 5), 1, "VALID", "stacked"),
    ((1, 1), 96, "SAME", "stacked"),    # a 1x1 kernel: its gradient is one product at any width
    ((3, 3), 8, "SAME", "shifted"),     # one product per tap
    ((3, 3), 16, ((2, 0), (1, 1)), "shifted"),  # explicit, uneven padding
])
def test_kernel_gradients_match_xla_and_the_rest_is_bitwise(kernel, channels, padding, how):
    assert plan((*kernel, channels, 6)) == how
    rng = np.random.default_rng(0)
    conv = nnx.Conv(channels, 6, kernel_size=kernel, padding=padding, rngs=nnx.Rngs(0))
    x = rng.normal(size=(4, 9, 7, channels)).astype(np.float32)
    y_ref = conv(jnp.asarray(x))
    g = rng.normal(size=y_ref.shape).astype(np.float32)
    y, dx, dw = grads_of(conv_general_dilated, conv, x, g)
    y_xla, dx_xla, dw_xla = grads_of(jax.lax.conv_general_dilated, conv, x, g)
    np.testing.assert_array_equal(y, y_xla)  # the forward pass is XLA's own
    np.testing.assert_array_equal(dx, dx_xla)  # and so is the input gradient
    assert dw.shape == dw_xla.shape and dw.dtype == dw_xla.dtype
    np.testing.assert_allclose(dw, dw_xla, rtol=2e-5, atol=1e-5)
    # against the definition: sum over batch and pixels of the padded input window times the output gradient
    pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel, (1, 1), padding) if isinstance(padding, str) else padding
    xp = np.pad(x.astype(np.float64), ((0, 0), *pads, (0, 0)))
    oh, ow = g.shape[1:3]
    i, j = kernel[0] - 1, kernel[1] - 1  # the last tap
    expected = np.einsum("nhwc,nhwo->co", xp[:, i:i + oh, j:j + ow, :], g.astype(np.float64))
    np.testing.assert_allclose(dw[i, j], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(strides=(2, 2)), dict(kernel_dilation=(2, 2)), dict(feature_group_count=2),
                                     dict(padding=((-1, 1), (1, 1)))])
def test_other_convolutions_are_left_to_xla(options):
    rng = np.random.default_rng(0)
    conv = nnx.Conv(4, 6, kernel_size=(3, 3), rngs=nnx.Rngs(0), **options)
    if "padding" not in options:  # a negative (cropping) padding is seen only when called
        assert eligible_convs(conv) == []
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    g = rng.normal(size=conv(jnp.asarray(x)).shape).astype(np.float32)
    for got, want in zip(grads_of(conv_general_dilated, conv, x, g), grads_of(jax.lax.conv_general_dilated, conv, x, g)):
        np.testing.assert_array_equal(got, want)  # the same program: nothing of the rewrite runs


def test_stacked_windows_too_large_for_memory_keep_xlas_gradient(monkeypatch):
    import trainer.conv_grads as conv_grads

    rng = np.random.default_rng(0)
    conv = nnx.Conv(1, 6, kernel_size=(3, 3), rngs=nnx.Rngs(0))
    x = rng.normal(size=(4, 9, 7, 1)).astype(np.float32)
    g = rng.normal(size=conv(jnp.asarray(x)).shape).astype(np.float32)
    calls = []
    real = conv_grads._conv_matmul_grad
    monkeypatch.setattr(conv_grads, "_conv_matmul_grad", lambda *args: calls.append(args[3]) or real(*args))
    grads_of(conv_general_dilated, conv, x, g)
    assert calls == ["stacked"]
    monkeypatch.setattr(conv_grads, "STACKED_MAX_BYTES", 4 * 9 * 7 * 9 * 4 - 1)  # one byte short of these windows
    np.testing.assert_array_equal(grads_of(conv_general_dilated, conv, x, g)[2],
                                  grads_of(jax.lax.conv_general_dilated, conv, x, g)[2])
    assert calls == ["stacked"]  # not called again: XLA's own gradient


def test_wide_kernels_and_custom_convolutions_are_not_eligible():
    rngs = nnx.Rngs(0)
    wide = nnx.Conv(128, 8, kernel_size=(3, 3), rngs=rngs)  # 128 input channels: XLA's own measured faster
    custom = nnx.Conv(1, 8, kernel_size=(3, 3), conv_general_dilated=lambda *a, **k: jax.lax.conv_general_dilated(*a, **k),
                      rngs=rngs)
    plain = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    assert plan((3, 3, 128, 8)) is None
    assert eligible_convs(nnx.List([wide, custom, plain])) == [plain]


class SmallCNN(nnx.Module):
    def __init__(self, *, rngs):
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
        self.dense = nnx.Linear(8 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return self.dense(x.reshape(x.shape[0], -1))


def test_trainer_uses_them_on_cpu_says_so_and_stays_within_rounding_of_xla(capsys):
    rng = np.random.default_rng(0)
    images = {"image": rng.random((64, 8, 8, 1), np.float32), "label": rng.integers(0, 3, 64).astype(np.int32)}
    runs = fit_with_and_without_cpu_tuning(lambda: SmallCNN(rngs=nnx.Rngs(0)), images, capsys)
    trainer, model, err = runs[True]
    assert any("2 convolution layer(s)" in note for note in trainer.cpu_settings)
    assert err.count("kernel gradients as matrix products") == 1 and "cpu_tuning=False" in err
    # the user's model keeps XLA's convolution: only the train step's own copy was changed
    assert model.conv1.conv_general_dilated is jax.lax.conv_general_dilated
    trainer, _, err = runs[False]
    assert trainer.cpu_settings == [] and "CPU tuning" not in err
    tuned, plain = (jax.tree.leaves(runs[t][0].state.params) for t in (True, False))
    assert any(not np.array_equal(a, b) for a, b in zip(tuned, plain))  # the rewrite did run: rounding differs
    for a, b in zip(tuned, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # 8 Adam steps apart only by float rounding
