"""The epoch loop of ``Trainer.fit``: executions in, compiled steps dispatched, hooks at boundaries.

Kept apart from ``trainer.py`` (the public surface) because it is the hot path: nothing here
reads a device value. Batches reach it already cut into executions (``trainer.feed``) and, with
``prefetch``, already on the device (``trainer.prefetch``).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import inspect
import numbers
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import jax
import numpy as np

from trainer import resume as resuming
from trainer.data import (add_note, batch_shapes, describe_shapes, epoch_iterator, known_length, non_numeric_note,
                          placing)
from trainer.dtypes import is_real_number
from trainer.feed import Execution, FeedPlan, executions
from trainer.memory import release_freed_memory
from trainer.module_link import adopt_written_weights
from trainer.prefetch import Feed
from trainer.state import has_batch_statistics
from trainer.preemption import Preempted
from trainer.sums import EPOCH_SUMS, PARTIAL_EPOCH, compute_sums, snapshot_means

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


def _build_train_steps(trainer: "Trainer", batch: Any) -> None:
    from trainer.build import build_train_steps

    build_train_steps(trainer, batch)


def _trainer_class():
    from trainer.trainer import Trainer

    return Trainer

_stack_one = jax.jit(lambda metrics: jax.tree.map(lambda v: v[None], metrics))


def run_epoch(trainer: "Trainer", train_data: Iterable[Any]) -> None:
    """Trains on one epoch of ``train_data`` (from ``trainer.position``) or until a stop."""
    epoch = trainer.epoch
    trainer.data_iterator, trainer.position = epoch_iterator(
        train_data, epoch, trainer.position, trainer.restored_data_state)
    trainer.restored_data_state = None
    trainer.epoch_length = known_length(train_data)
    adopt_written_weights(trainer)  # written through a reference a callback kept (Keras's self.model)
    trainer.callbacks.dispatch("on_epoch_start", trainer, epoch)
    if trainer._preemption.signal:  # arrived in on_epoch_start (an evaluation's redo): no step follows it
        raise Preempted()
    if trainer.should_stop:  # decided there: not one more step
        return
    plan = FeedPlan(epoch, trainer.position, trainer.step, trainer.steps_per_execution, trainer.max_steps,
                    frozenset(trainer.skip_batches), trainer.ragged_batches, trainer.compiled_batch_size,
                    trainer._train_steps is None, trainer.check_batch, trainer._compiled_shapes,
                    trainer.ragged_batches == "pad" and has_batch_statistics(trainer.state.model_state))
    depth = trainer.prefetch if trainer.prefetch_in_use is None else trainer.prefetch_in_use
    custom_placement = type(trainer).place_batch is not _trainer_class().place_batch  # e.g. sharding
    feed = Feed(executions(trainer.data_iterator, plan), depth, lambda e: _placed(trainer, e),
                place_inline=custom_placement, measured=trainer._prefetch_probe)
    ran_out, trained = True, False
    with _closing(feed):
        for execution in _timed(trainer, feed):
            trainer.prefetch_in_use = feed.depth_in_use
            if execution.steps == 0:
                trainer.position = execution.end_position
                continue
            trainer.compiled_batch_size = plan.full_size
            trained = True
            _run_execution(trainer, epoch, execution)
            for checkpoint in trainer.checkpoints:
                if checkpoint.due_after_step(trainer.step):
                    checkpoint.save(trainer)
            if trainer._preemption.signal:
                raise Preempted()
            if roll_back_if_requested(trainer):  # the sums restart at the restored step's
                return
            if trainer.should_stop or trainer._limit_reached():
                ran_out = False
                break
    if trainer._preemption.signal:  # an epoch that reached no step boundary (every batch dropped or skipped)
        raise Preempted()
    if ran_out and trainer.position == 0 and not trained and trainer.step > 0:  # it gave batches before
        warnings.warn(f"train_data yielded no batches in epoch {epoch}: a generator or iterator gives one pass. "
                      "fit ends here, after the steps it gave; pass a re-iterable (a list, an ArrayLoader) to train "
                      "longer.", RuntimeWarning, stacklevel=4)  # as Keras's "input ran out of data"
        trainer.request_stop(f"train_data ran out of batches in epoch {epoch} (a one-pass iterator)")
        return
    if ran_out and trainer.position == 0 and not trained:
        raise ValueError(
            f"train_data yielded no batches in epoch {epoch}. A generator or iterator can be "
            "iterated only once: pass a re-iterable (a list, an ArrayLoader) or set max_steps "
            "to what one pass gives."
        )
    if ran_out or (trainer.epoch_length is not None and trainer.position >= trainer.epoch_length):
        end_epoch(trainer, epoch)


@contextlib.contextmanager
def _closing(feed: Feed) -> Iterator[Feed]:
    """Closes ``feed`` after the epoch; on an interrupt (a second signal, Ctrl-C) without waiting for a
    prefetch thread stuck in the data (it would hold the stop for ``CLOSE_TIMEOUT_SECONDS``)."""
    interrupted = False
    try:
        yield feed
    except (KeyboardInterrupt, SystemExit):
        interrupted = True
        raise
    finally:
        feed.close(wait=not interrupted)


def _placed(trainer: "Trainer", execution: Execution) -> Execution:
    if execution.batch is None:
        return execution
    if execution.stacked and _takes_stacked(type(trainer)):
        placed = placing(execution.batch, functools.partial(trainer.place_batch, stacked=True), stacked=True)
        return dataclasses.replace(execution, batch=placed)
    return dataclasses.replace(execution, batch=placing(execution.batch, trainer.place_batch, execution.stacked))


@functools.lru_cache(maxsize=None)
def _takes_stacked(cls: type) -> bool:
    """Whether ``cls.place_batch`` names a ``stacked`` parameter (an override written before it existed,
    or one behind a decorator that hides its signature behind ``**kwargs``, is not sent it)."""
    return "stacked" in inspect.signature(cls.place_batch).parameters


def _run_execution(trainer: "Trainer", epoch: int, execution: Execution) -> None:
    """One dispatch of the compiled step (one batch, or a stacked chunk) between its two hooks."""
    if trainer._train_steps is None or trainer._built_signature != trainer._step_signature():
        batch = execution.batch
        if execution.stacked:
            batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), batch)
        try:
            _build_train_steps(trainer, batch)
        except Exception as err:  # the model's own error (a shape it cannot take), with what it was given
            add_note(err, f"(tracing the train step on a batch of shapes {describe_shapes(batch)})")
            add_note(err, non_numeric_note(execution.batch) or "")
            raise
    first = trainer.step + 1
    for i, position in enumerate(execution.positions):
        trainer.step_positions[first + i] = (epoch, position)
        trainer.step_positions.pop(first + i - 1000, None)
    trainer.callbacks.dispatch("on_step_start", trainer, first)
    if trainer._link.lent:  # a callback read trainer.model: what it wrote into it is trained
        adopt_written_weights(trainer, walk=False)  # the variables it holds; its layers at the epoch's start
    steps = trainer._train_steps
    run = steps.fused if execution.stacked else steps.single
    started = time.perf_counter()
    try:
        metrics = trainer._carry.run(run, execution.batch)
    except Exception as err:  # raised as it came, with the batch's new shapes noted when they changed
        if execution.shape_change is not None:
            add_note(err, f"({execution.shape_change})")
        if "incompatible devices" in str(err):  # jit names its flat arguments, not the model's or the batch's
            add_note(err, "(the step's arrays, the train state's and the batch's, are not all on the same devices: "
                          "Trainer.place_batch puts batches where the model's parameters are, or place the model's "
                          "arrays where the batches go before building the Trainer)")
        raise
    # the first call of each shape traces and compiles before it dispatches (the first shapes: ``run``
    # alone, read for free; others, a bucket of sequence lengths, by their shapes)
    compiled = run if execution.shape_change is None else (run, batch_shapes(execution.batch))
    if compiled not in trainer._compiled:
        trainer._compiled.update((compiled, (run, batch_shapes(execution.batch))))
        trainer.compile_seconds += time.perf_counter() - started
        release_freed_memory()  # the compiler's freed memory, so later allocations do not stack on it
    _bound_run_ahead(trainer, metrics)
    if trainer.steps_per_execution > 1 and not execution.stacked:
        metrics = _stack_one(metrics)  # callbacks see one shape of metrics: [steps of the execution]
    trainer.step, trainer.position = first + execution.steps - 1, execution.end_position
    trainer.execution_steps = execution.steps
    trainer.last_batch_size, trainer.last_examples = execution.sizes[-1], sum(execution.sizes)
    trainer.callbacks.dispatch("on_step_end", trainer, trainer.step, metrics)


def _bound_run_ahead(trainer: "Trainer", metrics: Any) -> None:
    """When more than ``trainer.dispatch_ahead`` executions are in flight, waits until half as many are.

    Its metrics are the marker (an output no later call donates). Waiting on an older execution
    never idles the device while a newer one is queued; it only stops the host running further ahead.
    Down to half, not to the bound: the host sleeps and wakes once every few executions, not after each
    one (each wake-up cost the tiny MLP's single step ~3% on 2 cores).
    """
    limit = trainer.dispatch_ahead
    if limit is None:
        trainer._in_flight.clear()
        return
    marker = metrics.get("loss") if type(metrics) is dict else None
    if not isinstance(marker, jax.Array):
        marker = next((x for x in jax.tree.leaves(metrics) if isinstance(x, jax.Array)), None)
        if marker is None:
            return
    in_flight = trainer._in_flight
    in_flight.append(marker)
    if len(in_flight) > limit:
        while len(in_flight) > max(1, limit // 2) + 1:  # finished before the one waited for; at least the
            in_flight.popleft()  # newest stays in flight, so the device never idles (dispatch_ahead=1)
        in_flight.popleft().block_until_ready()


def _timed(trainer: "Trainer", items: Iterator[Execution]) -> Iterator[Execution]:
    """Yields the executions, adding the time spent waiting for each to ``data_wait_seconds``."""
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        trainer.data_wait_seconds += time.perf_counter() - started
        yield item


def end_epoch(trainer: "Trainer", epoch: int) -> None:
    """The epoch's evaluations and mean train metrics, ``on_epoch_end``, then epoch checkpoints.

    The train sums are taken after the evaluations: a stop during one (a preemption) saves them
    untaken, so the resumed run still reports the epoch's train metrics.
    """
    evaluated: dict[str, float] = {}
    for evaluator in trainer.evaluators:
        if evaluator.due_at_epoch_end(epoch) and evaluator.last_step == trainer.step:
            evaluated.update(evaluator.last_metrics)  # its step cadence ran it at this very step: once is enough
        elif evaluator.due_at_epoch_end(epoch):
            evaluated.update(evaluator.run(trainer))
    sums = trainer.take_metric_sums(EPOCH_SUMS)
    if sums is not None:
        logs = finished_metrics(trainer, compute_sums(jax.device_get(sums)))
    else:  # resumed exactly at the end of an epoch: no step ran since the restore
        saved = trainer.restored_epoch_sums or {}
        logs = finished_metrics(trainer, snapshot_means(saved))
        trainer.restored_epoch_sums = None
    logs.update(evaluated)
    _drop_partial_row(trainer, epoch)
    trainer.history.append(dict(logs, epoch=epoch))
    trainer.callbacks.dispatch("on_epoch_end", trainer, epoch, logs)
    trainer.history[-1].update(logs)  # what callbacks added (a scripted or derived metric) is kept
    if roll_back_if_requested(trainer):  # asked for at the epoch's end: restored before its checkpoint
        return
    trainer.epoch, trainer.position = epoch + 1, 0
    for checkpoint in trainer.checkpoints:
        if checkpoint.due_after_epoch(epoch) or checkpoint.saved_unranked(trainer.step):
            checkpoint.save(trainer)


def roll_back_if_requested(trainer: "Trainer") -> bool:
    """Does a rollback a callback asked for (``Trainer.request_rollback``); True when it did."""
    if trainer._rollback_request is None:
        return False
    bad_step, trainer._rollback_request = trainer._rollback_request, None
    resuming.roll_back(trainer, bad_step)
    return True


def end_fit(trainer: "Trainer") -> None:
    """``on_fit_end`` on every callback (final saves) even when one raises, a rollback asked for there, the
    reason of a requested stop said once (as Lightning does: a stop nobody sees looks like a short run),
    then the first error a callback raised."""
    errors = trainer.callbacks.dispatch_all("on_fit_end", trainer)
    roll_back_after_fit(trainer)
    if trainer.should_stop:
        print(f"fit stopped at step {trainer.step}: {trainer.stop_reason or 'trainer.should_stop was set'}",
              file=sys.stderr, flush=True)
    if errors:
        for error in errors[1:]:
            warnings.warn(f"another callback's on_fit_end raised too: {error!r}", RuntimeWarning, stacklevel=3)
        raise errors[0]


def roll_back_after_fit(trainer: "Trainer") -> None:
    """A rollback asked for once the loop had ended (in ``on_fit_end``, after a stop): restored, not
    trained on, with a warning; the stop's reason stays, and the caller's module holds the restored state."""
    stop_reason = trainer.stop_reason
    if roll_back_if_requested(trainer):
        trainer.stop_reason, _ = stop_reason, trainer.model
        warnings.warn(f"fit ended with a rollback pending: restored the newest good checkpoint, step {trainer.step}; "
                      "fit again to train on from there.", RuntimeWarning, stacklevel=4)


def finished_metrics(trainer: "Trainer", metrics: dict[str, float]) -> dict[str, float]:
    """``trainer.finish_metrics(metrics)``, refused by name unless it gives a dict of numbers."""
    finished = trainer.finish_metrics(metrics)
    if not isinstance(finished, collections.abc.Mapping):
        raise TypeError(f"{type(trainer).__name__}.finish_metrics must return the dict of metrics; it returned "
                        f"{type(finished).__name__} (a missing return?).")
    bad = {k: v for k, v in finished.items() if not isinstance(k, str) or not _is_number(v)}
    if bad:
        raise TypeError(f"{type(trainer).__name__}.finish_metrics must give names (str) and numbers; these are not: "
                        f"{ {k: type(v).__name__ for k, v in bad.items()} }.")
    return dict(finished)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) or (hasattr(value, "shape") and value.shape == () and
                                               is_real_number(np.asarray(value).dtype))


def finish_partial_epoch(trainer: "Trainer", evaluate: bool) -> None:
    """``fit`` ended inside an epoch (``max_steps``, a stop request): that epoch's train means so far,
    with the evaluations of this step, as a history row marked ``partial_epoch``.

    ``evaluate``: run the per-epoch evaluators first (at ``max_steps``; not after a stop request).
    No ``on_epoch_end`` runs and the epoch's sums keep running: a later ``fit`` that finishes the
    epoch replaces the row with the whole epoch's.
    """
    evaluated: dict[str, float] = {}
    for evaluator in trainer.evaluators:
        if evaluate and evaluator.every_n_epochs and evaluator.last_step != trainer.step:
            evaluator.run(trainer)
        if evaluator.last_step == trainer.step:
            evaluated.update(evaluator.last_metrics)
    sums = trainer.sums_snapshots().get(EPOCH_SUMS) or trainer.restored_epoch_sums or {}
    logs = finished_metrics(trainer, snapshot_means(sums))
    logs.update(evaluated)
    _drop_partial_row(trainer, trainer.epoch)
    trainer.history.append(dict(logs, epoch=trainer.epoch, **{PARTIAL_EPOCH: True}))


def has_partial_row(trainer: "Trainer", epoch: int | None = None) -> bool:
    """Whether ``history`` ends with the partial row of ``epoch`` (default: the current one)."""
    epoch = trainer.epoch if epoch is None else epoch
    return bool(trainer.history) and bool(trainer.history[-1].get(PARTIAL_EPOCH)) and trainer.history[-1].get("epoch") == epoch


def _drop_partial_row(trainer: "Trainer", epoch: int) -> None:
    if has_partial_row(trainer, epoch):
        trainer.history.pop()
