"""``Checkpoint``: regular checkpoints of everything a resumed run needs (restoring them: ``trainer.resume``).

One checkpoint step holds the train state (parameters, model state with its RNG streams,
optimizer state, step, the non-finite guard), the data iterator's position, every callback's
``state_dict()``, the per-epoch history, the run config and an environment fingerprint. Saving
happens after every callback of the step (or epoch) has run, so their states match the arrays.
It lives beside the engine (``callbacks`` re-exports it) because ``fit(resume=...)`` and the
preemption handler use it.

Example::

    trainer = Trainer(model, tx, max_epochs=10, workdir="runs/x",  # Checkpoint: also in callbacks
                      callbacks=[Checkpoint(every_n_steps=500, max_to_keep=3)])
    trainer.fit(train, resume=True)   # continues from the newest good one in runs/x/checkpoints/step_<N>
"""

from __future__ import annotations

import copy
import functools
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import numpy as np

from trainer.dtypes import is_floating
from trainer.checkpoint_arrays import flatten
from trainer.checkpoint_store import FORMAT, CheckpointStore
from trainer.json_values import jsonable
from trainer.events import Callback
from trainer.sums import EPOCH_SUMS, PARTIAL_EPOCH
from trainer.optim import optimizer_signature
from trainer.metric_names import check_mode, resolve_mode
from trainer.module_link import adopt_written_weights
from trainer.processes import several
from trainer.other_names import CHECKPOINT, other_names

if TYPE_CHECKING:  # pragma: no cover
    from trainer.trainer import Trainer


