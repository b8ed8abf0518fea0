"""Convolution weight gradients as matrix products: a CPU tuning (``Trainer(cpu_tuning=True)``).

XLA:CPU computes a convolution's kernel gradient as another convolution, contracting over the
batch and every pixel, and for small channel counts that runs at a third of its matrix-product
speed (the MNIST CNN's second layer: 27.6 ms of a 67 ms step; ``benchmarks/HISTORY.md``). Here the
forward pass and the input gradient stay XLA's own (bitwise the same); only the kernel gradient is
computed from the padded input and the output gradient with matrix products, which changes its
float rounding (within ~4e-6 of the largest gradient, measured on the MNIST CNN) and nothing else. Applied to ``nnx.Conv`` layers that use
``lax.conv_general_dilated`` (the default), inside the train step's trace only
(``trainer.step.use_matmul_kernel_grads``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# (kernel taps x input channels) up to which the kernel gradient is one product of the stacked
# shifted inputs (im2col); above it, one product per tap, up to SHIFTED_MAX_CHANNELS input channels.
# Measured on the project's 2-core CPU: ci*taps 9 / 25 / 27 ran 2.8x / 1.6x / 2.3x faster stacked;
# 3x3 taps over 16 / 32 / 64 channels 1.4x / 1.0-2.9x / 1.1x faster per tap, 128 / 256: slower.
STACKED_MAX_COLUMNS = 32
SHIFTED_MAX_CHANNELS = 64
STACKED_MAX_BYTES = 64 * 2**20  # the stacked windows are built in memory: larger inputs keep XLA's gradient
_CHANNELS_LAST_2D = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # NHWC input and output, HWIO kernel


def plan(kernel_shape: tuple[int, ...]) -> str | None:
    """How an HWIO kernel's gradient is computed: ``"stacked"``, ``"shifted"`` or ``None`` (XLA's own)."""
    if len(kernel_shape) != 4:
        return None
    kh, kw, ci, _ = kernel_shape
    if kh * kw == 1 or kh * kw * ci <= STACKED_MAX_COLUMNS:
        return "stacked"
    return "shifted" if ci <= SHIFTED_MAX_CHANNELS else None


def _conv(x, w, padding):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grad(x, w, padding, how):
    return _conv(x, w, padding)


def _forward(x, w, padding, how):
    return _conv(x, w, padding), (x, w)


def kernel_grad(x, g, kernel_shape: tuple[int, ...], padding, how: str):
    """The HWIO kernel gradient of a stride-1 NHWC convolution from its input ``x`` and output gradient ``g``.

    ``padding``: ``((top, bottom), (left, right))``; ``how``: ``"stacked"`` (one product of the
    stacked shifted windows, im2col) or ``"shifted"`` (one product per kernel tap).
    """
    kh, kw, ci, co = kernel_shape
    _, oh, ow, _ = g.shape
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    windows = [xp[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)]
    if how == "stacked":  # one product: [taps * ci, pixels] x [pixels, co]
        columns = jnp.concatenate(windows, axis=-1).reshape(-1, kh * kw * ci)
        return (columns.T @ g.reshape(-1, co)).reshape(kh, kw, ci, co)
    # one product per tap, without building the stacked input; each a 2-D product contracting the
    # pixels (an einsum over the 4-D windows ran 2-3x slower on XLA:CPU)
    pixels = g.reshape(-1, co)
    products = [jax.lax.dot_general(window.reshape(-1, ci), pixels, (((0,), (0,)), ((), ()))) for window in windows]
    return jnp.stack(products).reshape(kh, kw, ci, co)


def _backward(padding, how, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda x: _conv(x, w, padding), x)[1](g)[0]
    return dx, kernel_grad(x, g, w.shape, padding, how).astype(w.dtype)


_conv_matmul_grad.defvjp(_forward, _backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` whose kernel gradient is a matrix product where ``plan`` says so.

    Only the case measured is taken (2-D, stride 1, no dilation, no groups, channels last, no
    output dtype or sharding asked for, stacked windows within ``STACKED_MAX_BYTES``); every other
    call goes to ``lax.conv_general_dilated`` as is.
    """
    options = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count, precision=precision, **kwargs)
    how = plan(tuple(rhs.shape))
    specs = getattr(dimension_numbers, "lhs_spec", None), getattr(dimension_numbers, "rhs_spec", None), \
        getattr(dimension_numbers, "out_spec", None)
    plain = (lhs.ndim == 4 and specs == _CHANNELS_LAST_2D and feature_group_count == 1 and precision is None
             and all(s == 1 for s in window_strides) and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1))) and kwargs.get("out_sharding") is None
             and kwargs.get("preferred_element_type") is None)
    if how is None or not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    stacked_bytes = lhs.shape[0] * math.prod(lhs.shape[1:3]) * math.prod(rhs.shape[:3]) * lhs.dtype.itemsize
    if (any(p < 0 for pair in padding for p in pair)  # a negative padding crops: left to XLA
            or (how == "stacked" and math.prod(rhs.shape[:2]) > 1 and stacked_bytes > STACKED_MAX_BYTES)):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
    return _conv_matmul_grad(lhs, rhs, padding, how)


def eligible_convs(model: nnx.Module) -> list[nnx.Conv]:
    """The model's ``nnx.Conv`` layers (on XLA's default convolution) that ``conv_general_dilated`` speeds up."""
    found = []
    for _, module in nnx.iter_graph(model):
        if (isinstance(module, nnx.Conv) and module.conv_general_dilated is jax.lax.conv_general_dilated
                and len(module.kernel_size) == 2 and module.feature_group_count == 1
                and all(_ones(getattr(module, name)) for name in ("strides", "input_dilation", "kernel_dilation"))
                and plan((*module.kernel_size, module.in_features, module.out_features)) is not None):
            found.append(module)
    return found


def _ones(value: Any) -> bool:
    """True for a stride or dilation of 1 in every dimension (``None``, an int or a sequence, as ``nnx.Conv`` takes)."""
    return value is None or (value == 1 if isinstance(value, int) else all(v == 1 for v in value))
