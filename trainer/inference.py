"""``Trainer.evaluate`` and ``Trainer.predict``: the compiled eval / predict step over a dataset.

Kept apart from ``trainer.py`` (the public surface). Both pad the last, smaller batch to the first
batch's size, so one compiled function serves every batch; evaluation masks the padding out of its
sums, prediction cuts it off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import jax
import numpy as np

from trainer.build import check_labels
from trainer.data import (ArrayLoader, batch_size_of, check_batch_source, check_every_row_in_order, describe_shapes,
                          first_line, pad_batch, placing, warn_if_rows_left_out)
from trainer.evaluation import refuse_shared_prefixes
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
        trainer._eval_sums, trainer._eval_step = make_eval_step(trainer.graphdef, trainer.compute_metrics)


def _build_predict_step(trainer: "Trainer") -> None:
    """The compiled predict step, made once per trainer."""
    if trainer._predict_step is None:
        trainer._predict_step = make_predict_step(trainer.graphdef, trainer.predict_step)


def _placer(trainer: "Trainer") -> Callable[[Any], Any]:
    """``trainer.place_batch`` where a subclass overrides it (to shard); else none: jit's own transfer."""
    from trainer.trainer import Trainer

    return trainer.place_batch if type(trainer).place_batch is not Trainer.place_batch else (lambda batch: batch)


def run_evaluation(trainer: "Trainer", data: Iterable[Any], prefix: str) -> dict[str, float]:
    """Mean of ``trainer.compute_metrics`` over every example of ``data``, between the eval hooks."""
    check_batch_source(data, "evaluate's data")
    if not trainer.fitting:  # an Evaluator warned when it was built
        warn_if_rows_left_out(data, "evaluate's data", stacklevel=4)
    _build_eval_step(trainer)
    adopt_written_weights(trainer)  # weights loaded into the model since: evaluated, as Keras would
    trainer.eval_prefix = prefix
    trainer.callbacks.dispatch("on_eval_start", trainer)
    sums, size, place = None, None, _placer(trainer)
    for batch in data:
        if trainer._preemption.signal:
            raise Preempted()  # leave the evaluation; fit saves and exits
        size = size or batch_size_of(batch)
        padded, mask = pad_batch(batch, size)
        check_labels(trainer, batch, "eval")
        padded = placing(padded, place)
        if sums is None:
            sums = zeros_like_tree(jax.eval_shape(trainer._eval_sums, trainer.state, padded, mask))
        sums = trainer._eval_step(trainer.state, sums, padded, mask)
    if sums is None:
        raise ValueError("the evaluation data yielded no batches: it is empty, or a one-pass iterator (a generator) "
                         "used up by an earlier evaluation; pass a non-empty list or ArrayLoader.")
    metrics = finished_metrics(trainer, compute_sums(jax.device_get(sums)))
    reported = {prefix + k: v for k, v in metrics.items()}
    trainer.eval_metrics = dict(reported)
    trainer.callbacks.dispatch("on_eval_end", trainer, reported)
    trainer.eval_metrics = reported  # what callbacks added (a derived metric) is kept, as in an epoch's logs
    return dict(reported)


def run_prediction(trainer: "Trainer", data: Iterable[Any]) -> Any:
    """``trainer.predict_step`` over every batch, concatenated on the host."""
    check_batch_source(data, "predict's data")
    check_every_row_in_order(data, "predict's data")
    _build_predict_step(trainer)
    adopt_written_weights(trainer)
    outputs, size, place = [], None, _placer(trainer)
    for batch in data:
        size = size or batch_size_of(batch)
        n = batch_size_of(batch)
        padded, _ = pad_batch(batch, size)
        outputs.append((trainer._predict_step(trainer.state, placing(padded, place)), n))
    if not outputs:
        raise ValueError("predict got no batches; pass a non-empty dataset.")
    host = jax.device_get([out for out, _ in outputs])
    parts = [jax.tree.map(lambda a, n=n: a[:n], out) for out, (_, n) in zip(host, outputs)]
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


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
        _build_eval_step(trainer)
        padded, mask = pad_batch(batch, batch_size_of(batch))
        placing(padded, _placer(trainer))  # a sharding override: a batch it cannot split fails now, not after an epoch
        try:  # what the evaluation's first call will trace, on shapes only
            jax.eval_shape(trainer._eval_sums, trainer._state_shapes, padded, mask)
        except Exception as err:  # noqa: BLE001 - whatever the model raised, named with the batch's shapes
            raise ValueError(f"evaluating the first batch of the evaluation data (shapes {describe_shapes(batch)}) "
                             f"fails with {type(err).__name__}: {first_line(err)} (the data, the model, or the "
                             "loss / compute_metrics, traced at the start of fit)") from err
