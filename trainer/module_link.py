"""The user's module and the trainer's state kept one: weights written into the module are trained.

The trainer trains a split copy of the module (``TrainState``) and writes it back into the module when
someone reads ``trainer.model``. A write the other way, into the module (pretrained weights or an
export loaded after the Trainer was built, a Keras-style ``set_weights`` in a callback), would be lost:
the next step trains the state's copy. ``ModuleLink`` remembers, for each variable of the module, the
array the trainer last left there; ``adopt_written_weights`` takes any other into the state: when
``fit``, ``evaluate`` or ``predict`` start, at each epoch's start, before a checkpoint saves, at the next
step after a callback read ``trainer.model``, and before a read of ``trainer.model`` would overwrite it.
Taken are the parameters and the other state but the RNG streams (BatchNorm's statistics, say):
running the model in eval mode, or Monte-Carlo dropout through ``trainer.model``, moves only its RNG
counters, so training goes on as it was (a call in train mode moves BatchNorm's statistics, which are
then taken, as in Keras).

Several Trainers of one module each train their own copy: what the last Trainer to write a variable put
there, while that Trainer lives, is no write for any of them (a freed one's weights there are the module's,
taken as any write); a write one of them takes first is still taken by the others (``_pending``), and a
restore of one (a state assigned) discards it for that one only.
A layer added, removed or replaced by another class is refused, found where the module is walked
(every point above but the step after a read, which looks only at the variables of the last walk).
"""

from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from trainer.checkpoint_arrays import place_like

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer

Path = tuple  # a variable's attribute path in the module: ("layers", 0, "kernel")

_LINKS: "weakref.WeakKeyDictionary[nnx.Module, weakref.WeakSet]" = weakref.WeakKeyDictionary()
"""Every live ``ModuleLink`` of a module: a write one of them found first is kept for the others to take."""

_LAST: "weakref.WeakKeyDictionary[nnx.Module, dict]" = weakref.WeakKeyDictionary()
"""For each module and variable path, the Trainer that last put a value there and the value (both weakly):
that value, while its Trainer lives, is no write for any Trainer of the module; anything else there is."""


TRANSIENT = (nnx.Intermediate, nnx.Cache)
"""Variables a call adds and fills for itself (``sow``; ``init_cache`` for decoding): no layer of the model,
and none of the weights it trains. Those the module held when the Trainer was built (sown values aside) stay in
its state, and the module's get arrays of their own: the module's to change from then on."""


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _variables(tree: Any) -> list[tuple[Path, nnx.Variable]]:
    """A state's (or the module's) variables with their attribute paths, in the state's leaf order."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
    return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), v) for path, v in flat]


def _state_variables(state: Any) -> list[tuple[Path, nnx.Variable]]:
    """A ``TrainState``'s variables, parameters first: the order of ``jax.tree.leaves((params, model_state))``."""
    return _variables(state.params) + _variables(state.model_state)


def _name(path: Path) -> str:
    return ".".join(map(str, path))


