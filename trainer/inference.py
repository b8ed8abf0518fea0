"""``Trainer.evaluate`` and ``Trainer.predict``: the compiled eval / predict step over a dataset.

Kept apart from ``trainer.py`` (the public surface). Both pad the last, smaller batch to the first
batch's size, so one compiled function serves every batch; evaluation masks the padding out of its
sums, prediction cuts it off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import jax
import numpy as np

from trainer.build import check_labels, weak_method
from trainer.data import (ArrayLoader, add_note, batch_shapes, batch_size_of, check_batch_source,
                          check_every_row_in_order, describe_shapes, first_line, host_batch, non_numeric_note, pad_batch, placing,
                          warn_if_rows_left_out)
from trainer.evaluation import refuse_shared_prefixes
from trainer.example_means import warn_if_not_example_means, whole_batch_loss
from trainer.feed import with_mask
from trainer.loop import finished_metrics
from trainer.module_link import adopt_written_weights
from trainer.preemption import Preempted
from trainer.state import zeros_like_tree
from trainer.step import make_eval_step, make_predict_step
from trainer.sums import compute_sums

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


def _build_eval_step(trainer: "Trainer") -> None:
    """The compiled eval step and its pure sums function, made once per trainer."""
    if trainer._eval_step is None:
        trainer._eval_sums, trainer._eval_step = make_eval_step(trainer.graphdef, weak_method(trainer.compute_metrics, trainer))


def _build_predict_step(trainer: "Trainer") -> None:
    """The compiled predict step, made once per trainer."""
    if trainer._predict_step is None:
        trainer._predict_step = make_predict_step(trainer.graphdef, weak_method(trainer.predict_step, trainer))


def _placer(trainer: "Trainer") -> Callable[[Any], Any]:
    """``trainer.place_batch`` where a subclass overrides it (to shard); else none: jit's own transfer."""
    from trainer.trainer import Trainer

    return trainer.place_batch if type(trainer).place_batch is not Trainer.place_batch else (lambda batch: batch)


def padded_batch(trainer: "Trainer", batch: Any, size: int) -> tuple[Any, np.ndarray]:
    """``batch`` padded to ``size`` rows, and its mask of real rows; with ``ragged_batches="pad"`` a dict batch
    also holds it as ``batch["mask"]``, as every training batch does (a custom loss that weighs by it finds it)."""
    padded, mask = pad_batch(batch, size)
    return (with_mask(padded, mask) if trainer.ragged_batches == "pad" and isinstance(padded, dict) else padded), mask


def check_whole_batch_loss(trainer: "Trainer", batch: Any, where: str) -> None:
    """Traces (shapes only) the loss on a whole batch, as training calls it. The default ``compute_metrics``
    calls it on each example alone, where size-1 axes broadcast: labels of the wrong shape, or
    predictions ``[B, 1]`` against targets ``[B]`` of one example, then pass with a wrong value."""
    from trainer.trainer import Trainer

    if type(trainer).compute_metrics is not Trainer.compute_metrics:
        return
    whole = whole_batch_loss(trainer)

    try:
        jax.eval_shape(whole, trainer._state_shapes, batch)
    except Exception as err:  # noqa: BLE001 - whatever the loss raised, named with the batch's shapes
        note = non_numeric_note(batch)
        raise ValueError(f"the loss function on a whole batch of {where} (shapes {describe_shapes(batch)}) fails with "
                         f"{type(err).__name__}: {first_line(err)}. Evaluation computes each example's loss alone, "
                         "where this would give a wrong number in silence: fix the data or the loss."
                         + (f" {note}" if note else "")) from err


def _first_call(call: Callable[[], Any], batch: Any, where: str) -> Any:
    """``call()`` for a batch of new shapes (its trace): an error says which batch it was."""
    try:
        return call()
    except Exception as err:
        add_note(err, f"({where}, a batch of shapes {describe_shapes(batch)})")
        add_note(err, non_numeric_note(batch) or "")
        raise


def run_evaluation(trainer: "Trainer", data: Iterable[Any], prefix: str) -> dict[str, float]:
    """Mean of ``trainer.compute_metrics`` over every example of ``data``, between the eval hooks."""
    check_batch_source(data, "evaluate's data")
    if not trainer.fitting:  # an Evaluator warned when it was built
        warn_if_rows_left_out(data, "evaluate's data")
    _build_eval_step(trainer)
    adopt_written_weights(trainer)  # weights loaded into the model since: evaluated, as Keras would
    trainer.eval_prefix = prefix
    trainer.callbacks.dispatch("on_eval_start", trainer)
    sums, size, place = None, None, _placer(trainer)
    for batch in map(host_batch, data):
        if trainer._preemption.signal:
            raise Preempted()  # leave the evaluation; fit saves and exits
        rows = batch_size_of(batch)
        if not rows:
            continue  # an empty batch (a slice past the data's end) holds nothing to count
        size = size or rows
        padded, mask = padded_batch(trainer, batch, size)
        check_labels(trainer, batch, "eval")
        shapes = batch_shapes(padded)
        known = trainer._eval_sums_shapes.get(shapes)  # traced once per batch shapes, not once per evaluation
        padded = placing(padded, place)
        if known is None:
            check_whole_batch_loss(trainer, padded, "the evaluation data")
            traced = _first_call(lambda: jax.eval_shape(trainer._eval_sums, trainer.state, padded, mask), batch,
                                 "evaluating")
            first, sums = sums is None, zeros_like_tree(traced) if sums is None else sums
            sums = _first_call(lambda: trainer._eval_step(trainer.state, sums, padded, mask), batch, "evaluating")
            trainer._eval_sums_shapes[shapes] = traced
        else:
            first, sums = sums is None, zeros_like_tree(known) if sums is None else sums
            sums = trainer._eval_step(trainer.state, sums, padded, mask)
        if first:
            warn_if_not_example_means(trainer, padded, sums, prefix)
    if sums is None:
        raise ValueError("the evaluation data yielded no batches: it is empty, or a one-pass iterator (a generator) "
                         "used up by an earlier evaluation; pass a non-empty list or ArrayLoader.")
    metrics = finished_metrics(trainer, compute_sums(jax.device_get(sums)))
    if sums and not metrics:  # every count 0
        raise ValueError("every example of the evaluation data is masked out (its 'mask' marks nothing real), so "
                         "there is nothing to average; evaluate data with real rows.")
    reported = {prefix + k: v for k, v in metrics.items()}
    trainer.eval_metrics = dict(reported)
    trainer.callbacks.dispatch("on_eval_end", trainer, reported)
    trainer.eval_metrics = reported  # what callbacks added (a derived metric) is kept, as in an epoch's logs
    return dict(reported)


