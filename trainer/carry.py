"""``Carry``: the train step's state and running sums between dispatches, kept as flat leaf lists.

``nnx.Variable`` and ``clu.metrics`` nodes flatten and unflatten in Python: for the tiny MLP's
27-leaf state that is ~160 us a step, 40% of a 0.4 ms step. A list of arrays crosses ``jax.jit``
in C++, so the loop hands the compiled step flat leaves with their tree definitions as static
arguments, and the structured ``TrainState`` / sums are rebuilt only when someone reads them
(a callback at its interval, a checkpoint), not every step. Their scalars travel packed,
one array per dtype (``trainer.packing``): each buffer a call moves costs the host time.

A fused step built with ``keeps_start`` (a chunk that reruns itself from its start when one of its
steps was not finite, ``trainer.step``) also takes the state it starts from packed, one array per
dtype, and returns the state it ended with packed the same way: the next chunk's start. The carry
keeps that copy while the state stays in its hands and packs a fresh one whenever the state came
from anywhere else (a reader, a single step, a checkpoint).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from trainer.packing import Layout, Packed, is_prng_key as _is_key, pack, specs_of, unpack

FlatStep = Callable[..., tuple[list, list, list, list, Any]]


def flat_jit(fn: Callable[..., tuple[Any, ...]], packed_state: bool = False, keeps_start: bool = False) -> FlatStep:
    """``fn(state, sums, batch) -> (state, sums, out)`` jitted over flat, packed leaves.

    The result is called as ``(state_layout, sums_layout, state_arrays, state_packed, sums_arrays,
    sums_packed, batch)`` and returns the four lists of leaves and ``out``: the layouts
    (``trainer.packing.Layout``) are static (hashed, not flattened), the leaves donated.
    ``packed_state``: ``fn(state_layout, state_arrays, state_packed, sums, batch) -> ((state_arrays,
    state_packed), sums, out)`` takes and gives the state as it travels (``trainer.packing.scan_packed``).
    ``keeps_start`` (with ``packed_state``): ``fn`` also takes the start state packed (``pack_state``)
    last and returns the end state packed last; the result then takes it after ``batch`` and returns
    it after ``out``, and has ``keeps_start`` set for ``Carry.run``.
    """

    def flat(state_layout, sums_layout, state_arrays, state_packed, sums_arrays, sums_packed, batch, *start):
        sums = sums_layout.join(sums_arrays, sums_packed)
        if packed_state:
            (state_arrays, state_packed), sums, out, *start = fn(state_layout, state_arrays, state_packed, sums, batch,
                                                                 *start)
            return (state_arrays, state_packed, *sums_layout.split_traced(sums), out, *start)
        state, sums, out = fn(state_layout.join(state_arrays, state_packed), sums, batch)
        return (*state_layout.split_traced(state), *sums_layout.split_traced(sums), out)

    # The start is not donated: the end state is packed into a new buffer. Donated, the tiny MLP's
    # chunk ran ~30% slower (1270 against 960 us on the 2-core CPU), with the same compiled program.
    jitted = jax.jit(flat, static_argnums=(0, 1), donate_argnums=(2, 3, 4, 5))
    jitted.keeps_start = keeps_start
    return jitted


def pack_state(arrays: list, packed: list) -> list:
    """The state's leaves as they travel (``Layout.split``), packed into one array per dtype (traceable;
    PRNG keys as their key data)."""
    leaves = [_key_data(x) for x in [*arrays, *packed]]
    return pack(specs_of(leaves), leaves)


def unpack_state(arrays: list, packed: list, start: list, shift: Any = None) -> tuple[list, list]:
    """``(arrays, packed)`` back from ``start = pack_state(arrays, packed)`` (traceable; ``arrays`` and
    ``packed`` give only the shapes, dtypes and key implementations; ``shift`` as for ``unpack``)."""
    like = [*arrays, *packed]
    leaves = unpack(specs_of([_key_data(x) for x in like]), start, shift=shift)
    leaves = [jax.random.wrap_key_data(x, impl=jax.random.key_impl(y)) if _is_key(y) else x
              for x, y in zip(leaves, like)]
    return leaves[:len(arrays)], leaves[len(arrays):]


def _key_data(x: Any) -> Any:
    return jax.random.key_data(x) if _is_key(x) else x


class Carry:
    """Holds ``state`` and ``sums`` each either structured or flat, converting only on a change of hands.

    Reading ``state`` or ``sums`` hands out the structured form (which the reader may replace or,
    for the sums dict, update in place); the next ``run`` flattens and packs it again. The two convert
    independently: a logger taking its window's sums every N steps never rebuilds the state.
    """

    def __init__(self, state: Any = None) -> None:
        self._state, self._sums = state, {}
        self._state_flat: tuple | None = None  # (layout, other leaves, packed scalars) while the loop holds it
        self._start: list | None = None  # the flat state packed (``pack_state``) while a keeps_start step holds it
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

    def peek_sums(self) -> dict:
        """The sums as a tree, read without taking the carry out of its flat form (no repack later).

        Its leaves may be the carry's own buffers, which the next step donates: read them at once.
        """
        if self._sums_flat is not None:
            return self._sums_flat[0].unpacked(*self._sums_flat[1:])
        return self._sums

    @sums.setter
    def sums(self, value: dict) -> None:
        self._sums, self._sums_flat = value, None

    def run(self, step: FlatStep, batch: Any) -> Any:
        """Dispatches ``step`` (a ``flat_jit``) on the carry and ``batch``; returns its third output."""
        if self._state_flat is None:
            self._state_flat, self._state, self._start = Layout.split(self._state), None, None
        if self._sums_flat is None:
            self._sums_flat, self._sums = Layout.split(self._sums), None
        state_layout, sums_layout = self._state_flat[0], self._sums_flat[0]
        args = (state_layout, sums_layout, *self._state_flat[1:], *self._sums_flat[1:], batch)
        if getattr(step, "keeps_start", False):
            if self._start is None:  # the state did not come from the last such step: pack it once
                self._start = _pack_state(list(self._state_flat[1]), list(self._state_flat[2]))
            state_arrays, state_packed, sums_arrays, sums_packed, out, self._start = step(*args, self._start)
        else:
            self._start = None
            state_arrays, state_packed, sums_arrays, sums_packed, out = step(*args)
        self._state_flat, self._sums_flat = (state_layout, state_arrays, state_packed), (sums_layout, sums_arrays, sums_packed)
        return out

    def take_sums(self, name: str, zeros: Callable[[Any], Any], packed: bool = False) -> Any:
        """Hands out the running sums ``sums[name]`` and restarts them at zero (``zeros(sums)``).

        While the sums are flat this is one small compiled call on their packed scalars: the other
        readers' sums stay packed, so a logger's window costs no rebuild and repack of them all.
        ``packed``: hand them over packed (``trainer.packing.Packed``) from that same call, for a
        ``LaggedFetch`` to read without packing them again (where they are not flat: as a tree).
        """
        if self._sums_flat is not None:
            layout, arrays, packed_arrays = self._sums_flat
            positions = _positions(layout, name)
            if positions is not None:
                packed_arrays, taken = (_take_packed if packed else _take)(layout, positions, packed_arrays)
                self._sums_flat = (layout, arrays, packed_arrays)
                if packed:
                    return Packed(taken, positions[2], positions[1])
                return jax.tree.unflatten(positions[1], taken)
        sums = self.sums.get(name)
        if sums is not None:
            self.sums[name] = zeros(sums)
        return sums

    def _structure_state(self) -> None:
        if self._state_flat is not None:
            self._state, self._state_flat = self._state_flat[0].unpacked(*self._state_flat[1:]), None

    def _structure_sums(self) -> None:
        if self._sums_flat is not None:
            self._sums, self._sums_flat = self._sums_flat[0].unpacked(*self._sums_flat[1:]), None


_pack_state = jax.jit(pack_state)


@functools.lru_cache(maxsize=256)
def _positions(layout: Layout, name: str) -> tuple[tuple[int, ...], Any, tuple] | None:
    """Where ``sums[name]``'s leaves sit among ``layout``'s packed scalars, their tree definition and
    their specs (computed once per layout); ``None`` when the sums have no such entry or it holds a
    leaf that does not travel packed."""
    indexed = jax.tree.unflatten(layout.treedef, list(range(layout.treedef.num_leaves)))
    if not isinstance(indexed, dict) or indexed.get(name) is None:
        return None
    leaves, treedef = jax.tree.flatten(indexed[name])
    if not set(leaves) <= set(layout.scalars):
        return None
    indices = tuple(layout.scalars.index(i) for i in leaves)
    return indices, treedef, tuple(layout.specs[i] for i in indices)


def _take_scalars(layout: Layout, positions: tuple, packed: list) -> tuple[list, list]:
    scalars = unpack(layout.specs, packed)
    taken = [scalars[i] for i in positions[0]]
    chosen = set(positions[0])
    zeroed = [jnp.zeros_like(x) if i in chosen else x for i, x in enumerate(scalars)]
    return pack(layout.specs, zeroed), taken


_take = jax.jit(_take_scalars, static_argnums=(0, 1), donate_argnums=2)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=2)
def _take_packed(layout: Layout, positions: tuple, packed: list) -> tuple[list, list]:
    packed, taken = _take_scalars(layout, positions, packed)
    return packed, pack(positions[2], taken)
