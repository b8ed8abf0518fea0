"""Optimizers and learning-rate schedules from plain values, built from optax's own pieces.

``make_schedule`` and ``make_optimizer`` take plain numbers and names (what a command line gives);
``OptimConfig`` bundles them as one dataclass. The learning rate is injected with
``optax.inject_hyperparams`` so that its current value lives in the optimizer state, where
``current_learning_rate`` (and the learning-rate monitor) read it, never recomputed by hand.
``OPTIMIZERS`` and ``SCHEDULES`` list the names ``make_optimizer`` and ``make_schedule`` accept.

Example::

    from trainer.optim import OptimConfig
    tx = OptimConfig(optimizer="adamw", learning_rate=3e-3, schedule="warmup_cosine",
                     warmup_steps=100, clip_norm=1.0).build(total_steps=1000)
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import ReduceLROnPlateauState

from trainer.settings import setting

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "cosine", "exponential")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; choose one of {list(allowed)}.")


def make_schedule(
    name: str = "constant",
    *,
    learning_rate: float,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    end_learning_rate: float = 0.0,
    decay_rate: float = 0.1,
    decay_steps: int | None = None,
) -> optax.Schedule:
    """A learning-rate schedule, optionally preceded by a linear warmup from 0.

    Args:
      name: ``constant``; ``warmup_cosine`` (alias ``cosine``): cosine decay from the peak to
        ``end_learning_rate`` over ``total_steps``; ``exponential``: multiply by ``decay_rate``
        every ``decay_steps`` (default: ``total_steps``) after the warmup.
      learning_rate: the peak (post-warmup) value; must be positive.
      total_steps: the run's length in optimizer steps (needed by ``warmup_cosine``).
      warmup_steps: steps of linear warmup from 0 to ``learning_rate`` (0 for none).
      end_learning_rate: where ``warmup_cosine`` ends, and the floor of a decaying ``exponential``
        (0: none); at most ``learning_rate``.

    Raises:
      ValueError: a non-positive learning rate, an unknown name, or missing ``total_steps``.
    """
    _check_choice("schedule", name, SCHEDULES)
    if (isinstance(learning_rate, (str, bytes, bool)) or np.ndim(learning_rate) != 0
            or not np.issubdtype(np.asarray(learning_rate).dtype, np.number)):
        raise TypeError(f"learning_rate={learning_rate!r} must be a number (the peak rate, e.g. 1e-3); a schedule of "
                        "your own goes to make_optimizer(name, learning_rate=schedule).")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate} must be positive (try 1e-3).")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
    if name in ("warmup_cosine", "cosine"):
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(
                f"schedule={name!r} needs total_steps larger than warmup_steps={warmup_steps}; "
                f"got total_steps={total_steps}. Give max_steps or max_epochs with a sized dataset."
            )
        _check_end(end_learning_rate, learning_rate, name)
        return optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, total_steps, end_value=end_learning_rate
        )
    if name == "constant":
        main = optax.constant_schedule(learning_rate)
    else:  # exponential
        steps = decay_steps or total_steps
        if not steps or steps <= 0:
            raise ValueError("schedule='exponential' needs decay_steps (or total_steps) > 0.")
        if not 0 < decay_rate:
            raise ValueError(f"decay_rate={decay_rate} must be positive (0.1 decays tenfold).")
        floor = None
        if decay_rate < 1 and end_learning_rate:
            _check_end(end_learning_rate, learning_rate, name)
            floor = end_learning_rate
        elif decay_rate > 1 and end_learning_rate:  # optax would take it as a ceiling and pin the rate there
            warnings.warn(f"end_learning_rate={end_learning_rate} is the floor of a decaying exponential; "
                          f"decay_rate={decay_rate} grows the rate: ignored.", stacklevel=2)
        main = optax.exponential_decay(learning_rate, steps, decay_rate, end_value=floor)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], [warmup_steps])


def _check_end(end_learning_rate: float, learning_rate: float, schedule: str) -> None:
    if end_learning_rate > learning_rate:
        raise ValueError(f"end_learning_rate={end_learning_rate} is above learning_rate={learning_rate}, but "
                         f"schedule={schedule!r} decays from learning_rate to it; give an end below the peak.")


WEIGHT_DECAY_MASKS = ("all", "matrices")


def decay_mask(weight_decay_mask: Any) -> Any:
    """optax's ``mask`` for weight decay: ``None`` for ``"all"``; for ``"matrices"`` the parameters of 2 or
    more axes (kernels, embeddings), not biases or norm scales (GPT-2's practice: a parameter named
    ``bias`` or ``scale`` is left out whatever its shape, attention's ``[heads, head_dim]`` biases too);
    else as given."""
    if isinstance(weight_decay_mask, str):
        _check_choice("weight_decay_mask", weight_decay_mask, WEIGHT_DECAY_MASKS)
        if weight_decay_mask == "all":
            return None
        return lambda params: jax.tree_util.tree_map_with_path(_is_matrix, params)
    return weight_decay_mask


def key_names(path: tuple) -> list[str]:
    """The names along a pytree path (dict keys, attribute names): ``['attention', 'query', 'bias', 'value']``."""
    return [str(getattr(key, "key", getattr(key, "name", ""))) for key in path]


def _is_matrix(path: tuple, param: Any) -> bool:
    return jnp.ndim(param) >= 2 and not set(key_names(path)) & {"bias", "scale"}


def make_optimizer(
    name: str = "adamw",
    *,
    learning_rate: float | optax.Schedule,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    b1: float = 0.9,
    b2: float = 0.999,
    clip_norm: float | None = None,
    weight_decay_mask: Any = "all",
) -> optax.GradientTransformation:
    """``adam``, ``adamw`` or ``sgd`` (with momentum / Nesterov), with optional global-norm clipping.

    ``weight_decay`` is decoupled for ``adamw`` and added to the gradient (L2-style) for ``adam``
    and ``sgd``; ``weight_decay_mask`` says which parameters it reaches: ``"all"`` (as optax, Keras
    and PyTorch do), ``"matrices"`` (2 or more axes: not biases or norm scales), or optax's own
    ``mask`` (a pytree of booleans or a function of the parameters). The learning rate is injected
    so ``current_learning_rate`` can read it.
    """
    _check_choice("optimizer", name, OPTIMIZERS)
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate} must be positive (try 1e-3).")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0.")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm={clip_norm} must be positive, or None for no clipping.")
    if not 0 <= momentum < 1:  # 1 or more never forgets (diverges); below 0 oscillates
        raise ValueError(f"momentum={momentum} must be in [0, 1) (0.9 is usual; 0 for plain SGD).")
    for beta, value in (("b1", b1), ("b2", b2)):
        if not 0 <= value < 1:
            raise ValueError(f"{beta}={value} must be in [0, 1) (Adam's defaults: b1=0.9, b2=0.999).")
    mask = decay_mask(weight_decay_mask)
    if name == "adamw":
        base = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
            learning_rate=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay, mask=mask)
    elif name == "adam":
        base = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, b1=b1, b2=b2)
    else:
        base = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate,
                                                   momentum=momentum or None, nesterov=nesterov)
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay and name != "adamw":
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(base)
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


@dataclasses.dataclass
class OptimConfig:
    """Plain optimizer + schedule settings; ``build(total_steps)`` gives the optax transformation.

    Each field declares the values it accepts (``trainer.settings``): a command line built from it
    refuses the others by flag name before training.
    """

    optimizer: str = setting("adamw", choices=OPTIMIZERS)
    learning_rate: float = setting(1e-3, above=0, why="the peak learning rate (try 1e-3)")
    schedule: str = setting("warmup_cosine", choices=SCHEDULES)
    warmup_steps: int = setting(0, at_least=0)
    end_learning_rate: float = setting(0.0, at_least=0)
    decay_rate: float = setting(0.1, above=0, why="0.1 decays tenfold")
    decay_steps: int | None = setting(None, at_least=1)
    weight_decay: float = setting(1e-4, at_least=0)
    momentum: float = setting(0.9, at_least=0, below=1, why="0.9 is usual; 0 for plain SGD")
    nesterov: bool = False
    b1: float = setting(0.9, at_least=0, below=1, why="Adam's first-moment decay")
    b2: float = setting(0.999, at_least=0, below=1, why="Adam's second-moment decay")
    clip_norm: float | None = setting(None, above=0, why="the global norm gradients are clipped to")
    weight_decay_mask: str = setting("all", choices=WEIGHT_DECAY_MASKS)

    def ignored_settings(self) -> list[str]:
        """The settings changed from their defaults that this optimizer or schedule does not use
        (``momentum`` of an Adam): ``build`` warns about them rather than ignoring them in silence."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [name for name in defaults if self._unused_because(name) and getattr(self, name) != defaults[name]]

    def _unused_because(self, name: str) -> str | None:
        """Why setting ``name`` is not read with the other settings, or ``None`` when it is."""
        users = _USED_ONLY_BY.get(name)
        if users and self.optimizer not in users and self.schedule not in users:
            return f"only {' / '.join(users)} read{'s' if len(users) == 1 else ''} it"
        if name == "weight_decay_mask" and not self.weight_decay:
            return "weight_decay is 0"
        if name == "nesterov" and self.optimizer == "sgd" and not self.momentum:
            return "momentum is 0"
        if name == "end_learning_rate" and self.schedule == "exponential" and self.decay_rate == 1:
            return "decay_rate 1 keeps the rate constant"
        return None

    def make_schedule(self, total_steps: int | None) -> optax.Schedule:
        """The learning-rate schedule of these settings over ``total_steps`` (``make_schedule``)."""
        return make_schedule(self.schedule, learning_rate=self.learning_rate, total_steps=total_steps,
                             warmup_steps=self.warmup_steps, end_learning_rate=self.end_learning_rate,
                             decay_rate=self.decay_rate, decay_steps=self.decay_steps)

    def build(self, total_steps: int | None = None) -> optax.GradientTransformation:
        """The optax transformation (``make_optimizer``) with this schedule over ``total_steps``."""
        ignored = self.ignored_settings()
        if ignored:
            warnings.warn(f"optimizer={self.optimizer!r}, schedule={self.schedule!r}: ignored " + "; ".join(
                f"{n}={getattr(self, n)!r} ({self._unused_because(n)})" for n in ignored) + ".", stacklevel=2)
        return make_optimizer(self.optimizer, learning_rate=self.make_schedule(total_steps),
                              weight_decay=self.weight_decay, momentum=self.momentum, nesterov=self.nesterov,
                              b1=self.b1, b2=self.b2, clip_norm=self.clip_norm,
                              weight_decay_mask=self.weight_decay_mask)


_USED_ONLY_BY = {  # settings that only some optimizers or schedules read
    "momentum": ("sgd",), "nesterov": ("sgd",), "b1": ("adam", "adamw"), "b2": ("adam", "adamw"),
    "end_learning_rate": ("warmup_cosine", "cosine", "exponential"),
    "decay_rate": ("exponential",), "decay_steps": ("exponential",),
}


CONCAT_NORM_MAX_SIZE = 1 << 17


def global_norm(tree: Any, squared: bool = False) -> jax.Array:
    """The float32 global norm of ``tree`` (``optax.tree.norm``'s value, within float rounding).

    A small tree (up to ``CONCAT_NORM_MAX_SIZE`` values) is laid end to end and squared and summed
    once: on XLA:CPU a sum per leaf costs two or three small kernels each (15 a step for the tiny
    MLP's 6 leaves, 8% of its fused chunk), the concatenation and one sum cost 2. A larger one is
    summed leaf by leaf, as optax does: there the copy would cost more than the kernels it saves
    (the MNIST CNN's 824k values: its guarded fused chunk ran ~17% slower). ``GradNormMonitor``
    and the trainer's non-finite guard both use it on the gradients, so XLA computes it once.
    """
    leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    if sum(x.size for x in leaves) > CONCAT_NORM_MAX_SIZE:
        return optax.tree.norm(leaves, squared=squared)
    flat = jnp.concatenate([jnp.ravel(x) for x in leaves]) if len(leaves) > 1 else jnp.ravel(leaves[0])
    total = jnp.sum(flat * flat)
    return total if squared else jnp.sqrt(total)


def current_learning_rate(opt_state: Any, hyperparam: str = "learning_rate") -> jax.Array | None:
    """The learning rate of the last update, read from ``inject_hyperparams`` state (else None, and None
    for several: ``learning_rates``); ``hyperparam`` names it where the optimizer calls it otherwise."""
    rates = learning_rates(opt_state, hyperparam)
    return rates[""] if list(rates) == [""] else None


def learning_rates(opt_state: Any, hyperparam: str = "learning_rate") -> dict[str, jax.Array]:
    """Every injected learning rate in ``opt_state`` by the labels leading to it: ``{"": rate}`` for one
    optimizer, ``{"head": ..., "backbone": ...}`` for ``optax.multi_transform``'s groups of their own.

    Each rate is the one the updates get: times the ``scale`` of every ``optax.contrib.reduce_on_plateau``
    in its group or above it (as Keras's and Lightning's monitors show a rate the plateau lowered)."""
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, hyperparam, filtering=lambda _path, value: isinstance(value, (jax.Array, np.ndarray)))
    plateaus = [(_groups(path), state.scale) for path, state in jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda node: isinstance(node, ReduceLROnPlateauState))[0]
        if isinstance(state, ReduceLROnPlateauState)]
    rates = [(_label(path[:-1]), _scaled(value, _groups(path), plateaus)) for path, value in found]
    if len(rates) == 1:
        return {"": rates[0][1]}
    return {label or str(i): value for i, (label, value) in enumerate(rates)}


