"""Batches in: an in-memory ``ArrayLoader`` with exact, checkpointable positions, and batch helpers.

``ArrayLoader`` is a stateless description of the data (arrays, batch size, shuffling, seed).
Iterating it gives an ``ArrayLoaderIterator`` for one epoch; the *iterator* holds the position
(as in grain), so a loader can be shared by several ``fit`` calls and trainers without carrying
a half-finished epoch from one into another. Epoch ``e``'s order depends only on ``(seed, e)``.

Example::

    loader = ArrayLoader({"image": x, "label": y}, batch_size=128, seed=0)
    it = loader.iterator(epoch=2)           # the third epoch's order
    first = next(it); state = it.get_state()  # {"epoch": 2, "position": 1, ...}
    it2 = loader.iterator(); it2.set_state(state)  # continues with the same second batch
"""

from __future__ import annotations

import collections.abc
import numbers
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from trainer.dtypes import holds_numbers
from trainer.user_warnings import warn


class ArrayLoaderIterator:
    """One epoch of an ``ArrayLoader``: yields batches from ``position`` to the epoch's end."""

    def __init__(self, loader: "ArrayLoader", epoch: int = 0, position: int = 0):
        self._loader = loader
        self._set(epoch, position)

    def _set(self, epoch: int, position: int) -> None:
        if not 0 <= position <= len(self._loader):
            raise ValueError(
                f"position={position} is outside epoch of {len(self._loader)} batches."
            )
        self.epoch = int(epoch)
        self.position = int(position)
        self._order = self._loader.epoch_order(self.epoch)

    def __iter__(self) -> "ArrayLoaderIterator":
        return self

    def __len__(self) -> int:
        return len(self._loader) - self.position

    def __next__(self) -> Any:
        if self.position >= len(self._loader):
            raise StopIteration
        size = self._loader.batch_size
        index = self._order[self.position * size:(self.position + 1) * size]
        self.position += 1
        return self._loader.take(index)

    def get_state(self) -> dict[str, int]:
        """Where this iterator stands: ``{"epoch", "position", "seed", "num_examples", "batch_size"}``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self._loader.seed,
                "num_examples": self._loader.num_examples, "batch_size": self._loader.batch_size}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Jump to a position from ``get_state()``; refuses one taken from different data or batch size
        (the position counts batches: another size would skip or repeat examples)."""
        for key in ("seed", "num_examples", "batch_size"):
            mine = getattr(self._loader, key)
            if key in state and state[key] != mine:
                why = ("its position counts batches of that size, so another would skip or repeat examples"
                       if key == "batch_size" else "it comes from different data")
                raise ValueError(
                    f"iterator state has {key}={state[key]} but this loader has {key}={mine}: {why}; "
                    "build the loader as it was when the state was saved."
                )
        self._set(state["epoch"], state["position"])


def _numbers(x: Any) -> bool:
    """Whether ``x`` is a non-empty list of numbers, or of such lists (rows; the first one checked)."""
    if not isinstance(x, list) or not x:
        return False
    if all(isinstance(item, (numbers.Number, np.generic)) for item in x):
        return True
    return all(isinstance(item, list) for item in x) and _numbers(x[0])


SEED_LIMIT = 2 ** 63
"""Seeds are integers in ``[0, SEED_LIMIT)``: numpy's generators refuse negative ones, ``nnx.Rngs`` larger ones."""


