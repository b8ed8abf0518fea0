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
    """Holds ``state`` and ``sums`` either structured or flat, converting only on a change of hands.

    Reading ``state`` or ``sums`` hands out the structured form (which the reader may replace or,
    for the sums dict, update in place); the next ``run`` flattens it again. So a callback that
    reads every N steps costs one conversion per N steps.
    """

    def __init__(self, state: Any = None) -> None:
        self._state, self._sums = state, {}
        self._flat: tuple | None = None  # (state_def, sums_def, state_leaves, sums_leaves)

    @property
    def state(self) -> Any:
        self._structure()
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        self._structure()
        self._state = value

    @property
    def sums(self) -> dict:
        self._structure()
        return self._sums

    @sums.setter
    def sums(self, value: dict) -> None:
        self._structure()
        self._sums = value

    def run(self, step: FlatStep, batch: Any) -> Any:
        """Dispatches ``step`` (a ``flat_jit``) on the carry and ``batch``; returns its third output."""
        if self._flat is None:
            state_leaves, state_def = jax.tree.flatten(self._state)
            sums_leaves, sums_def = jax.tree.flatten(self._sums)
            self._flat = (state_def, sums_def, state_leaves, sums_leaves)
            self._state = self._sums = None
        state_def, sums_def, state_leaves, sums_leaves = self._flat
        state_leaves, sums_leaves, out = step(state_def, sums_def, state_leaves, sums_leaves, batch)
        self._flat = (state_def, sums_def, state_leaves, sums_leaves)
        return out

    def _structure(self) -> None:
        if self._flat is not None:
            state_def, sums_def, state_leaves, sums_leaves = self._flat
            self._state = jax.tree.unflatten(state_def, state_leaves)
            self._sums = jax.tree.unflatten(sums_def, sums_leaves)
            self._flat = None
