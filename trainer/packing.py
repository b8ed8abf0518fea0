"""Packs a pytree's scalars into one array per dtype, so a compiled call moves a few buffers.

Each argument and result of a ``jax.jit`` call costs the host a buffer of bookkeeping: ~1.4 us on
XLA:CPU, and on a GPU, where the loop of a small model is bound by the host, it showed as the
default callbacks' main cost (``benchmarks/HISTORY.md``).
The trainer's state and running sums hold dozens of scalars (step counter, optimizer count and
hyperparameters, the non-finite guard, one total and count per metric and reader), so between
steps they travel packed (``Layout.split``) and are sliced back out inside the compiled step
(``Layout.join``), which XLA does for free. Arrays, PRNG keys and anything not fully replicated
across devices travel as they are.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Elements: only scalars are packed (the step counter, optimizer count and hyperparameters, the
# guard's counters, the running sums). Packing vectors too (biases and their moments) saved the tiny
# MLP another ~15-25 us a call, but raised the transformer step's compile-time peak RSS by up to
# 100 MB and changed the rounding of a bias's update between a single step and the same step in a
# fused scan by one ulp (XLA fused its arithmetic into the slices and concatenations differently).
SMALL = 1


def groups(specs: Sequence[tuple[tuple[int, ...], Any]]) -> list:
    """The dtypes of ``specs`` in first-seen order (one packed array each)."""
    return list(dict.fromkeys(dtype for _, dtype in specs))


def pack(specs: Sequence[tuple[tuple[int, ...], Any]], leaves: Sequence[Any]) -> list:
    """One 1-d array per dtype of ``specs``: the leaves raveled and concatenated (traceable)."""
    return [jnp.concatenate([jnp.ravel(x) for x, (_, d) in zip(leaves, specs) if d == dtype])
            for dtype in groups(specs)]


def unpack(specs: Sequence[tuple[tuple[int, ...], Any]], packed: Sequence[Any], shift: Any = None) -> list:
    """The leaves ``pack`` packed, back in their shapes (numpy or traced arrays alike).

    ``shift``: a traced zero added to every slice's start. The slices are then dynamic, so XLA
    cannot hoist them out of a loop as invariants and run them (a kernel each) on every call.
    """
    offsets = {dtype: 0 for dtype in groups(specs)}
    flat = dict(zip(groups(specs), packed))
    out = []
    for shape, dtype in specs:
        size = math.prod(shape)  # np.prod of a tuple cost ~9 us a leaf: most of a logged window's unpack
        if shift is None:
            out.append(flat[dtype][offsets[dtype]:offsets[dtype] + size].reshape(shape))
        else:
            out.append(jax.lax.dynamic_slice(flat[dtype], (offsets[dtype] + shift,), (size,)).reshape(shape))
        offsets[dtype] += size
    return out


def specs_of(leaves: Sequence[Any]) -> tuple:
    """``(shape, dtype)`` of each leaf (arrays or ``jax.ShapeDtypeStruct``s): a static, hashable description."""
    return tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)


def is_prng_key(leaf: Any) -> bool:
    """Whether ``leaf`` is an array of typed PRNG keys (which concatenate and save only as their key data)."""
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _packable(leaf: Any) -> bool:
    if not isinstance(leaf, (jax.Array, np.ndarray)) or leaf.size > SMALL:
        return False
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):  # PRNG keys do not concatenate
        return False
    sharding = getattr(leaf, "sharding", None)
    return sharding is None or sharding.is_fully_replicated


class Layout:
    """A pytree's structure and which of its leaves travel packed (static: hashed by the jit cache).

    ``split(tree) -> (arrays, packed)`` on the host; inside a compiled function ``join(arrays,
    packed) -> tree`` and ``split_traced(tree)`` for the result, which must keep the leaves'
    shapes and dtypes (a weakly typed result is cast back to the dtype it came in with).
    """

    def __init__(self, treedef: Any, leaves: Sequence[Any]):
        self.treedef = treedef
        self.scalars = tuple(i for i, leaf in enumerate(leaves) if _packable(leaf))
        self.specs = specs_of([leaves[i] for i in self.scalars])
        self._key = (treedef, self.scalars, self.specs)
        self._hash = hash(self._key)

    @classmethod
    def split(cls, tree: Any) -> tuple["Layout", list, list]:
        """The layout of ``tree``, its leaves that travel as they are, and its packed scalars (one small
        compiled call packs).

        Equal layouts are one object: the jit cache then matches them by identity, not by a
        comparison of tree definitions and dtypes that costs ~16 us a call.
        """
        leaves, treedef = jax.tree.flatten(tree)
        layout = cls(treedef, leaves)
        layout = _interned.setdefault(layout._key, layout)
        arrays, scalars = layout._partition(leaves)
        return layout, arrays, (pack_jit(layout.specs, scalars) if scalars else [])

    def join(self, arrays: Sequence[Any], packed: Sequence[Any]) -> Any:
        """The tree again from its other leaves and packed scalars (traceable)."""
        scalars = unpack(self.specs, packed) if self.scalars else []
        return jax.tree.unflatten(self.treedef, self._merge(arrays, scalars))

    def split_traced(self, tree: Any) -> tuple[list, list]:
        """``tree`` (the same structure) as its other leaves and packed scalars, inside a trace."""
        leaves = self.treedef.flatten_up_to(tree)
        arrays, scalars = self._partition(leaves)
        for i, (x, (shape, dtype)) in enumerate(zip(scalars, self.specs)):
            if tuple(x.shape) != shape:
                raise ValueError(f"the compiled step changed the shape of a state leaf from {shape} to "
                                 f"{tuple(x.shape)}; a step must return arrays shaped as it got them.")
            scalars[i] = x.astype(dtype)
        return arrays, (pack(self.specs, scalars) if scalars else [])

    def unpacked(self, arrays: Sequence[Any], packed: Sequence[Any]) -> Any:
        """``join`` on the host: the tree of device arrays (one small compiled call unpacks)."""
        scalars = _unpack_jit(self.specs, packed) if self.scalars else []
        return jax.tree.unflatten(self.treedef, self._merge(arrays, scalars))

    def _partition(self, leaves: Sequence[Any]) -> tuple[list, list]:
        chosen = set(self.scalars)
        return ([x for i, x in enumerate(leaves) if i not in chosen], [leaves[i] for i in self.scalars])

    def _merge(self, arrays: Sequence[Any], scalars: Sequence[Any]) -> list:
        arrays, scalars, chosen = iter(arrays), iter(scalars), set(self.scalars)
        return [next(scalars) if i in chosen else next(arrays) for i in range(self.treedef.num_leaves)]

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Layout) and self._key == other._key)


_interned: "weakref.WeakValueDictionary[tuple, Layout]" = weakref.WeakValueDictionary()


class Packed(NamedTuple):
    """A pytree's scalars packed on the device (``pack``): what ``unpack`` and ``treedef`` rebuild.

    ``Trainer.take_metric_sums(name, packed=True)`` hands running sums over in this form, so that a
    logger's window is one compiled call and one device read (``callbacks.lagged.LaggedFetch``).
    """

    arrays: list
    specs: tuple
    treedef: Any


def scan_packed(f: Any, layout: Layout, carry: tuple[list, list], xs: Any, unroll: int | bool = 1) -> tuple[tuple, Any]:
    """``jax.lax.scan(f, tree, xs)`` for the tree ``layout.join(*carry)``, carried as ``(arrays, packed)``.

    Carried as a tree, every scalar of the train state is a buffer of the loop: sliced out of the
    call's packed arguments before it and concatenated back after it, a small kernel each (the tiny
    MLP's guarded chunk: ~20 of its kernels; on XLA:CPU each costs launch time every call and ~1 MiB
    of memory while compiling). Carried packed, the slicing and packing happen inside the loop,
    where XLA fuses them into the step's own arithmetic. The step's scalar outputs (its metrics)
    leave the loop packed too, one row per dtype and step, and are sliced apart once after it: one
    write a step instead of one per metric (the tiny MLP's chunk: 4 kernels a step fewer). Returns
    ``((arrays, packed), out)``.
    """
    described = []  # the outputs' structure, found while tracing the body

    def body(carry, x):
        new, out = f(layout.join(*carry), x)
        leaves, treedef = jax.tree.flatten(out)
        scalars = [i for i, leaf in enumerate(leaves) if jnp.ndim(leaf) == 0 and not is_prng_key(leaf)]
        specs = specs_of([leaves[i] for i in scalars])
        described[:] = [(treedef, scalars, specs)]
        chosen = set(scalars)
        others = [leaf for i, leaf in enumerate(leaves) if i not in chosen]
        return layout.split_traced(new), (pack(specs, [leaves[i] for i in scalars]), others)

    carry, (rows, others) = jax.lax.scan(body, tuple(carry), xs, unroll=unroll)
    treedef, scalars, specs = described[0]
    # each step's row unpacked as ``pack`` packed it, the steps stacked: one ``[steps]`` column per scalar
    columns = iter(jax.vmap(lambda *row: unpack(specs, row))(*rows) if specs else [])
    others = iter(others)
    chosen = set(scalars)
    return carry, jax.tree.unflatten(treedef, [next(columns) if i in chosen else next(others)
                                               for i in range(treedef.num_leaves)])


pack_jit = jax.jit(pack, static_argnums=0)
_unpack_jit = jax.jit(unpack, static_argnums=0)