def checked_seed(seed: Any) -> int:
    """``seed`` as an ``int``, refused when built (not at the first batch) unless an integer in [0, 2**63)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**63) (numpy's generators refuse negative "
                         "seeds, and a float would be cut to an integer); pass e.g. seed=0.")
    return int(seed)


class ArrayLoader:
    """Batches over in-memory arrays (any pytree of arrays sharing the first axis).

    Args:
      arrays: e.g. ``{"image": x, "label": y}`` or ``(x, y)``; numpy or anything ``np.asarray`` takes.
      batch_size: examples per batch.
      shuffle: reshuffle every epoch, deterministically from ``(seed, epoch)``.
      seed: the shuffling seed.
      drop_remainder: drop the last, smaller batch (training); ``False`` keeps it (evaluation).

    Raises:
      ValueError: empty arrays, first axes that differ, a non-positive batch size, a batch size
        larger than the dataset with ``drop_remainder=True``, or a seed that is no integer in [0, 2**63).
    """

    def __init__(self, arrays: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_remainder: bool = True):
        # a list of numbers (or of rows of numbers) is one array, as np.asarray takes it, not a pytree of
        # scalars; any other list stays a pytree; None (a missing column) stays a leaf, named below
        self.arrays = jax.tree.map(np.asarray, arrays, is_leaf=lambda x: x is None or _numbers(x))
        named = jax.tree_util.tree_flatten_with_path(self.arrays)[0]
        if not named:
            raise ValueError("ArrayLoader got no arrays; pass e.g. {'image': x, 'label': y}.")
        sizes = {jax.tree_util.keystr(path): (a.shape[0] if a.ndim else None) for path, a in named}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            found = [f"{name or 'the array'}: {size if size is not None else 'no first axis'}"
                     for name, size in sizes.items()]
            more = f", ... {len(found) - 6} more" if len(found) > 6 else ""
            raise ValueError(f"ArrayLoader arrays must share their first (example) axis; found {', '.join(found[:6])}{more}.")
        self.num_examples = next(iter(sizes.values()))
        if self.num_examples == 0:
            raise ValueError("ArrayLoader got an empty dataset (0 examples); check the data path or split.")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        if drop_remainder and batch_size > self.num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the dataset ({self.num_examples} examples) "
                "with drop_remainder=True, so an epoch would have no batch; lower batch_size or "
                "pass drop_remainder=False."
            )
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = checked_seed(seed)
        self.drop_remainder = drop_remainder

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices of epoch ``epoch``, in order (a permutation when shuffling)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)

    def take(self, index: np.ndarray) -> Any:
        """The batch made of the examples at ``index``."""
        return jax.tree.map(lambda a: a[index], self.arrays)

    def iterator(self, epoch: int = 0, position: int = 0) -> ArrayLoaderIterator:
        """An iterator over epoch ``epoch``, starting at batch ``position``."""
        return ArrayLoaderIterator(self, epoch, position)

    def __iter__(self) -> Iterator[Any]:
        """One pass in epoch 0's order (the trainer asks ``iterator(epoch)`` for the others)."""
        return self.iterator(0)


def known_length(data: Any) -> int | None:
    """``len(data)`` where it has one; ``None`` where it has none or its ``len()`` refuses (a torch
    ``DataLoader`` over an ``IterableDataset`` raises ``TypeError``: the length is not known)."""
    if not hasattr(data, "__len__"):
        return None
    try:
        return len(data)
    except (TypeError, NotImplementedError):
        return None


def raw_arrays(data: Any) -> bool:
    """Whether ``data`` is arrays (one, a dict or a tuple of them: rows), not an iterable of batches."""
    def array(a: Any) -> bool:  # numpy or JAX
        return isinstance(a, np.ndarray) or (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "ndim"))

    return isinstance(data, Mapping) or array(data) or bool(
        isinstance(data, tuple) and data and all(array(a) for a in data))


def _is_loader(item: Any) -> bool:
    """An iterable of batches in its own right (an ``ArrayLoader``, a torch ``DataLoader``), not a batch."""
    return isinstance(item, ArrayLoader) or (
        hasattr(item, "__iter__") and not hasattr(item, "shape") and not isinstance(item, (list, tuple, Mapping, str, bytes))
        and jax.tree_util.treedef_is_leaf(jax.tree.structure(item)))  # a registered batch class is a pytree