def environment() -> dict[str, Any]:
    """What can change numerics between runs: library versions, XLA flags, x64, devices."""
    devices = jax.devices()
    return {**_versions(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "x64": bool(jax.config.jax_enable_x64),
            "device_kind": devices[0].device_kind, "device_count": len(devices)}


@functools.lru_cache(maxsize=None)
def _versions() -> dict[str, str | None]:
    """Installed versions, read once per process (``importlib.metadata`` parses files: ~13 ms a save)."""
    import importlib.metadata as md

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def callback_keys(callbacks: list[Callback]) -> list[str]:
    """Each callback's key in a checkpoint: its ``state_key`` or else its class name, with ``#2``, ``#3``
    for later ones of the same key, so adding, removing or reordering other callbacks on a resume
    loses no state."""
    return _numbered([_state_key(cb) for cb in callbacks])


def _numbered(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return keys


def _state_key(callback: Callback) -> str:
    key = callback.state_key
    if key is None:
        return type(callback).__name__
    if not isinstance(key, str) or not key:
        raise TypeError(f"{type(callback).__name__}.state_key = {key!r} must be a non-empty string (or None for the "
                        "class name).")
    return key


_SCALARS = (float, int, bool, str, type(None))


def _history_copy(history: list[dict]) -> list[dict]:
    """The history as the save keeps it: rows of numbers copied as dicts (6x faster than ``deepcopy``, which
    took most of a save's time after thousands of epochs), anything else a callback put in deep-copied."""
    return [dict(row) if all(type(v) in _SCALARS for v in row.values()) else copy.deepcopy(row) for row in history]


def _callback_states(trainer: "Trainer") -> dict[str, Any]:
    callbacks = trainer.callbacks.callbacks
    return {key: jsonable(cb.state_dict(), f"{type(cb).__name__}.state_dict()")
            for key, cb in zip(callback_keys(callbacks), callbacks)}


def check_callback_states(trainer: "Trainer") -> None:
    """Refuses a callback state a checkpoint cannot keep when ``fit`` starts, not at the first save
    (which would fail after the steps before it had trained)."""
    if trainer.checkpoints:
        _callback_states(trainer)


def _load_callback_states(trainer: "Trainer", saved: Mapping[str, Any]) -> None:
    """Hands each callback its saved state (by ``callback_keys``; checkpoints written before ``state_key``
    used the class name with ``#n``, before that ``<index>:<class>``); a non-empty saved state that no
    callback takes is warned about."""
    callbacks, taken = trainer.callbacks.callbacks, set()
    by_class = _numbered([type(cb).__name__ for cb in callbacks])
    for i, (key, class_key, cb) in enumerate(zip(callback_keys(callbacks), by_class, callbacks)):
        candidates = [key] if cb.state_key is None else [key, class_key]  # an older checkpoint: by class
        found = next((k for k in [*candidates, f"{i}:{type(cb).__name__}"] if k in saved and k not in taken), None)
        if found is not None:
            taken.add(found)
            if saved[found] is not None:
                cb.load_state_dict(saved[found])
    left = sorted(k for k, v in saved.items() if k not in taken and v)
    if left:
        warnings.warn(f"the checkpoint holds state for callbacks {left} that this trainer does not have; it is "
                      "not restored (add them back to resume their state).", RuntimeWarning, stacklevel=4)


class Checkpoint(Callback):
    """Saves checkpoints with orbax (atomic, asynchronous, retention, best-k by a metric).

    Args:
      directory: where step folders go (default ``<workdir>/checkpoints``).
      every_n_steps: save after every N-th step (``None``: not by steps).
      every_n_epochs: save after every N-th epoch (``None``: not by epochs).
      max_to_keep: newest checkpoints kept (``None``: every one).
      monitor / mode / keep_best: also keep the ``keep_best`` (1 when a monitor is given) best checkpoints by
        ``monitor`` (``min``, ``max``, or ``auto``: from its name, a loss lower, an accuracy higher), as the
        epoch's logs or an evaluation at the saved step report it (a step save at an epoch's last step is
        ranked at the epoch's end; one mid-epoch without an evaluation at its step is not ranked).
      async_save: write in the background: the loop only copies the state to the host (and checks
        it is finite); checksums and orbax's save run on a worker thread. The trainer waits for the
        commit before exiting, before reporting a preemption save, and at the end of ``fit``.
      min_interval_seconds: skip a periodic save due less than this long after the previous save
        (``None``: never skip). Each save waits for the step and copies the state to the host: on
        a GPU the MNIST recipe's 30-step epochs meant 30 saves a second. The save at the end of
        ``fit`` and on preemption always happens. ``clock`` is injectable for tests.
    """

    step_interval_attributes = ("every_n_steps",)

    @other_names(CHECKPOINT)
    def __init__(self, directory: str | os.PathLike | None = None, *, every_n_steps: int | None = None,
                 every_n_epochs: int | None = 1, max_to_keep: int | None = 3, monitor: str | None = None,
                 mode: str = "auto", keep_best: int | None = None, async_save: bool = True,
                 min_interval_seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs),
                            ("keep_best", keep_best)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r} must be a positive integer or None.")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool)
                                        or max_to_keep <= 0):
            raise ValueError(f"max_to_keep={max_to_keep!r} must be a positive integer, or None to keep every checkpoint.")
        if monitor is not None:
            mode = resolve_mode(monitor, mode, "Checkpoint")
        else:
            check_mode(mode, "Checkpoint")
        if min_interval_seconds is not None and not min_interval_seconds >= 0:
            raise ValueError(f"min_interval_seconds={min_interval_seconds!r} must be >= 0 or None.")
        if keep_best and monitor is None:
            raise ValueError("keep_best needs monitor= (the metric that ranks checkpoints).")
        if monitor is not None and keep_best is None:
            keep_best = 1  # a monitor ranks checkpoints to keep the best (Lightning's save_top_k=1)
        self.directory = Path(directory) if directory is not None else None
        self._given_directory = self.directory  # None: the trainer's <workdir>/checkpoints, per trainer
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.max_to_keep, self.monitor, self.mode, self.keep_best = max_to_keep, monitor, mode, keep_best
        self.async_save = async_save
        self.min_interval_seconds, self.clock = min_interval_seconds, clock
        self.store: CheckpointStore | None = None
        self._warned_monitor = False
        self._last_ranked = False  # the last save carried the monitored metric
        self.last_saved_step: int | None = None
        self._last_saved_at: float | None = None

    @property
    def best_step(self) -> int | None:
        """The step of the best checkpoint kept by ``monitor`` (``None``: no monitor, nothing saved, or its folder
        not opened yet: a ``fit`` opens it)."""
        if self.monitor is None or self.store is None:
            return None
        self.store.wait()
        return self.store.manager.best_step()

    @property
    def best_path(self) -> Path | None:
        """The folder of the best checkpoint (``best_step``): ``load_model(checkpoint.best_path, model)``."""
        step = self.best_step
        return None if step is None else self.store.folder(step)

    def folder(self, trainer: "Trainer") -> Path | None:
        """Where this callback saves: ``directory``, or ``<workdir>/checkpoints`` (None: neither is set)."""
        if self._given_directory is not None:
            return self._given_directory
        return Path(trainer.workdir) / "checkpoints" if trainer.workdir is not None else None

    def open(self, trainer: "Trainer") -> CheckpointStore:
        """The store in ``directory`` (or ``<workdir>/checkpoints``), opened once per folder: a callback
        reused by a trainer of another workdir (a sweep's shared callbacks) opens that one's."""
        folder = self.folder(trainer)
        if folder is None:
            raise ValueError("Checkpoint needs a folder: pass directory= or give the Trainer a workdir.")
        if self.store is not None and self.store.directory != folder.absolute():
            self.store.close()
            self.store, self.last_saved_step, self._last_ranked, self._last_saved_at = None, None, False, None
        if self.store is None:
            if several() and self.min_interval_seconds is not None:
                raise ValueError(f"min_interval_seconds={self.min_interval_seconds} with {jax.process_count()} processes: "
                                 "each reads its own clock, so they disagree on when a save is due and hang; save "
                                 "by steps or epochs (every_n_steps, every_n_epochs).")
            self.directory = folder
            self.store = CheckpointStore(self.directory, max_to_keep=self.max_to_keep, monitor=self.monitor, mode=self.mode,
                                         keep_best=self.keep_best, async_save=self.async_save and not several())
        return self.store

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.open(trainer)

    def due_after_step(self, step: int) -> bool:
        """Whether a save is due after optimizer step ``step`` (``every_n_steps``, ``min_interval_seconds``)."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0 and self._interval_passed()

    def due_after_epoch(self, epoch: int) -> bool:
        """Whether a save is due at the end of epoch ``epoch`` (``every_n_epochs``, ``min_interval_seconds``)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0 and self._interval_passed()

    def _interval_passed(self) -> bool:
        return (self.min_interval_seconds is None or self._last_saved_at is None
                or self.clock() - self._last_saved_at >= self.min_interval_seconds)

    def save(self, trainer: "Trainer", *, wait: bool = False) -> bool:
        """Saves the trainer now; returns False (with a warning) when the state is not finite.

        With ``async_save`` the write goes on in the background after this returns: ``wait=True``,
        ``checkpoint.store.wait()`` or the end of ``fit`` waits for it and raises its failure.
        """
        store = self.open(trainer)
        adopt_written_weights(trainer)  # a callback's write into trainer.model (in on_epoch_end, say) is saved
        at_epoch_end = trainer.position == 0 and bool(trainer.history) and trainer.history[-1].get("epoch") == trainer.epoch - 1
        value = self._monitored_value(trainer, at_epoch_end)
        ranked = value is not None
        if self.last_saved_step == trainer.step and not (ranked and not self._last_ranked):
            if wait:
                store.wait()
            return True
        for callback in trainer.callbacks.callbacks:  # a MetricsLogger writes what it holds first
            getattr(callback, "_write_before_save", lambda trainer: None)(trainer)
        arrays, leaves = flatten(trainer.state, checksums=False)  # the store computes them off the loop
        by_path = {d["path"]: a for d, a in zip(leaves, arrays.values())}
        bad = [path for path, a in by_path.items()
               if not path.startswith(".guard") and is_floating(a.dtype) and not np.isfinite(a).all()]
        if bad:
            warnings.warn(f"not saving step {trainer.step}: {bad[:3]} hold non-finite values; the last good "
                          "checkpoint stays the newest.", RuntimeWarning, stacklevel=2)
            return False
        if bool(by_path.get(".guard['halted']", False)):  # the host copy just taken, not another device read
            warnings.warn(f"not saving step {trainer.step}: training halted on a non-finite step; the last "
                          "good checkpoint stays the newest.", RuntimeWarning, stacklevel=2)
            return False
        meta = describe(trainer, leaves)
        metrics = {self.monitor: value} if ranked else None
        if self.monitor and at_epoch_end and not ranked and not self._warned_monitor:
            self._warn_if_never_reported(trainer)
        store.save(trainer.step, arrays, meta, metrics)
        if wait or not self.async_save or several():  # several processes: a write in the background hangs them
            store.wait()
        self.last_saved_step, self._last_ranked = trainer.step, ranked
        if self.min_interval_seconds is not None:
            self._last_saved_at = self.clock()
        trainer.callbacks.dispatch("on_checkpoint_save", trainer, meta)
        return True

    def _warn_if_never_reported(self, trainer: "Trainer") -> None:
        """A monitor no epoch or evaluation reports (a misspelt name) would keep only the newest, silently;
        one an evaluator not run yet may report (every N epochs) is given until it has run."""
        if any(self.monitor.startswith(e.prefix) and e.last_step is None for e in trainer.evaluators):
            return
        seen = set(trainer.history[-1]).union(*(e.last_metrics for e in trainer.evaluators))
        if self.monitor in seen:
            return
        self._warned_monitor = True
        warnings.warn(f"Checkpoint(monitor={self.monitor!r}) is not among the metrics {sorted(seen - {'epoch'})}: "
                      "checkpoints are not ranked by it, so keep_best keeps nothing beyond the newest. Name one "
                      "of those metrics.", RuntimeWarning, stacklevel=3)

    def _monitored_value(self, trainer: "Trainer", at_epoch_end: bool) -> float | None:
        """The ``monitor``'s value for this very step, which ranks its checkpoint: the epoch's at its end,
        else an evaluation's at this step (Lightning's way); ``None`` when neither has it (a step save
        mid-epoch would carry an older value)."""
        if not self.monitor:
            return None
        if at_epoch_end and self.monitor in trainer.history[-1]:
            return trainer.history[-1][self.monitor]
        for evaluator in trainer.evaluators:
            if evaluator.last_step == trainer.step and self.monitor in evaluator.last_metrics:
                return evaluator.last_metrics[self.monitor]
        return None

    def saved_unranked(self, step: int) -> bool:
        """Whether it saved ``step`` without its monitor's value: the epoch's end saves it again, ranked."""
        return bool(self.monitor) and self.last_saved_step == step and not self._last_ranked

    def on_fit_end(self, trainer: "Trainer") -> None:
        """The final state is saved too (unless just saved), so a finished run can be continued."""
        if trainer.step > 0:
            self.save(trainer, wait=True)
        if self.store is not None:
            self.store.wait()

    def on_exception(self, trainer: "Trainer", exception: BaseException) -> None:
        if self.store is not None:
            try:
                self.store.wait()  # a save in flight still commits: it is a good checkpoint
            except Exception as failed:  # the error that stopped fit stays the one raised
                warnings.warn(f"a checkpoint write failed as well: {failed!r}", RuntimeWarning, stacklevel=2)


