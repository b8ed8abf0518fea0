"""Building the train step for a batch structure, and the host checks that go with it.

Kept apart from ``trainer.py`` (the public surface): these run once per structure (or once per
batch for the label check) and read the trainer's configuration, never its hot-path state.
"""

from __future__ import annotations

import numbers
import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import numpy as np

from trainer import losses, threefry
from trainer.data import add_note, batch_shapes, describe_shapes, non_numeric_note
from trainer.conv_grads import eligible_convs
from trainer.dense_grads import eligible_denses, is_layer_product
from trainer.events import DefaultInterval
from trainer.jaxprs import any_equation, equations, scan_unroll, use_chunk_guard
from trainer.step import make_train_step
from trainer.sums import restart_trainer_sums

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


def check_intervals(trainer: "Trainer") -> None:
    """Refuses callback step intervals that are not multiples of ``steps_per_execution``; those left
    at their defaults (``DefaultInterval``) are rounded up to the next multiple instead, a line on
    stderr for each one that changes. Run at construction and at each ``fit`` (a callback appended
    since, or shared with a trainer of another ``K``)."""
    k = trainer.steps_per_execution
    for callback in trainer.callbacks.callbacks:
        for name, every in callback.step_intervals().items():
            if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
                raise ValueError(f"{type(callback).__name__}({name}={every!r}) must be a positive whole number of "
                                 "steps (or None, for never by steps).")
            if isinstance(every, DefaultInterval):
                fitted = every.fit_to(k)
                setattr(callback, name, fitted)
                if fitted != every and fitted != every.base:
                    print(f"trainer: {type(callback).__name__}({name}={every.base}, a default) runs every "
                          f"{int(fitted)} steps, a multiple of steps_per_execution={k}.", file=sys.stderr, flush=True)
            elif every % k:
                raise ValueError(
                    f"{type(callback).__name__}({name}={every}) is not a multiple of steps_per_execution={k}: "
                    f"hooks run only between chunks of {k} steps. Use {name}={max(k, every // k * k)} (a "
                    f"multiple of {k}) or a steps_per_execution that divides {every}.")


REDUCTIONS = ("mean", "last")


def check_reductions(reductions: Mapping[str, str], metric_shapes: Mapping[str, Any]) -> None:
    """``trainer.metric_reductions`` names step metrics and says ``"mean"`` or ``"last"`` of each."""
    for name, how in reductions.items():
        if how not in REDUCTIONS:
            raise ValueError(f"metric_reductions[{name!r}] = {how!r}: a step metric is reduced over steps by "
                             f"'mean' (the default) or 'last' (a running total, a counter).")
        if name not in metric_shapes:
            raise ValueError(f"metric_reductions names {name!r}, which the step does not report; its metrics are "
                             f"{sorted(k for k in metric_shapes if not k.startswith('_'))}.")


def weak_method(method: Callable, owner: Any) -> Callable:
    """``method``, when bound to ``owner`` (a trainer), held weakly: a compiled step keeps its function, and a
    bound method in it would keep the trainer, a cycle that only Python's cycle collector frees (a sweep held
    dead trainers' device arrays until it ran). Anything else (a staticmethod, a function set on the instance)
    is returned as it is."""
    if getattr(method, "__self__", None) is not owner:
        return method
    ref, name = weakref.WeakMethod(method), method.__name__

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = ref()
        if bound is None:
            raise ReferenceError(f"the Trainer whose {name} this compiled step calls was freed; keep the Trainer.")
        return bound(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def build_train_steps(trainer: "Trainer", batch: Any) -> None:
    """Defines the train step for this batch structure (shapes suffice) and sizes the running sums."""
    trainer._built_signature = trainer._step_signature()
    args = (trainer.graphdef, trainer.tx, weak_method(trainer.compute_loss, trainer), tuple(trainer.probes), trainer._halt_after,
            trainer.metric_reductions)
    by_real_rows = {"weigh_by_mask": trainer.ragged_batches == "pad"}  # a padded batch counts by its real rows
    pure = make_train_step(*args, **by_real_rows).pure
    try:
        jaxpr, (_, metric_shapes) = jax.make_jaxpr(pure, return_shape=True)(trainer.state, batch)
    except losses.BatchKeyError as err:  # the default loss's: names the batch's keys
        raise ValueError(err.args[0]) from err
    except KeyError as err:  # a loss of the user's reading a key the batch lacks; other KeyErrors as they are
        key = err.args[0] if err.args else None
        if isinstance(batch, Mapping) and isinstance(key, str) and key not in batch:
            raise ValueError(f"the loss function looked up the key {key!r}, which the batch lacks; the batch has "
                             f"keys {sorted(batch)}.") from err
        raise
    check_reductions(trainer.metric_reductions, metric_shapes)
    trainer._metric_shapes = metric_shapes
    trainer._train_steps = make_train_step(*args, **by_real_rows, **tuned_settings(trainer, jaxpr))
    restart_trainer_sums(trainer)  # the epoch's sums resumed where a checkpoint left them


def tuned_settings(trainer: "Trainer", jaxpr: Any) -> dict[str, Any]:
    """``make_train_step``'s tuning arguments: plain, or with ``cpu_tuning`` what measured faster on CPU.

    ``unroll`` and ``chunk_guard`` shape a fused chunk; ``matmul_kernel_grads`` any step with
    eligible ``nnx.Conv`` layers (``trainer.conv_grads``) or dense layers on sequences
    (``trainer.dense_grads``); ``unrolled_threefry`` a step drawing at least
    ``threefry.UNROLL_MIN_WORDS`` random words (``trainer.threefry``). Each setting that changes
    what runs is listed in ``trainer.cpu_settings`` and announced once on stderr, with how to turn
    it off.
    """
    if not trainer.cpu_tuning:
        trainer.cpu_settings = []
        return {"unroll": 1, "chunk_guard": False, "matmul_kernel_grads": False, "unrolled_threefry": False}
    unroll = scan_unroll(jaxpr)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(trainer.state.params))
    chunk_guard = use_chunk_guard(unroll, num_params)
    on_cpu = jax.default_backend() == "cpu"
    convs = len(eligible_convs(trainer._link.model)) if on_cpu else 0
    layers = eligible_denses(trainer._link.model) if on_cpu else []
    denses = bool(layers) and any_equation(jaxpr, is_layer_product(layers))
    words = threefry.random_words(equations(jaxpr)) if on_cpu and threefry.available() else 0
    unrolled_threefry = words >= threefry.UNROLL_MIN_WORDS
    notes = []
    if unrolled_threefry:
        notes.append(f"the step's {words:,} random words (dropout masks) are hashed with JAX's unrolled "
                     "threefry (its rolled CPU loop cost ~8 ns a word; the same bits)")
    if convs:
        notes.append(f"{convs} convolution layer(s) compute their kernel gradients as matrix products (XLA:CPU's "
                     "own convolution for them ran up to 4x slower; float rounding differs, within ~4e-6 relative)")
    if denses:
        notes.append("dense layers on sequences compute their kernel gradients as one 2-D product (XLA:CPU ran "
                     "the transposed product 1.5-2.3x slower; float rounding differs)")
    if trainer.steps_per_execution > 1:
        if unroll is True:
            notes.append("a chunk of this convolutional step runs its scan unrolled (XLA:CPU runs convolution "
                         "gradients ~10x slower inside a loop; it compiles longer)")
        if chunk_guard and trainer._halt_after is not None:
            notes.append("a chunk checks for non-finite steps once and reruns itself guarded only when one was "
                         "(bitwise the same; a small model's per-step conditional costs it 10-40%)")
    trainer.cpu_settings = notes
    for note in notes:
        if note not in trainer._announced:
            trainer._announced.add(note)
            print(f"trainer: CPU tuning: {note}. Trainer(cpu_tuning=False) turns this off.", file=sys.stderr, flush=True)
    return {"unroll": unroll, "chunk_guard": chunk_guard, "matmul_kernel_grads": bool(convs) or denses,
            "unrolled_threefry": unrolled_threefry}


