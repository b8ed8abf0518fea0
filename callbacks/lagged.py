"""``LaggedFetch``: read device values one step late, so a read never stalls the next dispatch.

``push`` starts an asynchronous device-to-host copy of values produced by step ``s``; ``pop``
(called at a later step, after step ``s + 1`` was already dispatched) returns them as host values.
The device is never idle waiting for the host. The values are packed on the device into one
array per dtype first (one small compiled function), so a window of a dozen metrics is one read.
"""

from __future__ import annotations

from typing import Any

import functools

import jax
import jax.numpy as jnp
import numpy as np


class LaggedFetch:
    """Holds at most one pending ``(step, values)`` whose copy to the host has been started."""

    def __init__(self):
        self._pending: tuple[int, Any] | None = None
        self.fetches = 0  # how many device-to-host reads this object made

    def push(self, step: int, values: Any) -> None:
        """Starts copying ``values`` (a pytree of device arrays) to the host."""
        leaves, treedef = jax.tree.flatten(values)
        if leaves and all(isinstance(x, jax.Array) for x in leaves):
            specs = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)
            packed = _pack(specs, leaves)
            for array in packed:
                array.copy_to_host_async()
            self._pending = (step, (packed, specs, treedef))
        else:
            self._pending = (step, (None, None, values))

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def pop(self) -> tuple[int, Any] | None:
        """The pending ``(step, host values)``, or ``None``; clears it."""
        if self._pending is None:
            return None
        step, (packed, specs, rest) = self._pending
        self._pending = None
        self.fetches += 1
        if packed is None:
            return step, jax.device_get(rest)
        return step, jax.tree.unflatten(rest, _unpack(specs, jax.device_get(packed)))


def _groups(specs: tuple) -> list:
    """The dtypes of ``specs`` in first-seen order (one packed array each)."""
    return list(dict.fromkeys(dtype for _, dtype in specs))


@functools.partial(jax.jit, static_argnums=0)
def _pack(specs: tuple, leaves: list) -> list:
    return [jnp.concatenate([jnp.ravel(x) for x, (_, d) in zip(leaves, specs) if d == dtype])
            for dtype in _groups(specs)]


def _unpack(specs: tuple, packed: list) -> list:
    offsets = {dtype: 0 for dtype in _groups(specs)}
    flat = dict(zip(_groups(specs), packed))
    out = []
    for shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64))
        out.append(flat[dtype][offsets[dtype]:offsets[dtype] + size].reshape(shape))
        offsets[dtype] += size
    return out