def describe(trainer: "Trainer", leaves: list[dict]) -> dict[str, Any]:
    """The JSON half of a checkpoint: new containers throughout, as it is written in the background."""
    iterator = trainer.data_iterator
    data_state = iterator.get_state() if hasattr(iterator, "get_state") else None
    if not isinstance(data_state, Mapping):  # only ArrayLoader's protocol is restored; grain's (bytes) is not
        data_state = None
    epoch, position = trainer.epoch, trainer.position
    last = trainer.history[-1] if trainer.history else {}
    if last.get("epoch") == epoch and not last.get(PARTIAL_EPOCH):  # saved inside the epoch's end (a callback's
        epoch, position = epoch + 1, 0  # on_epoch_end): that epoch is done, a resume must not end it again
    if data_state is not None:  # a prefetch thread runs the iterator ahead: record what was trained on
        data_state = {**data_state, "epoch": epoch, "position": position}
    sums = {**(trainer.restored_window_sums or {}), EPOCH_SUMS: trainer.restored_epoch_sums,
            **trainer.sums_snapshots()}  # the restored ones while the step is not built yet (a save before it)
    return {
        "format": FORMAT, "step": trainer.step, "epoch": epoch, "position": position,
        "data_state": copy.deepcopy(data_state), "history": _history_copy(trainer.history), "config": jsonable(trainer.config),
        "epoch_sums": sums.pop(EPOCH_SUMS, None), "window_sums": sums, "skip_batches": sorted(trainer.skip_batches),
        "compiled_batch_size": trainer.compiled_batch_size,
        "environment": environment(), "optimizer": optimizer_signature(trainer.state.opt_state),
        "has_guard": trainer.state.guard is not None, "leaves": leaves,
        "callbacks": _callback_states(trainer),
    }