def _label(path: tuple) -> str:
    """A rate's name: the dict keys along its path (``multi_transform``'s groups, ``named_chain``'s stages)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey) and k.key != "hyperparams")


def _groups(path: tuple) -> tuple[str, ...]:
    """The ``multi_transform`` groups along a path: what a plateau's scale reaches (a ``named_chain``'s stages run
    one after the other, so a plateau in any stage scales the whole chain's updates)."""
    return tuple(str(k.key) for before, k in zip((None, *path), path) if isinstance(k, jax.tree_util.DictKey)
                 and getattr(before, "name", None) == "inner_states")  # jax's GetAttrKey, optax's NamedTupleKey


def _scaled(rate: jax.Array, groups: tuple[str, ...], plateaus: list[tuple[tuple[str, ...], jax.Array]]) -> jax.Array:
    for where, scale in plateaus:  # a plateau scales the updates of the group it sits in, and of those inside it
        if groups[:len(where)] == where:
            rate = rate * jnp.asarray(scale, rate.dtype)
    return rate


def update(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any, loss: jax.Array) -> tuple[Any, Any]:
    """``tx.update`` as the train step calls it: a transformation that takes extra arguments gets
    ``value=loss`` (optax's convention: ``optax.contrib.reduce_on_plateau`` lowers the rate when the
    loss stops falling; ``optax.MultiSteps`` hands it on). One that needs more (a line search's
    ``value_fn``) is refused by name."""
    if not isinstance(tx, (optax.GradientTransformationExtraArgs, optax.MultiSteps)):
        return tx.update(grads, opt_state, params)
    try:
        return tx.update(grads, opt_state, params, value=loss)
    except TypeError as error:
        if "unexpected keyword argument 'value'" in str(error):  # one of the user's own that takes no extra argument
            return tx.update(grads, opt_state, params)
        missing = re.search(r"missing \d+ required keyword-only arguments?: (.*)", str(error))
        if not missing:
            raise
        raise TypeError(
            f"the optimizer's update needs {missing.group(1)}, which a Trainer does not give: the train step "
            "passes optax's extra argument value=<the step's loss> only (enough for optax.contrib."
            "reduce_on_plateau). Optimizers with a line search (optax.lbfgs, scale_by_zoom_linesearch) "
            "need value_fn: train them in a loop of your own.") from error


def optimizer_signature(opt_state: Any) -> str:
    """The optimizer's state as the kinds of its transforms, ``(ScaleByAdamState, EmptyState, EmptyState)``
    for a plain ``optax.adamw`` (``OptimConfig``'s wraps it: ``InjectStatefulHyperparamsState((...))``): a checkpoint records it, and a resume under another optimizer whose state has the same
    arrays (Adam's, into AdamW) is warned about rather than passed in silence."""
    def walk(node: Any) -> str:
        if not isinstance(node, tuple):
            return ""
        inner = ", ".join(part for part in (walk(x) for x in node) if part)
        name = type(node).__name__ if hasattr(node, "_fields") else ""
        return f"{name}({inner})" if inner or not name else name

    return walk(opt_state)
