"""The user's module and the trainer's state kept one: parameters written into the module are trained.

The trainer trains a split copy of the module (``TrainState``) and writes it back into the module when
someone reads ``trainer.model``. A write the other way, into the module's parameters (pretrained
weights loaded after the Trainer was built, a Keras-style ``set_weights`` in a callback), was lost:
the next step trained the state's parameters. ``ModuleLink`` remembers which arrays the trainer last
put into the module; ``adopt_written_params`` (when ``fit`` starts, and at the next step after a
callback read ``trainer.model``) takes any others into the state. Only parameters are taken: running
the model (Monte-Carlo dropout through ``trainer.model``) changes its RNG counters, never its
parameters, so reading the model mid-fit still leaves training bit for bit as it was.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


def _ref(value: Any) -> Any:
    try:
        return weakref.ref(value)
    except TypeError:  # a Python number in a Param: held as it is
        return lambda: value


class ModuleLink:
    """The user's module and the parameter arrays the trainer last put into it."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.lent = False  # trainer.model was handed out since the last check: a callback may have written to it
        self._held: list = []
        self._holds: weakref.ref | None = None  # the state the module was last updated from
        self.hold()

    def lend(self, state: Any) -> nnx.Module:
        """The module holding ``state``: updated only when the state changed since the last lend, so what
        calling it changes (dropout's RNG counters: Monte-Carlo dropout) is not reset by reading it again."""
        if self._holds is None or self._holds() is not state:
            nnx.update(self.model, state.params, state.model_state)
            self._holds = weakref.ref(state)
            self.hold()
        self.lent = True  # what a callback writes into its parameters is trained from the next step
        return self.model

    def hold(self) -> None:
        """Remembers the module's parameter arrays as the trainer's (after the trainer wrote them)."""
        self._held = [_ref(x) for x in jax.tree.leaves(nnx.state(self.model, nnx.Param))]

    def written_params(self) -> nnx.State | None:
        """The module's parameters when any was written since ``hold``, else ``None``."""
        params = nnx.state(self.model, nnx.Param)
        leaves = jax.tree.leaves(params)
        if len(leaves) == len(self._held) and all(ref() is x for ref, x in zip(self._held, leaves)):
            return None
        return params


def adopt_written_params(trainer: "Trainer") -> bool:
    """Takes parameters written into ``trainer.model`` since the trainer last wrote it into the state
    (each placed, and of the dtype, as the parameter it replaces); True when it took any."""
    link = trainer._link
    link.lent = False
    written = link.written_params()
    if written is None:
        return False
    current = trainer.state.params
    if jax.tree.structure(written) != jax.tree.structure(current):
        raise ValueError("the model's parameters no longer have the structure the Trainer was built with (a layer "
                         "added, removed or replaced since): build a new Trainer for the changed model.")
    bad = [(jax.tree_util.keystr(path), np.shape(new), old.shape) for (path, new), old in
           zip(jax.tree_util.tree_leaves_with_path(written), jax.tree.leaves(current)) if np.shape(new) != old.shape]
    if bad:
        name, new, old = bad[0]
        raise ValueError(f"the model's parameter {name} was given shape {new}, but it has shape {old}: write values "
                         "of each parameter's shape (or build a new Trainer for a model of other shapes).")
    params = jax.tree.map(lambda new, old: jax.device_put(np.asarray(new, old.dtype) if not isinstance(new, jax.Array)
                                                          else new.astype(old.dtype), old.sharding, may_alias=False),
                          written, current)
    trainer.state = trainer.state.replace(params=params)
    nnx.update(link.model, params)
    link.hold()
    return True