class ModuleLink:
    """The user's module, the arrays this trainer last left in each of its variables, and writes another
    Trainer of the module took first (``_pending``)."""

    def __init__(self, model: nnx.Module, state: Any):
        self.model = model
        self.lent = False  # trainer.model was handed out since the last check: a callback may have written to it
        self._holds: weakref.ref | None = None  # the state the module was last updated from
        variables = _state_variables(state)
        self._paths = [path for path, _ in variables]  # in the state's order
        self._transient = {path for path, v in variables if isinstance(v, TRANSIENT)}  # the module's own to change
        self._num_params = len(_variables(state.params))
        # arrays each variable holds (0 for None, several for a tuple): where its leaves sit in the state's
        self._counts = [len(jax.tree.leaves(v.get_raw_value())) for _, v in variables]
        self._one_leaf_each = all(count == 1 for count in self._counts)  # values read in one C++ flatten
        self._pending: dict[Path, Any] = {}
        if self._transient:  # the module's own from now on: arrays apart from the state's, which steps donate
            for path, node in nnx.iter_graph(model):
                if path in self._transient and isinstance(node, nnx.Variable):
                    _set_raw_value(node, _copied(node.get_raw_value()))
        self._structure = self._walk()
        self._claim()  # its own copies, just put there (TrainState.create): no write for it or the others
        _LINKS.setdefault(model, weakref.WeakSet()).add(self)

    def _walk(self) -> tuple:
        """Finds the module's variables again (a layer replaced since has new ones) and returns its structure:
        each submodule's and variable's path and class."""
        nodes = [(path, node) for path, node in nnx.iter_graph(self.model)  # a call's sown values and decoding
                 if isinstance(node, (nnx.Module, nnx.Variable)) and not isinstance(node, TRANSIENT)]  # caches
        by_path = {path: node for path, node in nodes if isinstance(node, nnx.Variable)}  # come and go
        self._vars = [(path, by_path.get(path)) for path in self._paths  # None: a variable the module lost
                      if path not in self._transient]
        self._weights = [(path, v) for path, v in self._vars if v is not None and not isinstance(v, nnx.RngState)]
        self._targets = [(path, v) for path, v in self._vars if v is not None]
        return tuple((path, type(node)) for path, node in nodes)

    def check_structure(self) -> None:
        """Walks the module and refuses it when a layer was added, removed or replaced by another class."""
        structure = self._walk()
        if structure == self._structure:
            return
        was, now = dict(self._structure), dict(structure)
        paths = {p for p in {*was, *now} if was.get(p) is not now.get(p)}
        paths = [p for p in paths if not any(p[:i] in paths for i in range(len(p)))]  # a layer, not each of its parts
        changed = [f"{_name(p)} ({'added' if p not in was else 'removed' if p not in now else 'now a ' + now[p].__name__})"
                   for p in sorted(paths, key=str)]
        raise ValueError(f"the model's layers changed since the Trainer was built: {', '.join(changed[:4])}. Build a "
                         "new Trainer for the changed model (write weights into the existing layers to train from them).")

    def _claim(self) -> None:
        """Records what the module holds now as put there by this trainer (the last to write each path)."""
        last, me = _LAST.setdefault(self.model, {}), weakref.ref(self)
        for path, v in self._targets:  # RNG streams too: no write, but another Trainer's arrays (``unshared``)
            last[path] = (me, _token(v.get_raw_value()))
        self._pending.clear()

    def _put_by_a_trainer(self, last: dict, path: Path, value: Any, mine: bool = False) -> bool:
        """Whether ``value`` at ``path`` is what the last Trainer to write there put (``last``: the module's
        records; ``mine``: this one), and that Trainer lives: a freed one's weights there are the module's,
        taken as a write."""
        record = last.get(path)
        if record is None:
            return False
        writer = record[0]()
        return writer is not None and (writer is self or not mine) and _held(record[1]) is value

    def restore(self, state: Any) -> Any:
        """A state assigned (a restore, a rollback, a resume): what was written into the module and not yet
        taken is discarded for this trainer, kept for the others, and the module holds the restored state
        (in the variables it has now: one replaced by a new object since the last walk is the one written).
        Returns the state to train: ``state``, with copies of arrays another Trainer trains (``unshared``)."""
        state = self.unshared(state)
        _keep_unseen_writes(self.siblings())
        self._walk()
        self.write(state)
        return state

    def unshared(self, state: Any) -> Any:
        """``state`` with copies of the arrays another live Trainer of the module put there and still trains, and
        of the module's own caches (a state assigned from the module, ``nnx.state(model)``): this trainer's steps
        donate what its state holds."""
        theirs = set()
        for writer, token in _LAST.get(self.model, {}).values():
            if writer() not in (None, self):
                theirs.add(id(_held(token)))
        if self._transient:  # the module's own caches and sown values (a state split from trainer.model)
            theirs |= {id(x) for path, node in nnx.iter_graph(self.model) if path in self._transient
                       and isinstance(node, nnx.Variable) for x in jax.tree.leaves(node.get_raw_value())}
        if not theirs:
            return state
        return jax.tree.map(lambda x: _copied(x) if id(x) in theirs else x, state)

    def stale(self, state: Any) -> bool:
        """Whether the module was last updated from another state than ``state``."""
        return self._holds is None or self._holds() is not state

    def writes(self) -> tuple[dict[Path, Any], dict[Path, Any]]:
        """``(found, pending)``: the values in the module's variables (of the last walk) that no live Trainer
        put there last (a user's, or a callback's, write); and those another Trainer of the module found and
        took first."""
        found, last = {}, _LAST.get(self.model, {})
        for path, v in self._weights:
            value = v.get_raw_value()
            if not self._put_by_a_trainer(last, path, value):  # this trainer's, or another live one's, last put
                found[path] = value
        return found, {p: x for p, x in self._pending.items() if p not in found}

    def holds_its_own(self) -> bool:
        """Whether every weight of the module is the one this trainer left there (not another Trainer's)."""
        last = _LAST.get(self.model, {})
        return all(self._put_by_a_trainer(last, path, v.get_raw_value(), mine=True) for path, v in self._weights)

    def write(self, state: Any) -> None:
        """Puts ``state``'s arrays into the module's variables, as the ones this trainer left there."""
        if self._one_leaf_each:
            values = jax.tree.leaves((state.params, state.model_state))
        else:
            values = [v.get_raw_value() for _, v in _state_variables(state)]
        values = dict(zip(self._paths, values))
        for path, var in self._targets:
            _set_raw_value(var, values[path])
        self._holds = weakref.ref(state)
        self._claim()

    def siblings(self) -> list["ModuleLink"]:
        return [link for link in _LINKS.get(self.model, ()) if link is not self]