def several_sets_hint(data: Any, name: str) -> str | None:
    """For a list, tuple or dict of loaders given where one is expected (Lightning's several val_dataloaders):
    what to write instead; ``None`` for anything else."""
    items = list(data.items()) if isinstance(data, Mapping) else (
        [(f"set{i}", x) for i, x in enumerate(data)] if isinstance(data, (list, tuple)) else [])
    if not items or not all(_is_loader(x) for _, x in items):
        return None
    kinds = ", ".join(type(x).__name__ for _, x in items)
    start = f"{name} holds {len(items)} datasets ({kinds}), not batches"
    if "train" in name:
        return f"{start}: fit trains on one; join their arrays (np.concatenate) into one ArrayLoader."
    if "evaluate" in name:
        return f"{start}: evaluate each, [trainer.evaluate(d) for d in data]."
    if "predict" in name:
        return f"{start}: predict each, [trainer.predict(d) for d in data]."
    named = isinstance(data, Mapping)
    first, last = (items[0][0], items[-1][0]) if named else ("val", "test")
    where = (f"data[{first!r}]", f"data[{last!r}]") if named else ("data[0]", f"data[{len(items) - 1}]")
    return (f"{start}: give each its own Evaluator and prefix, callbacks=[Evaluator({where[0]}, prefix='{first}/'), "
            f"Evaluator({where[1]}, prefix='{last}/')] (Lightning's several val_dataloaders).")


def check_batch_source(data: Any, name: str) -> None:
    """Refuses raw arrays where an iterable of batches is expected, saying how to wrap them, and several
    datasets where one is expected, saying how to evaluate each."""
    several = several_sets_hint(data, name)
    if several:
        raise TypeError(several)
    if raw_arrays(data):
        raise TypeError(f"{name} must be an iterable of batches, not raw arrays ({type(data).__name__}); wrap "
                        f"them: {wrapping_hint(data, name)}.")


def wrapping_hint(data: Any, name: str) -> str:
    """The ``ArrayLoader(...)`` call that makes batches of the raw arrays ``data``: its own keys (a dict), a
    batch size it can fill, and, for data that is evaluated, every row in order."""
    if isinstance(data, Mapping):
        arrays = ", ".join(f"{key!r}: ..." for key in list(data)[:4])
    else:
        arrays = "'x': x, 'label': y" if isinstance(data, tuple) and len(data) == 2 else "'x': x"
    leaves = [a for a in jax.tree.leaves(data) if np.ndim(a)]
    rows = min(len(a) for a in leaves) if leaves else 0
    size = max(1, min(128, rows)) if rows else 128
    evaluated = "eval" in name.lower() or "predict" in name.lower()
    order = ", shuffle=False, drop_remainder=False" if evaluated else ""
    return f"ArrayLoader({{{arrays}}}, batch_size={size}{order})"


def batches_of(data: Any, batch_size: int | None, name: str) -> Any:
    """``data`` as batches for ``evaluate`` / ``predict``: raw arrays (``x``, ``{'image': x, 'label': y}``)
    in order, every row, ``batch_size`` (default 32, Keras's) at a time; batches as they are."""
    if data is None:
        raise TypeError(f"{name} got None for its data; pass an iterable of batches (a list, an ArrayLoader) or "
                        "arrays ({'x': x, 'label': y}, (x, y), x).")
    if raw_arrays(data):
        return ArrayLoader(data, 32 if batch_size is None else batch_size, shuffle=False, drop_remainder=False)
    if batch_size is not None:
        raise ValueError(f"{name}: batch_size={batch_size!r} applies to raw arrays; this data ({type(data).__name__}) "
                         "yields its own batches. Drop batch_size, or pass the arrays themselves.")
    return data


def rows_left_out(data: Any) -> int:
    """Rows an ``ArrayLoader`` never yields (``drop_remainder=True``: the last, smaller batch); 0 for other data."""
    if isinstance(data, ArrayLoader) and data.drop_remainder:
        return data.num_examples % data.batch_size
    return 0


