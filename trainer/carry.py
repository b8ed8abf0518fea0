"""``Carry``: the train step's state and running sums between dispatches, kept as flat leaf lists.

``nnx.Variable`` and ``clu.metrics`` nodes flatten and unflatten in Python: for the tiny MLP's
27-leaf state that is ~160 us a step, 40% of a 0.4 ms step. A list of arrays crosses ``jax.jit``
in C++, so the loop hands the compiled step flat leaves with their tree definitions as static
arguments, and the structured ``TrainState`` / sums are rebuilt only when someone reads them
(a callback at its interval, a checkpoint), not every step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

FlatStep = Callable[..., tuple[list, list, Any]]


def flat_jit(fn: Callable[[Any, Any, Any], tuple[Any, Any, Any]]) -> FlatStep:
    """``fn(state, sums, batch) -> (state, sums, out)`` jitted over flat leaves.

    The result is called as ``(state_def, sums_def, state_leaves, sums_leaves, batch)`` and returns
    ``(state_leaves, sums_leaves, out)``; the tree definitions are static (hashed, not flattened),
    the leaves donated.
    """

    def flat(state_def, sums_def, state_leaves, sums_leaves, batch):
        state, sums, out = fn(jax.tree.unflatten(state_def, state_leaves),
                              jax.tree.unflatten(sums_def, sums_leaves), batch)
        return state_def.flatten_up_to(state), sums_def.flatten_up_to(sums), out

    return jax.jit(flat, static_argnums=(0, 1), donate_argnums=(2, 3))


class Carry:
    """Holds ``state`` and ``sums`` each either structured or flat, converting only on a change of hands.

    Reading ``state`` or ``sums`` hands out the structured form (which the reader may replace or,
    for the sums dict, update in place); the next ``run`` flattens it again. The two convert
    independently: a logger taking its window's sums every N steps never rebuilds the state.
    """

    def __init__(self, state: Any = None) -> None:
        self._state, self._sums = state, {}
        self._state_flat: tuple | None = None  # (treedef, leaves) while the loop holds it
        self._sums_flat: tuple | None = None

    @property
    def state(self) -> Any:
        self._structure_state()
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._state, self._state_flat = value, None

    @property
    def sums(self) -> dict:
        self._structure_sums()
        return self._sums

    @sums.setter
    def sums(self, value: dict) -> None:
        self._sums, self._sums_flat = value, None

    def run(self, step: FlatStep, batch: Any) -> Any:
        """Dispatches ``step`` (a ``flat_jit``) on the carry and ``batch``; returns its third output."""
        if self._state_flat is None:
            leaves, treedef = jax.tree.flatten(self._state)
            self._state_flat, self._state = (treedef, leaves), None
        if self._sums_flat is None:
            leaves, treedef = jax.tree.flatten(self._sums)
            self._sums_flat, self._sums = (treedef, leaves), None
        (state_def, state_leaves), (sums_def, sums_leaves) = self._state_flat, self._sums_flat
        state_leaves, sums_leaves, out = step(state_def, sums_def, state_leaves, sums_leaves, batch)
        self._state_flat, self._sums_flat = (state_def, state_leaves), (sums_def, sums_leaves)
        return out

    def _structure_state(self) -> None:
        if self._state_flat is not None:
            self._state, self._state_flat = jax.tree.unflatten(*self._state_flat), None

    def _structure_sums(self) -> None:
        if self._sums_flat is not None:
            self._sums, self._sums_flat = jax.tree.unflatten(*self._sums_flat), None
