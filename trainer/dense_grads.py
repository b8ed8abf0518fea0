"""Dense layers' kernel gradients on sequence inputs as one 2-D product: a CPU tuning (``cpu_tuning``).

For ``y = x @ kernel`` with ``x`` of shape ``[batch, time, features]`` JAX's transpose rule
computes the kernel gradient as a product contracting two axes and transposes its result; on
XLA:CPU that ran 1.5-2.3x slower than the same sums as one 2-D product of ``x`` and the output
gradient flattened to rows (the transformer recipe's shapes; ``benchmarks/HISTORY.md``), 11% of the
transformer's step. The forward pass and the input gradient stay XLA's own (bitwise); the kernel
gradient's float rounding differs. Applied to ``nnx.Linear`` and ``nnx.LinearGeneral`` layers on
``lax.dot_general`` (the default), inside the train step's trace only, for inputs with at least two
leading axes; every other call is left as it was (``trainer.step.use_matmul_kernel_grads``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
from flax import nnx


def _product(x, kernel, k: int):
    """``x``'s trailing ``k`` axes contracted with ``kernel``'s leading ``k`` (what the layers compute)."""
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, kernel, k):
    return _product(x, kernel, k)


def _forward(x, kernel, k):
    return _product(x, kernel, k), (x, kernel)


def _backward(k, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda x: _product(x, kernel, k), x)[1](g)[0]
    rows_x = x.reshape(-1, math.prod(x.shape[x.ndim - k:]))
    rows_g = g.reshape(-1, math.prod(kernel.shape[k:]))
    dkernel = jax.lax.dot_general(rows_x, rows_g, (((0,), (0,)), ((), ()))).reshape(kernel.shape)
    return dx, dkernel.astype(kernel.dtype)


_dense.defvjp(_forward, _backward)


def sequence_product(dimension_numbers: Any, lhs_ndim: int, precision: Any = None, **kwargs) -> int | None:
    """How many axes a layer's product contracts when it is one this module rewrites, else ``None``.

    That is: no batch dimensions, ``lhs``'s trailing axes against the kernel's leading ones in order,
    at least two leading axes left on ``lhs`` (a sequence), no precision, output dtype or sharding asked for.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    k = len(lhs_contract)
    if (lhs_batch or rhs_batch or tuple(lhs_contract) != tuple(range(lhs_ndim - k, lhs_ndim))
            or tuple(rhs_contract) != tuple(range(k)) or lhs_ndim - k < 2 or precision is not None
            or any(value is not None for value in kwargs.values())):
        return None
    return k


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """``lax.dot_general`` whose kernel (``rhs``) gradient is one 2-D product where ``sequence_product`` allows."""
    k = sequence_product(dimension_numbers, lhs.ndim, precision, preferred_element_type=preferred_element_type,
                         out_sharding=out_sharding)
    if k is None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, out_sharding=out_sharding)
    return _dense(lhs, rhs, k)


def eligible_denses(model: nnx.Module) -> list[nnx.Module]:
    """The model's ``nnx.Linear`` / ``nnx.LinearGeneral`` layers on XLA's default product."""
    found = []
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Linear) and module.dot_general is jax.lax.dot_general:
            found.append(module)
        elif (isinstance(module, nnx.LinearGeneral) and module.dot_general_cls is None
              and module.dot_general in (None, jax.lax.dot_general)):
            found.append(module)
    return found


def is_layer_product(denses: list[nnx.Module]) -> Callable[[Any], bool]:
    """A ``trainer.jaxprs.any_equation`` predicate: a product ``dot_general`` rewrites whose kernel has
    the shape of one of ``denses``' kernels, so that a step's own 3-D product beside layers on flat
    inputs is not taken for a layer on a sequence (the trainer's CPU-tuning note names only what runs)."""
    shapes = {tuple(module.kernel.shape) for module in denses}
    return lambda eqn: is_sequence_product(eqn) and tuple(eqn.invars[1].aval.shape) in shapes


def is_sequence_product(eqn: Any) -> bool:
    """Whether a traced equation is a product ``dot_general`` rewrites (look for it with
    ``trainer.jaxprs.any_equation``: the layers' forward products are among a step's ``dot_general``s)."""
    return eqn.primitive.name == "dot_general" and sequence_product(
        eqn.params["dimension_numbers"], eqn.invars[0].aval.ndim, eqn.params.get("precision")) is not None