def check_every_row_in_order(data: Any, name: str) -> None:
    """Refuses an ``ArrayLoader`` that shuffles or drops rows where results must line up with its rows (predict)."""
    dropped = rows_left_out(data)
    if isinstance(data, ArrayLoader) and (data.shuffle or dropped):
        what = "shuffles its rows" if data.shuffle else f"leaves out its last {dropped} rows (drop_remainder=True)"
        raise ValueError(f"{name} is an ArrayLoader that {what}, so the results would not line up with its rows; "
                         f"pass ArrayLoader(arrays, {data.batch_size}, shuffle=False, drop_remainder=False).")


def warn_if_rows_left_out(data: Any, name: str) -> None:
    """Warns, at the user's call, when an ``ArrayLoader`` evaluated leaves rows out (``drop_remainder=True``), so
    the metrics miss them."""
    dropped = rows_left_out(data)
    if dropped:
        warn(f"{name} is an ArrayLoader that leaves out its last {dropped} of {data.num_examples} rows "
             "(drop_remainder=True), so the metrics miss them; pass drop_remainder=False (the last "
             "batch is padded and masked: every row counts once).")


def epoch_iterator(data: Any, epoch: int, position: int, saved_state: Mapping[str, Any] | None = None
                   ) -> tuple[Iterator[Any], int]:
    """The iterator of epoch ``epoch`` from batch ``position``, and the position it really starts at.

    Data with an ``iterator(epoch, position)`` method (``ArrayLoader``) seeks exactly; a saved
    iterator state is checked against it (refusing other data). Other iterables cannot seek: they
    start a fresh pass (position 0), with a warning when asked to continue mid-epoch.
    """
    if callable(getattr(data, "iterator", None)):
        iterator = data.iterator(epoch=epoch, position=0 if saved_state is not None else position)
        if saved_state is not None:  # checked against the data before the position is taken
            iterator.set_state({**saved_state, "epoch": epoch, "position": position})
        return iterator, position
    if position and isinstance(data, collections.abc.Iterator):  # one pass: it goes on, not from the start
        warn(f"continuing epoch {epoch} after batch {position}: {type(data).__name__} is a one-pass "
             "iterator, so it goes on with the batches it has not given yet, less those a prefetch "
             "thread had read ahead (dropped when the last fit stopped). Use ArrayLoader for exact "
             "continuation.", stacklevel=4)
    elif position:
        warn(f"continuing epoch {epoch} after batch {position}, but {type(data).__name__} cannot "
             "seek: it starts a fresh pass. Use ArrayLoader for exact continuation.", stacklevel=4)
    return iter(data), 0


_HOST_KINDS = (np.ndarray, np.generic, jax.Array, int, float, bool, complex, str, bytes)


def host_batch(batch: Any) -> Any:
    """``batch`` with another library's tensors (PyTorch's, as a torch ``DataLoader`` yields them;
    TensorFlow's) made numpy arrays (``np.asarray``: no copy for a CPU tensor), which JAX takes as its
    own; numpy and JAX arrays pass as they are. Runs per batch: a dict of numpy arrays is not walked."""
    if type(batch) is dict and all(type(a) is np.ndarray for a in batch.values()):
        return batch
    return jax.tree.map(_host_array, batch)


def _host_array(leaf: Any) -> Any:
    if isinstance(leaf, _HOST_KINDS) or not hasattr(leaf, "__array__"):
        return leaf
    return np.asarray(leaf)


def batch_size_of(batch: Any) -> int:
    """The leading dimension shared by every array of a batch (runs per batch: kept cheap)."""
    leaves = batch.values() if type(batch) is dict else jax.tree.leaves(batch)
    sizes = set()
    for a in leaves:
        shape = a.shape if type(a) is np.ndarray else None
        if shape is None:  # nested containers, scalars, device arrays: the general path
            sizes.update(np.shape(x)[0] for x in jax.tree.leaves(a) if np.ndim(x))
        elif shape:
            sizes.add(shape[0])
    if not sizes:
        kinds = sorted({type(a).__name__ for a in leaves})
        raise ValueError(f"a batch holds no arrays with a batch axis (it holds {', '.join(kinds) or 'nothing'}); "
                         "give its values as numpy or JAX arrays (np.asarray(...)), [batch, ...].")
    if len(sizes) != 1:
        raise ValueError(f"batch arrays must share their first (batch) axis; found sizes {sorted(sizes)}.")
    return sizes.pop()


