"""The user's module and the trainer's state kept one: weights written into the module are trained.

The trainer trains a split copy of the module (``TrainState``) and writes it back into the module when
someone reads ``trainer.model``. A write the other way, into the module (pretrained weights or an
export loaded after the Trainer was built, a Keras-style ``set_weights`` in a callback), was lost:
the next step trained the state's copy. ``ModuleLink`` remembers which arrays the trainer last put
into the module; ``adopt_written_weights`` takes any others into the state: when ``fit``, ``evaluate``
or ``predict`` start, at each epoch's start, at the next step after a callback read ``trainer.model``,
and before a read of ``trainer.model`` would overwrite them. Taken are the parameters and the other
state but the RNG streams (BatchNorm's statistics, say): running the model in eval mode, or Monte-Carlo
dropout through ``trainer.model`` without BatchNorm, moves only its RNG counters, so training goes on as
it was (a call in train mode moves BatchNorm's statistics, which are then taken, as in Keras). What a
second Trainer of the same module puts there is no write: each trains its own copy.
"""

from __future__ import annotations

import functools
import weakref
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from trainer.checkpoint_store import place_like

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer

WEIGHTS = nnx.Not(nnx.RngState)  # what a write into the module means: parameters and statistics, not RNG streams


_PLACED: dict[int, tuple[weakref.ref, weakref.WeakSet]] = {}  # id(array) -> (it, the modules a trainer put it in)


def _register(value: Any, module: nnx.Module) -> None:
    """Records that a trainer put ``value`` into ``module``: there it is no user's write."""
    entry = _PLACED.get(id(value))
    if entry is None or entry[0]() is not value:
        try:
            entry = (weakref.ref(value, functools.partial(_forget, id(value))), weakref.WeakSet())
        except TypeError:  # a Python number in a Variable: not tracked
            return
        _PLACED[id(value)] = entry
    entry[1].add(module)


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _PLACED.get(key)
    if entry is not None and entry[0] is ref:  # not another array's since given the same id
        del _PLACED[key]


def _put_there_by_a_trainer(value: Any, module: nnx.Module) -> bool:
    """Whether a trainer put ``value`` into ``module`` (this trainer, perhaps donated since, or a second
    Trainer of the same module): the first keeps training its own copy. An array a trainer put into
    another module (a pretrained model's, loaded into this one) is a write. Both held weakly: a freed
    module's or array's successor at the same address is not taken for it."""
    entry = _PLACED.get(id(value))
    return entry is not None and entry[0]() is value and module in entry[1]


class ModuleLink:
    """The user's module, and (``hold``) the weight arrays a trainer put into it."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.lent = False  # trainer.model was handed out since the last check: a callback may have written to it
        self._holds: weakref.ref | None = None  # the state the module was last updated from
        self.hold()

    def stale(self, state: Any) -> bool:
        """Whether the module holds another state than ``state``: lending it would write over the module."""
        return self._holds is None or self._holds() is not state

    def lend(self, state: Any) -> nnx.Module:
        """The module holding ``state``: updated only when the state changed since the last lend, so what
        calling it changes (dropout's RNG counters: Monte-Carlo dropout) is not reset by reading it again."""
        if self.stale(state):
            nnx.update(self.model, state.params, state.model_state)
            self._holds = weakref.ref(state)
            self.hold()
        self.lent = True  # what a callback writes into it is trained from the next step
        return self.model

    def hold(self) -> None:
        """Remembers the module's weight arrays as the trainer's: after the trainer wrote them, or when
        a state is assigned (a restore: what was written into the module then belongs to the state it
        replaced, which the restore discards)."""
        for x in jax.tree.leaves(nnx.state(self.model, WEIGHTS)):
            _register(x, self.model)

    def written(self) -> bool:
        """Whether any weight of the module was written since ``hold`` by someone else than a trainer (a
        second Trainer of the same module puts its own copy there: the first keeps training its own)."""
        leaves = jax.tree.leaves(nnx.state(self.model, WEIGHTS))
        return any(not _put_there_by_a_trainer(x, self.model) for x in leaves)


def _placed(new: Any, old: jax.Array) -> jax.Array:
    """``new`` as a copy of ``old``'s dtype, placed as ``old`` was (``place_like``, as a restore places: a
    committed copy pinned data parallel's parameters to device 0 and recompiled every step function)."""
    return place_like(old, new.astype(old.dtype) if isinstance(new, jax.Array) else np.asarray(new, old.dtype))


def _replaced(current: Any, written: Any, what: str, module: nnx.Module) -> Any:
    """``current`` with each leaf that ``written`` has at the same path, and no trainer put there, replaced
    by its placed copy."""
    by_path = {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_flatten_with_path(written)[0]}
    paths, treedef = jax.tree_util.tree_flatten_with_path(current)
    leaves = []
    for path, old in paths:
        name = jax.tree_util.keystr(path)
        new = by_path.pop(name, None)
        if new is not None and _put_there_by_a_trainer(new, module):
            new = None  # a trainer's own array (this one's, perhaps donated since, or another's): not a write
        if new is not None and np.shape(new) != old.shape:
            raise ValueError(f"the model's {what} {name} was given shape {np.shape(new)}, but it has shape {old.shape}: "
                             "write values of each one's shape (or build a new Trainer for a model of other shapes).")
        leaves.append(old if new is None else _placed(new, old))
    if by_path:
        raise ValueError(f"the model has {what}s the Trainer was not built with ({', '.join(sorted(by_path)[:3])}): a layer "
                         "added or replaced since; build a new Trainer for the changed model.")
    return jax.tree.unflatten(treedef, leaves)


def adopt_written_weights(trainer: "Trainer") -> bool:
    """Takes the weights written into ``trainer.model`` since the trainer last wrote it into the state
    (each placed, and of the dtype, as the array it replaces); True when it took any."""
    link = trainer._link
    link.lent = False
    if not link.written():
        return False
    state = trainer.state
    written = nnx.state(link.model, nnx.Param)
    if jax.tree.structure(written) != jax.tree.structure(state.params):
        raise ValueError("the model's parameters no longer have the structure the Trainer was built with (a layer "
                         "added, removed or replaced since): build a new Trainer for the changed model.")
    params = _replaced(state.params, written, "parameter", link.model)
    others = nnx.state(link.model, nnx.All(WEIGHTS, nnx.Not(nnx.Param)))
    model_state = _replaced(state.model_state, others, "state", link.model)
    trainer.state = state.replace(params=params, model_state=model_state)
    nnx.update(link.model, params, model_state)
    link.hold()
    return True


def lend_model(trainer: "Trainer") -> nnx.Module:
    """``trainer.model``: the module holding the trainer's state; a write through a reference kept from an
    earlier read is taken first, not written over."""
    link, state = trainer._link, trainer.state
    if link.stale(state) and adopt_written_weights(trainer):
        state = trainer.state
    return link.lend(state)