def run_prediction(trainer: "Trainer", data: Iterable[Any]) -> Any:
    """``trainer.predict_step`` over every batch, concatenated on the host along the batch axis."""
    check_batch_source(data, "predict's data")
    check_every_row_in_order(data, "predict's data")
    _build_predict_step(trainer)
    adopt_written_weights(trainer)
    outputs, size, place, seen = [], None, _placer(trainer), set()
    for batch in map(host_batch, data):
        n = batch_size_of(batch)
        if not n:
            continue  # an empty batch: no rows to predict
        size = size or n
        padded, _ = padded_batch(trainer, batch, size)
        shapes = batch_shapes(padded)
        padded = placing(padded, place)
        if shapes in seen:
            out = trainer._predict_step(trainer.state, padded)
        else:
            out = _first_call(lambda: trainer._predict_step(trainer.state, padded), batch, "predicting")
            _check_batch_major(out, size)
            seen.add(shapes)
        outputs.append((out, n))
    if not outputs:
        raise ValueError("predict got no batches; pass a non-empty dataset.")
    host = jax.device_get([out for out, _ in outputs])
    parts = [jax.tree.map(lambda a, n=n: a[:n], out) for out, (_, n) in zip(host, outputs)]
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def _check_batch_major(outputs: Any, size: int) -> None:
    """``predict`` cuts the padding off and joins batches along each output's first axis: that axis must be
    the batch's (its shape is metadata: nothing is read from the device)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(outputs)[0]:
        shape = tuple(np.shape(leaf))
        if not shape or shape[0] != size:
            name = f"output {jax.tree_util.keystr(path)}".strip()
            raise ValueError(f"predict_step's {name} has shape {shape}, but a batch has {size} rows: predict joins "
                             "the batches' outputs along their first axis, which must be the batch's. Return "
                             "batch-major outputs (e.g. jnp.swapaxes(out, 0, 1)) and no per-batch values, by "
                             "overriding Trainer.predict_step.")


def prediction_shape(trainer: "Trainer", batch: Any) -> Any:
    """The shapes (``jax.ShapeDtypeStruct``) ``trainer.predict`` would give for ``batch``, traced without
    running; an input the model cannot take raises a ``ValueError`` naming its shapes."""
    _build_predict_step(trainer)
    try:
        return jax.eval_shape(trainer._predict_step, trainer._state_shapes, batch)
    except Exception as err:  # noqa: BLE001 - whatever the model raised, named with the batch's shapes
        raise ValueError(f"the model cannot take inputs of shapes {describe_shapes(batch)}: predicting them fails "
                         f"with {type(err).__name__}: {first_line(err)}") from err


def check_eval_data_fits(trainer: "Trainer") -> None:
    """Traces (shapes only) the evaluation's sums on the first batch of each evaluator's data that can be
    read without side effects (a list, an ``ArrayLoader``), and places it with a ``place_batch`` override,
    so data the model or the sharding cannot take fails at the start of ``fit``, not after an epoch; two
    evaluators of one prefix are refused first."""
    refuse_shared_prefixes(trainer.evaluators, next(iter(trainer._fit_evaluators), None))
    for evaluator in trainer.evaluators:
        data = evaluator.data
        if isinstance(data, (list, tuple)) and data:
            batch = data[0]
        elif isinstance(data, ArrayLoader):
            batch = next(iter(data), None)
        else:
            continue
        if batch is None:
            continue
        batch = host_batch(batch)
        if not batch_size_of(batch):
            continue
        _build_eval_step(trainer)
        padded, mask = padded_batch(trainer, batch, batch_size_of(batch))
        placing(padded, _placer(trainer))  # a sharding override: a batch it cannot split fails now, not after an epoch
        shapes = batch_shapes(padded)
        if shapes not in trainer._eval_sums_shapes:  # traced once per shapes, not at every fit (JAX keeps each trace)
            try:  # what the evaluation's first call will trace, on shapes only
                traced = jax.eval_shape(trainer._eval_sums, trainer._state_shapes, padded, mask)
            except Exception as err:  # noqa: BLE001 - whatever the model raised, named with the batch's shapes
                raise ValueError(f"evaluating the first batch of the evaluation data (shapes {describe_shapes(batch)}) "
                                 f"fails with {type(err).__name__}: {first_line(err)} (the data, the model, or the "
                                 "loss / compute_metrics, traced at the start of fit)") from err
            check_whole_batch_loss(trainer, padded, "the evaluation data")
            trainer._eval_sums_shapes[shapes] = traced
        check_labels(trainer, batch, "evaluation")  # out of range: refused before an epoch is trained
