"""The ``Trainer``'s constructor and ``fit`` arguments checked up front: a clear error naming what was wrong.

Kept apart from ``trainer.py`` (the public surface) so that the class reads as what it does.
"""

from __future__ import annotations

import collections.abc
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from flax import nnx

from trainer import resume as resuming
from trainer.build import check_intervals
from trainer.data import check_batch_source, known_length, raw_arrays
from trainer.feed import RAGGED
from trainer.module_link import adopt_written_weights
from trainer.processes import prefetch_for_processes
from trainer.user_warnings import warn

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


def check_options(model: Any, optimizer: Any, *, max_epochs: Any, max_steps: Any, steps_per_execution: Any,
                  prefetch: Any, ragged_batches: Any, cpu_tuning: Any, dispatch_ahead: Any, config: Any = None) -> None:
    """Raises ``TypeError`` / ``ValueError`` for the first argument of ``Trainer(...)`` that is wrong."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of the run's settings (name -> value); got {type(config).__name__}.")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module; got {type(model).__name__}.")
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation (e.g. optax.adamw(1e-3)), or None for a Trainer "
            f"that only evaluates and predicts; got {type(optimizer).__name__}."
        )
    if optimizer is not None and max_epochs is None and max_steps is None:
        raise ValueError("give max_epochs or max_steps (or both): neither was set, so fit would never end.")
    for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    for name, value, low in (("steps_per_execution", steps_per_execution, 1), ("prefetch", prefetch, 0)):
        if value == "auto" and name == "prefetch":
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}" + (" or 'auto'." if name == "prefetch" else "."))
    if ragged_batches not in RAGGED:
        raise ValueError(f"ragged_batches={ragged_batches!r} must be one of {RAGGED}.")
    if not isinstance(cpu_tuning, bool):
        raise ValueError(f"cpu_tuning={cpu_tuning!r} must be True or False.")
    if dispatch_ahead is not None and (not isinstance(dispatch_ahead, (int, np.integer))
                                       or isinstance(dispatch_ahead, bool) or dispatch_ahead < 1):
        raise ValueError(f"dispatch_ahead={dispatch_ahead!r} must be an integer >= 1 (2 or more keeps the "
                         "device busy), or None for no limit of the trainer's own.")


def recorded_number(name: str, value: Any) -> float:
    """``Trainer.record``'s value as a float, refused by name when it is not one number."""
    try:
        if isinstance(value, (str, bytes)):  # float("1.5") would pass a string for a number
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"record({name!r}, {value!r:.60}): record takes one number (a float, or a 0-d array) "
                        "per name.") from None


def prefetch_setting(prefetch: Any) -> int | str:
    """The checked ``prefetch`` as the trainer keeps it: ``"auto"`` or an int, which several processes
    (``jax.distributed``) run with no thread (``trainer.processes``)."""
    return prefetch_for_processes(prefetch if prefetch == "auto" else int(prefetch))


def check_fit_inputs(trainer: "Trainer", train_data: Any, eval_data: Any, resume: Any) -> None:
    """What ``fit`` refuses before it starts: raw arrays for data, ``resume=True`` with nowhere to look, a
    one-pass iterator for several epochs, and step intervals that do not fit ``steps_per_execution``;
    then makes the workdir and takes parameters written into the model since the trainer last did."""
    if trainer.tx is None:
        raise TypeError("this Trainer was built without an optimizer, to evaluate and predict only; build one with "
                        "an optimizer (and max_epochs or max_steps) to train: Trainer(model, optax.adamw(1e-3), ...).")
    if raw_arrays(train_data) and not isinstance(train_data, (Mapping, tuple)) and raw_arrays(eval_data):
        raise TypeError("fit(x, y) as Keras takes it: fit takes batches, and its second argument is the evaluation "
                        "data. Wrap the arrays: fit(ArrayLoader({'x': x, 'label': y}, batch_size=32)).")
    check_batch_source(train_data, "train_data"), check_batch_source(eval_data, "eval_data")
    if isinstance(train_data, (list, tuple)) and not train_data:
        raise ValueError("train_data is an empty list: give it at least one batch.")
    resuming.check_resume_source(trainer, resume)
    epochs_left = (trainer.max_epochs or 0) - trainer.epoch
    if trainer.max_steps is None and epochs_left > 1 and isinstance(train_data, collections.abc.Iterator):
        raise TypeError(f"train_data is a one-pass {type(train_data).__name__}, but max_epochs={trainer.max_epochs} "
                        "iterates it once an epoch; pass a list or an ArrayLoader, or set max_steps.")
    trainer.callbacks.check()  # again: callbacks appended since, hooks set on an instance since
    check_intervals(trainer)  # again: callbacks appended since, or shared with a trainer of another K
    k, batches = trainer.steps_per_execution, known_length(train_data)
    if k > 1 and batches is not None and batches < k:
        warn(f"steps_per_execution={k} is more than the {batches} batches of an epoch: no chunk of {k} "
             f"fits in one, so every step runs alone. Use steps_per_execution={batches} or less (one "
             "that divides the epoch's length fuses all of it).", stacklevel=3)
    _warn_if_placing_chunks_unaware(trainer)
    if trainer.workdir is not None:  # there before on_fit_start: a callback of one's own writes into it
        trainer.workdir.mkdir(parents=True, exist_ok=True)
    adopt_written_weights(trainer)  # pretrained weights loaded into the module after the Trainer was built


def _warn_if_placing_chunks_unaware(trainer: "Trainer") -> None:
    """A ``place_batch`` override without the ``stacked`` keyword gets ``[K, batch, ...]`` chunks as if they
    were batches when ``steps_per_execution`` > 1: a sharding of their first axis splits the steps over the
    devices, not the rows (data parallel silently lost, or an error when K does not divide)."""
    from trainer.loop import _takes_stacked
    from trainer.trainer import Trainer

    cls = type(trainer)
    if trainer.steps_per_execution > 1 and cls.place_batch is not Trainer.place_batch and not _takes_stacked(cls):
        warn(f"{cls.__name__}.place_batch takes no stacked keyword, but steps_per_execution="
             f"{trainer.steps_per_execution} hands it chunks of [{trainer.steps_per_execution}, batch, ...]: "
             "a sharding of their first axis would split the steps, not the rows. Define "
             "place_batch(self, batch, *, stacked=False) and shard axis 1 when stacked.", stacklevel=4)


def warn_if_loss_fn_unused(trainer: "Trainer") -> None:
    """A subclass whose ``compute_loss`` neither calls ``super()`` (or another ``compute_loss``) nor reads
    ``self.loss_fn`` (in nested functions too) never uses the ``loss_fn`` it was given: said when it is
    built, not found out from the numbers."""
    from trainer.trainer import Trainer

    override = type(trainer).compute_loss
    if trainer.loss_fn is None or override is Trainer.compute_loss:
        return
    if not {"loss_fn", "super", "compute_loss"} & _names_used(getattr(override, "__code__", None)):
        warn(f"{type(trainer).__name__} overrides compute_loss, which does not use loss_fn="
             f"{getattr(trainer.loss_fn, '__name__', trainer.loss_fn)!r}: that loss is ignored. Drop "
             "loss_fn, or call it from compute_loss (self.loss_fn(model, batch)).", UserWarning, stacklevel=3)


def _names_used(code: Any) -> set[str]:
    """The global and attribute names a code object and the functions nested in it use (all, if unknown)."""
    if code is None:
        return {"loss_fn"}
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names
