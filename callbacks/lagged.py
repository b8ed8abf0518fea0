"""``LaggedFetch``: read device values one step late, so a read never stalls the next dispatch.

``push`` starts an asynchronous device-to-host copy of values produced by step ``s``; ``pop``
(called at a later step, after step ``s + 1`` was already dispatched) returns them as host values.
The device is never idle waiting for the host.
"""

from __future__ import annotations

from typing import Any

import jax


class LaggedFetch:
    """Holds at most one pending ``(step, values)`` whose copy to the host has been started."""

    def __init__(self):
        self._pending: tuple[int, Any] | None = None
        self.fetches = 0  # how many device-to-host reads this object made

    def push(self, step: int, values: Any) -> None:
        """Starts copying ``values`` (a pytree of device arrays) to the host."""
        for leaf in jax.tree.leaves(values):
            if hasattr(leaf, "copy_to_host_async"):
                leaf.copy_to_host_async()
        self._pending = (step, values)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def pop(self) -> tuple[int, Any] | None:
        """The pending ``(step, host values)``, or ``None``; clears it."""
        if self._pending is None:
            return None
        step, values = self._pending
        self._pending = None
        self.fetches += 1
        return step, jax.device_get(values)