def check_labels(trainer: "Trainer", batch: Any, where: str) -> None:
    """With the default loss (or any ``losses.supervised(losses.cross_entropy, ...)``), integer labels
    must lie in ``[0, num_classes)`` (a host check).

    Runs in the prefetch thread when there is one, so it reads only the state's shapes taken at
    construction, never ``trainer.state`` (which the loop's thread owns).
    """
    from trainer.trainer import Trainer

    loss = trainer.loss_fn or losses.default_loss
    if not getattr(loss, "integer_class_labels", False) or type(trainer).compute_loss is not Trainer.compute_loss:
        return
    try:
        labels = losses.batch_labels(batch)
        typed = isinstance(labels, (np.ndarray, jax.Array))  # dtype and shape: metadata, no device read
        if typed and np.dtype(labels.dtype).kind not in "iu":
            raise ValueError(
                f"labels at {where} are {labels.dtype} {labels.shape}, but this loss (softmax cross-entropy on "
                "class ids) takes integer labels. One-hot labels: loss_fn=losses.supervised("
                "losses.cross_entropy_onehot); regression targets: losses.supervised(losses.mse).")
        inputs = batch_shapes(batch)  # what a new compile depends on: one trace per bucket, none per batch size
        if inputs not in trainer._output_shapes:  # the model's output shape for inputs of these shapes (a
            try:  # bucket of other sequence lengths is asked again), from shapes only: what the default
                # loss sees, the model on the inputs (Trainer's own predict_step, not an override that
                # serves predict(): one returning class ids, say)
                out = jax.eval_shape(lambda s, b: Trainer.predict_step(trainer, s.merge(trainer.graphdef), b),
                                     trainer._state_shapes, batch)
            except Exception as err:  # the model's own error (a shape it cannot take), with what it was given
                if trainer._output_shapes:  # shapes other than the first batch's: the step's own trace (or
                    return  # a fused chunk's refusal to stack them) reports it, naming both shapes
                add_note(err, f"(the model on the batch of {where}, of shapes {describe_shapes(batch)})")
                add_note(err, non_numeric_note(batch) or "")
                raise
            trainer._output_shapes[inputs] = tuple(out.shape) if hasattr(out, "shape") else ()
        output = trainer._output_shapes[inputs]
        classes, label_shape = (output[-1], output[:-1]) if output else (0, None)
        if typed and label_shape and labels.shape[1:] != label_shape[1:]:
            wanted = (labels.shape[0],) + label_shape[1:]
            fix = (" (drop the trailing axis of 1: labels[..., 0])" if labels.shape[1:] == label_shape[1:] + (1,)
                   else "; one-hot labels: loss_fn=losses.supervised(losses.cross_entropy_onehot)"
                   if labels.shape[1:] == label_shape[1:] + (classes,) else "")
            raise ValueError(f"labels at {where} have shape {labels.shape}, but the model's outputs {output} need one "
                             f"class id per output row, shape {wanted}{fix}.")
        if classes:  # host labels only: reading device ones would wait on the device every batch
            losses.check_label_range(labels, classes, where)
    except losses.BatchKeyError as err:  # the default loss's message names the batch keys
        raise ValueError(err.args[0]) from err
