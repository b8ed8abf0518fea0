"""``MetricsLogger``: windowed means of the step metrics, written to every writer every N steps.

The metrics are added up inside the compiled step (``clu.metrics`` ``Average`` / ``LastValue``
accumulators that the trainer keeps on the device), so logging costs no extra dispatch; every
``log_every`` steps the window is taken, its copy to the host started, and it is written one step
later, when reading it no longer stalls the device.

Example::

    from callbacks import MetricsLogger, ConsoleWriter, JsonlWriter
    logger = MetricsLogger([ConsoleWriter(), JsonlWriter("runs/x/metrics.jsonl")], log_every=50)
    Trainer(model, tx, max_epochs=3, callbacks=[logger])
"""

from __future__ import annotations

import json
import os
import warnings
import weakref
from typing import Any, Iterable, Mapping

import numpy as np

from callbacks.lagged import LaggedFetch
from callbacks.writers import MetricWriter, plain
from trainer.checkpoint import callback_keys
from trainer.events import Callback, DefaultInterval
from trainer.sums import compute_sums, snapshot_means
from trainer.other_names import METRICS_LOGGER, other_names


class MetricsLogger(Callback):
    """Writes means of the step metrics every ``log_every`` steps, and every evaluation's metrics.

    Args:
      writers: ``MetricWriter`` instances (console, JSONL, CSV, TensorBoard), or one of them.
      log_every: steps per logged window.

    An evaluation outside ``fit`` without a prefix (``trainer.evaluate(data)``, whose names are the
    train metrics' own: ``loss``) is not logged; ``evaluate(data, prefix="test/")`` is, at the
    trainer's step.

    The trainer's ``config`` goes to every writer (``write_hparams``) before the first record of a
    ``fit``, unless this logger, or the run it resumed, already wrote that same config. After a resume,
    ``history`` is read back from the first writer that can (``JsonlWriter``, ``CsvWriter``).
    Host values that other callbacks hand over with ``trainer.record`` join the next window.
    ``history`` keeps every ``(step, scalars)`` written; ``write_images`` / ``write_texts`` pass
    other outputs (plots, samples) to every writer.
    """

    step_interval_attributes = ("log_every",)

    @other_names(METRICS_LOGGER)
    def __init__(self, writers: Iterable[MetricWriter], log_every: int = DefaultInterval(50)):
        if not isinstance(log_every, int) or log_every <= 0:
            raise ValueError(f"log_every={log_every!r} must be a positive integer.")
        self.writers = [writers] if isinstance(writers, MetricWriter) else list(writers)
        for writer in self.writers:
            if not isinstance(writer, MetricWriter):
                raise TypeError(f"writers must be MetricWriter instances; got {type(writer).__name__}. A writer "
                                "of your own subclasses callbacks.MetricWriter (write_scalars, ...).")
        self.log_every = log_every
        self.history: list[tuple[int, dict[str, float]]] = []
        self.last_logged_step = 0
        self._key = f"metrics_logger_{id(self)}"  # its window's sums; named by its state key at fit start
        self._fetch = LaggedFetch()
        self._hparams_written: str | None = None  # the config this logger (or the run it resumed) wrote, as JSON
        self._hparams_due: Any = None  # the config to write before the next record, if it is new
        self._earlier: list = []  # (writer, where) holding an earlier run's log: started again at the first write
        self._before: tuple | None = None  # (trainer ref, writers holding output) before its evaluations ahead of fit
        self._trained = False  # this fit trained a step
        self._taken: dict[str, tuple] = {}  # name -> the trainer.record entry this logger wrote last
        self._captured: dict[int, dict[str, tuple]] = {}  # window step -> trainer.record entries held for it
        self._open: int | None = None  # the window pushed at the last step (records after this logger to take)
        self._carried: dict[str, tuple] = {}  # trainer.record entries a checkpoint kept for its next window
        self._trainer: Any = None  # a weak reference: state_dict keeps the records this logger has not written

    @property
    def fetches(self) -> int:
        """Device-to-host reads this logger made (one per written window)."""
        return self._fetch.fetches

    def on_fit_start(self, trainer: Any) -> None:
        callbacks = trainer.callbacks.callbacks  # a name a resumed run's logger shares: checkpoints keep the window
        if any(cb is self for cb in callbacks):
            self._key = "window:" + callback_keys(callbacks)[next(i for i, cb in enumerate(callbacks) if cb is self)]
        trainer.add_metric_sums(self._key)
        self._hparams_due = trainer.config  # written before the first record: after a resume's restore
        self._trained = False
        self._earlier = []
        self._captured, self._open, self._trainer = {}, None, weakref.ref(trainer)
        _refuse_shared_targets([cb for cb in callbacks if isinstance(cb, MetricsLogger)])
        if trainer.step == 0 and not trainer.resuming:  # a fresh run: what the files held is an earlier run's,
            baseline = self._held_before(trainer)  # less this trainer's evaluations before the fit (step 0)
            self._earlier = self._before[1] if baseline else self._outputs()
            self.history = [(s, v) for s, v in self.history if s == 0] if baseline else []  # a logger used before
            self.last_logged_step, self._hparams_written, self._carried = 0, None, {}
        self._before = None

    def _start_files_again(self) -> None:
        """A fresh run (step 0, no resume) starts the files that held an earlier run's log when it began
        again at its first write, as Keras's ``CSVLogger`` does, rather than appending to them (steps
        logged twice, two configs); a run that fails before writing anything leaves them as they were."""
        earlier, self._earlier = self._earlier, []
        for writer, _ in earlier:
            writer.rewind(0)
        if earlier:
            warnings.warn(f"{', '.join(where for _, where in earlier)} held an earlier run's log; this fresh run "
                          "(step 0, no resume) starts it again. To keep it, log this run elsewhere; to continue "
                          "that run, fit(..., resume=True) from its checkpoints.", UserWarning, stacklevel=2)

    def _write_hparams_if_new(self) -> None:
        """The config when it is due (before a fit's first record; at its end if none came),
        unless this logger, or the run it resumed, already wrote the same (compared as written, so
        arrays in it compare too): a second ``fit`` or a resume writes no second record."""
        if self._earlier:
            self._start_files_again()
        if self._hparams_due is None:
            return
        config, self._hparams_due = self._hparams_due, None
        written = json.dumps(plain(config), sort_keys=True)
        if written != self._hparams_written:
            for writer in self.writers:
                writer.write_hparams(config)
            self._hparams_written = written

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, Any]) -> None:
        self._trained = True
        if self._open is not None:  # the window of the last step: what callbacks after this one recorded there
            self._capture(trainer, self._open)
            self._open = None
        self._write_pending(trainer, block=False)
        if step % self.log_every == 0:
            self._fetch.push(step, trainer.take_metric_sums(self._key, packed=True))
            self._capture(trainer, step)  # what callbacks before this one recorded (the next step may replace it)
            self._open = step

    def _write_before_save(self, trainer: Any) -> None:
        """Called by ``Checkpoint.save`` first, after every callback of the step ran: the config and the windows
        taken so far are written (at a fit's end, the last partial window too; not after a preemption, whose
        resume writes it whole), so the checkpoint's state of this logger holds nothing that a resume would
        write twice or lose, and a kill after the checkpoint loses no window."""
        self._write_hparams_if_new()
        if trainer.fitting or trainer.preempted:
            self._write_pending(trainer)
        else:
            self.write_to_end(trainer)

    def on_eval_end(self, trainer: Any, metrics: Mapping[str, float]) -> None:
        if not trainer.fitting and not trainer.eval_prefix:  # ``trainer.evaluate(data)`` after a run: its
            return  # names are the train metrics' own
        if not trainer.fitting and trainer.step == 0 and not self._held_before(trainer):  # a baseline before a fit:
            self._before = (weakref.ref(trainer), self._outputs())  # a fresh fit starts again only what came before
        self._write_pending(trainer)
        self.write_scalars(trainer.step, metrics)

    def _held_before(self, trainer: Any) -> bool:
        """Whether the files' content before ``trainer``'s first write is known (``_before``)."""
        return self._before is not None and self._before[0]() is trainer

    def _outputs(self) -> list[tuple[MetricWriter, str]]:
        """The writers holding output now, with where."""
        return [(writer, where) for writer in self.writers if (where := writer.earlier_output())]

    def on_fit_end(self, trainer: Any) -> None:
        self.write_to_end(trainer)
        self.flush()

    def write_to_end(self, trainer: Any) -> None:
        """At a fit's end, writes every window up to its last step (the last one partial): ``on_fit_end``
        does it, and so does a callback listed before this logger that reads ``history`` there (``Plots``)."""
        self._write_hparams_if_new()
        self._write_pending(trainer)
        if trainer.preempted:  # the checkpoint holds the partial window's sums: the resumed run writes it whole,
            return  # as the unbroken run does (written now, it would stay in the logs beside that one)
        if trainer.step > self.last_logged_step:  # the last, partial window, read without restarting it: a
            # checkpoint keeps its sums whichever callback saves first, and the window's own record (a
            # later fit, a resume) still counts all its steps, as the unbroken run's does
            partial = trainer.sums_snapshots().get(self._key) or {}
            self._write_window(trainer, trainer.step, None, snapshot_means(partial))

    def on_exception(self, trainer: Any, exception: BaseException) -> None:
        """A run that crashed while training gets its config and the windows it finished (their steps ran);
        one that failed before its first step (a refused resume, data the model cannot take) writes nothing."""
        if self._trained:
            self._write_hparams_if_new()
        self._write_pending(trainer)  # an error of the device's own re-raises here: dispatch_all warns, goes on
        self.flush()

    def flush(self) -> None:
        """Flushes every writer."""
        for writer in self.writers:
            writer.flush()

    def close(self) -> None:
        """Closes every writer (they reopen, appending, if written to again)."""
        for writer in self.writers:
            writer.close()

    def _write_pending(self, trainer: Any, block: bool = True) -> None:
        """Writes the windows whose values reached the host (all of them when ``block``)."""
        while (popped := self._fetch.pop(block)) is not None:
            self._write_window(trainer, *popped)

    def _capture(self, trainer: Any, step: int) -> None:
        """Holds, for the window ending at ``step`` (written a step or more later), the newest ``trainer.record``
        entries of that step or before: a callback recording every step replaces them before the write."""
        if trainer.pending_logs:
            _newest_up_to(step, trainer.pending_logs, self._captured.setdefault(step, {}))

    def _write_window(self, trainer: Any, step: int, sums: Any, scalars: dict[str, float] | None = None) -> None:
        scalars = compute_sums(sums) if sums is not None else dict(scalars or {})
        if self._open == step:
            self._open = None
        entries = _newest_up_to(step, trainer.pending_logs, _newest_up_to(step, self._carried, self._captured.pop(step, {})))
        self._carried = {k: entry for k, entry in self._carried.items() if entry[0] > step}
        taken = {k: entry for k, entry in entries.items() if self._taken.get(k) is not entry}  # new to this logger
        scalars.update({k: value for k, (_, value) in taken.items()})
        self._taken.update(taken)
        loggers = [cb for cb in trainer.callbacks.callbacks if isinstance(cb, MetricsLogger)]
        for name, entry in taken.items():  # every logger has it: dropped (each logger writes each value once)
            if trainer.pending_logs.get(name) is entry and all(logger._taken.get(name) is entry for logger in loggers):
                del trainer.pending_logs[name]
        self.last_logged_step = step
        if scalars:
            self.write_scalars(step, scalars)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes ``scalars`` at ``step`` to every writer now, flushed, and keeps them in ``history``."""
        scalars = {k: float(v) for k, v in scalars.items()}
        self.history.append((step, scalars))
        self._write_hparams_if_new()
        for writer in self.writers:
            writer.write_scalars(step, scalars)
            writer.flush()  # at the log cadence only: a killed run keeps every window it wrote

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes named images (``[H, W, C]``) at ``step`` to every writer, flushed."""
        self._write_hparams_if_new()
        for writer in self.writers:
            writer.write_images(step, images)
            writer.flush()

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes named texts at ``step`` to every writer, flushed."""
        self._write_hparams_if_new()
        for writer in self.writers:
            writer.write_texts(step, texts)
            writer.flush()

    def on_checkpoint_restore(self, trainer: Any, checkpoint: dict) -> None:
        """A resumed run: drop what the writers got after the checkpoint's step (no duplicates), and take
        ``history`` back from the first writer that can read its file (the whole run, for ``Plots``);
        a logger that already holds the run's history (a rollback inside the run) keeps it, cut back."""
        while self._fetch.pop() is not None:
            pass
        self._captured, self._open = {}, None
        held = bool(self.history)
        self.history = [(s, v) for s, v in self.history if s <= trainer.step]
        for writer in self.writers:
            writer.rewind(trainer.step)
        if trainer.step == 0:  # a rewind to 0 (a fresh start, a rollback to step 0) drops the config written there
            self._hparams_due, self._hparams_written = trainer.config, None
        for writer in self.writers if not held else ():
            try:
                written = writer.read_scalars()
            except (OSError, ValueError, TypeError) as err:  # a damaged file: the history is a plot's, not the run's
                warnings.warn(f"{type(writer).__name__} could not read its file back ({err}); the logger's history "
                              "holds only what this run logs.", RuntimeWarning, stacklevel=2)
                continue
            if written is not None:
                self.history = [(s, v) for s, v in written if s <= trainer.step]
                break

    def state_dict(self) -> dict[str, Any]:
        """Its last logged step, the config it wrote, and the ``trainer.record`` values it has not written yet
        (a resume writes them in their window, as the unbroken run does)."""
        trainer = self._trainer() if self._trainer is not None else None
        pending = {k: e for k, e in (trainer.pending_logs if trainer is not None else {}).items()
                   if self._taken.get(k) is not e}
        records = {k: list(e) for k, e in {**self._carried, **pending}.items()}  # (a save wrote its windows first)
        return {"last_logged_step": self.last_logged_step, "hparams": self._hparams_written, "records": records}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Takes back what ``state_dict`` kept."""
        self.last_logged_step = int(state.get("last_logged_step", 0))
        self._hparams_written = state.get("hparams", self._hparams_written)
        self._carried = {k: (int(step), float(value)) for k, (step, value) in state.get("records", {}).items()}


def _newest_up_to(step: int, entries: Mapping[str, tuple], into: dict[str, tuple]) -> dict[str, tuple]:
    """``into`` with each of ``entries`` recorded at ``step`` or before that is newer than ``into``'s own."""
    for name, entry in entries.items():
        if entry[0] <= step and (name not in into or into[name][0] <= entry[0]):
            into[name] = entry
    return into


def _refuse_shared_targets(loggers: list[MetricsLogger]) -> None:
    """Two writers of one file or TensorBoard folder undo each other: a rewind by one replaces the file the
    other still writes to, and TensorBoard's purge by one hides the other's curves (it takes a folder as
    one run). Refused when ``fit`` starts, naming the target."""
    seen: dict[str, str] = {}
    for logger in {id(logger): logger for logger in loggers}.values():  # one listed twice shares with no other
        for writer in {id(writer): writer for writer in logger.writers}.values():
            target = getattr(writer, "path", None) or getattr(writer, "logdir", None)
            if target is None:
                continue
            where = os.path.realpath(target)
            if where in seen:
                raise ValueError(f"{type(writer).__name__} and {seen[where]} both write to {target}: each rewind or "
                                 "TensorBoard purge by one would drop the other's records. Give each writer its own "
                                 "file or folder (tb/every_2, tb/every_4), or use one MetricsLogger.")
            seen[where] = type(writer).__name__