def batch_shapes(batch: Any) -> tuple:
    """What the compiled step depends on besides the batch size: the batch's structure and each array's
    shape past the batch axis and dtype (runs per batch: a fast path for a flat dict of arrays, numpy or JAX)."""
    if type(batch) is dict and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in batch.values()):
        return tuple(sorted((key, a.shape[1:], a.dtype) for key, a in batch.items()))  # numpy and JAX alike
    leaves, treedef = jax.tree.flatten(batch)
    return (treedef, *((np.shape(x)[1:], getattr(x, "dtype", type(x))) for x in leaves))


def describe_shapes(batch: Any) -> str:
    """A batch's array shapes and dtypes for a message: ``{'x': (32, 3) float32, 'label': (32,) int32}``."""
    return str(jax.tree.map(lambda a: _Verbatim(f"{tuple(np.shape(a))} {getattr(a, 'dtype', type(a).__name__)}"), batch))


class _Verbatim(str):
    """A string that a container's ``repr`` shows without quotes."""

    def __repr__(self) -> str:
        return str(self)


def add_note(error: BaseException, text: str) -> None:
    """``error.add_note(text)`` where Python has it (3.11+): context shown under the error's message (none
    for an empty text)."""
    if text and hasattr(error, "add_note"):
        error.add_note(text)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (JAX's run over many), for a message of our own."""
    text = str(error)
    return text.splitlines()[0] if text else ""


def pad_batch(batch: Any, size: int) -> tuple[Any, np.ndarray]:
    """Pad every array of ``batch`` to ``size`` rows (repeating row 0) and a mask of real rows.

    Evaluation pads its last, smaller batch so that one compiled function serves every batch
    and the mask keeps padded rows out of every metric.
    """
    n = batch_size_of(batch)
    if n > size:
        raise ValueError(f"a batch of {n} examples is larger than the first batch ({size}); "
                         "batches after the first may only be smaller (the last one).")
    mask = np.arange(size) < n
    if n == size:
        return batch, mask

    def pad(a):
        a = np.asarray(a)
        return np.concatenate([a, np.repeat(a[:1], size - n, axis=0)], axis=0)

    return jax.tree.map(pad, batch), mask


def non_numeric_note(batch: Any) -> str | None:
    """For an error tracing a batch: the arrays in it that hold no numbers (file names, say), which JAX
    cannot take, named by their path in the batch; ``None`` when there are none."""
    paths = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]
             if not holds_numbers(np.asarray(leaf).dtype)] if batch is not None else []
    if not paths:
        return None
    return (f"(the batch's {', '.join(paths)} {'holds' if len(paths) == 1 else 'hold'} no numbers, which JAX cannot "
            "take: every array of a batch goes to the device, so drop it from the batches or encode it as numbers)")


def placing(batch: Any, place: Any, stacked: bool = False) -> Any:
    """``place(batch)`` (a ``place_batch``); a batch its sharding cannot split evenly over the devices gets a
    note saying which batch size would do (JAX names only the array's dimension)."""
    try:
        return place(batch)
    except ValueError as err:
        if type(err).__name__ == "IndivisibleError" or "divisible" in str(err):
            rows = batch_size_of(jax.tree.map(lambda a: a[0], batch) if stacked else batch)
            add_note(err, f"(a batch of {rows} rows cannot be split evenly over the devices its sharding spreads "
                          f"it across ({jax.device_count()} here): use a batch size that is a multiple of that "
                          "count, for fit, eval_data and evaluate / predict of arrays alike (batch_size=...))")
        raise
