"""``TrainState``: everything a training step changes, as one pytree the compiled step donates.

The model is split once (``nnx.split``) into its graph definition (static, kept outside), its
``nnx.Param`` leaves and the rest (RNG stream counters, batch-norm statistics...), so stateful
layers travel through the step and a resumed run continues the same random stream.
"""

from __future__ import annotations

import functools

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from trainer.packing import specs_of


@struct.dataclass
class TrainState:
    """Model parameters, the model's other state, the optimizer state and the step counter.

    ``guard`` is the non-finite guard's device state (``None`` until a ``NaNDetector`` asks for it).
    """

    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState
    step: jax.Array
    guard: dict[str, jax.Array] | None = None

    @classmethod
    def create(cls, model: nnx.Module, tx: optax.GradientTransformation,
               own_arrays: bool = False) -> tuple[nnx.GraphDef, "TrainState"]:
        """Split ``model`` and initialise ``tx`` on its parameters; returns ``(graphdef, state)``.

        ``own_arrays``: the state holds a copy of the module's arrays, and the module is pointed at it.
        A train step donates (reuses) the state's arrays; with its own copy, arrays held elsewhere (by
        another trainer of this module, a snapshot taken before) stay valid, and the originals are
        freed unless someone else holds them.
        """
        graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        if any(is_sown(v) for _, v in nnx.to_flat_state(model_state)):  # sown by a call before: the user's
            module = nnx.merge(graphdef, params, model_state)  # (their module keeps them), not the trainer's
            nnx.pop(module, lambda _, v: is_sown(v))
            graphdef, params, model_state = nnx.split(module, nnx.Param, ...)
        if own_arrays:
            params, model_state = jax.device_put((params, model_state), may_alias=False)
            nnx.update(model, params, model_state)
        state = cls(params=params, model_state=model_state, opt_state=tx.init(params),
                    step=jnp.zeros((), jnp.int32))
        return graphdef, state

    def merge(self, graphdef: nnx.GraphDef) -> nnx.Module:
        """A module holding this state's arrays, in Variables of its own.

        ``copy=True``: a forward pass updates the module's Variables (RNG counters, batch
        statistics); shared with this state, it would change ``model_state`` too, and a step the
        non-finite guard skips would keep the bad batch's statistics instead of the old ones.
        """
        return nnx.merge(graphdef, self.params, self.model_state, copy=True)


def is_sown(variable: Any) -> bool:
    """Whether a variable holds values ``sow`` collected (an ``nnx.Intermediate`` holding a tuple): a call's
    own, not the model's state (an ``Intermediate`` holding an array, ``nnx.perturb``'s say, is)."""
    return isinstance(variable, nnx.Intermediate) and isinstance(variable.get_raw_value(), tuple)


def has_batch_statistics(model_state: Any) -> bool:
    """Whether a model state holds batch statistics (``nnx.BatchStat``: BatchNorm's running mean and variance)."""
    return bool(jax.tree.leaves(nnx.filter_state(model_state, nnx.BatchStat)))


def zeros_like_tree(tree: Any) -> Any:
    """Device zeros shaped like ``tree`` (arrays or ``jax.ShapeDtypeStruct``s), in one dispatch."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, _zeros(specs_of(leaves)))


@functools.partial(jax.jit, static_argnums=0)
def _zeros(specs: tuple) -> list:
    return [jnp.zeros(shape, dtype) for shape, dtype in specs]


def reseed_streams(model: nnx.Module, seed: int) -> None:
    """Gives every RNG stream of ``model`` a key derived from ``seed`` and the stream's name (split to the
    shape of a stream's keys where they are not one: layers stacked by ``nnx.vmap``, one key per layer)."""
    tags = {node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
    if tags:
        base = jax.random.key(seed)
        nnx.reseed(model, policy="match_shape", **{tag: jax.random.fold_in(base, zlib.crc32(tag.encode())) for tag in tags})