def before_another_trainer(model: nnx.Module) -> None:
    """A new Trainer of ``model`` is about to put its copies into it: what was written there and not yet taken
    by each existing Trainer of it is kept for them to take (their next check would see only copies)."""
    _keep_unseen_writes(list(_LINKS.get(model, ())))


def _keep_unseen_writes(links: list[ModuleLink]) -> None:
    """Each link keeps the writes now in the module that it has not taken (in the variables the module has
    now, found by a walk), before another Trainer's values replace them there (a new Trainer's copies, a
    restore's state)."""
    for link in links:
        link._walk()
        link._pending.update(_kept(link.writes()[0]))


def _kept(found: dict[Path, Any]) -> dict[Path, Any]:
    """Copies of written values for a Trainer to take later: the value written may be an array another
    Trainer's state holds (a layer copied from one it lent, a state assigned from the module), which that
    Trainer's next step donates."""
    return {path: _copied(value) for path, value in found.items()}


def _copied(tree: Any) -> Any:
    """``tree`` with a copy of each JAX array in it (its placement kept), other leaves as they are."""
    return jax.tree.map(lambda x: jax.device_put(x, may_alias=False) if isinstance(x, jax.Array) else x, tree)


def _raw_value_setter():
    """``Variable.set_raw_value`` without its check of the trace it is called in (10 us a call; the link
    writes on the host, outside any trace), where this flax version takes the flag."""
    try:
        inspect.signature(nnx.Variable.set_raw_value).bind(None, None, _unsafe_bypass_check=True)
    except TypeError:
        return lambda variable, value: variable.set_raw_value(value)
    return lambda variable, value: variable.set_raw_value(value, _unsafe_bypass_check=True)


_set_raw_value = _raw_value_setter()


class _Plain:
    """A value that cannot be held weakly (a Python number), held as it is."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __call__(self) -> Any:
        return self.value


def _token(value: Any) -> Any:
    try:
        return weakref.ref(value)
    except TypeError:
        return _Plain(value)


def _held(token: Any) -> Any:
    return None if token is None else token()


def _placed(new: Any, old: jax.Array) -> jax.Array:
    """``new`` as a copy of ``old``'s dtype, placed as ``old`` was (``place_like``, as a restore places: a
    committed copy pinned data parallel's parameters to device 0 and recompiled every step function)."""
    return place_like(old, new.astype(old.dtype) if isinstance(new, jax.Array) else np.asarray(new, old.dtype))


def adopt_written_weights(trainer: "Trainer", walk: bool = True) -> bool:
    """Takes the weights written into ``trainer.model`` since the trainer last left its own there (each
    placed, and of the dtype, as the array it replaces); True when it took any. ``walk``: look for layers
    replaced since (the module walked); without, only the variables of the last walk are looked at."""
    link = trainer._link
    link.lent = False
    if walk:
        link.check_structure()
    found, pending = link.writes()
    if not found and not pending:
        return False
    if not walk:  # a write: the layers are checked before it is taken
        link.check_structure()
        found, pending = link.writes()
    state = trainer.state
    written = {**pending, **found}
    leaves, treedef = jax.tree.flatten((state.params, state.model_state))
    adopted, start = [], 0
    for i, (path, count) in enumerate(zip(link._paths, link._counts)):  # each variable's arrays, in order
        olds, start = leaves[start:start + count], start + count
        new = written.get(path, olds)
        news = olds if new is olds else jax.tree.leaves(new)
        if [np.shape(x) for x in news] != [x.shape for x in olds]:
            kind = "parameter" if i < link._num_params else "state"
            shape = lambda xs: " ".join(str(np.shape(x)) for x in xs) or "nothing"  # noqa: E731
            raise ValueError(f"the model's {kind} {_name(path)} was given shape {shape(news)}, but it has shape "
                             f"{shape(olds)}: write values of each one's shape (or build a new Trainer for a model "
                             "of other shapes).")
        adopted += olds if new is olds else [_placed(n, o) for n, o in zip(news, olds)]
    params, model_state = jax.tree.unflatten(treedef, adopted)
    trainer._carry.state = state.replace(params=params, model_state=model_state)  # not a restore (the setter)
    link.write(trainer.state)
    for sibling in link.siblings():  # each trains its own copy, from the same write
        sibling._pending.update(_kept(found))
    return True


def lend_model(trainer: "Trainer", walk: bool | None = None) -> nnx.Module:
    """``trainer.model``: the module holding the trainer's state. A write since (through a reference kept
    from an earlier read) is taken first, not written over; another Trainer's weights there are.
    ``walk``: check the layers first (default: outside ``fit``; inside it the next epoch's start does)."""
    link = trainer._link
    adopt_written_weights(trainer, walk=not trainer.fitting if walk is None else walk)
    state = trainer.state
    if link.stale(state) or not link.holds_its_own():
        link.write(state)
    link.lent = True  # what a callback writes into it is trained from the next step
    return link.model
