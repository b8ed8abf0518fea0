"""Checkpoint files: orbax's ``CheckpointManager`` plus what it lacks (checksums, fallback, clear errors).

A checkpoint step holds two orbax items under one atomic commit: ``state``, the train state's
arrays (up to 1 MiB each joined into one buffer per dtype, larger ones alone: ``pack_small``), and
``meta``, a JSON document with everything else (step, data position, callback states, config,
environment fingerprint) and, for every array, its pytree path, shape, dtype, place in a joined
buffer and CRC32 (of the host copy taken at save time). Restoring checks the structure against the
current model (a clear error on mismatch), verifies every checksum, and falls back to the previous
step when the newest cannot be restored.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from trainer.background import SerialWorker
from trainer.checkpoint_arrays import (CheckpointError, fill_checksums, pack_small, stored_shapes, unpack_small,
                                       verify_checksums)
from trainer.user_warnings import warn

FORMAT = 2  # 2: small arrays stored joined per dtype (``pack_small``); 1 (every array alone) still reads
READABLE_FORMATS = (1, 2)
PACK_MAX_BYTES = 1 << 20
TMP_MARKER = ".orbax-checkpoint-tmp"
STEP_PREFIX = "step"  # step folders are step_<N>: a foreign integer-named folder is never one of ours


def orbax_checkpoint():
    """``orbax.checkpoint``, imported on first use: a run that saves nothing skips its ~26 MiB and import time."""
    import orbax.checkpoint

    return orbax.checkpoint


def _quiet_missing_metrics() -> None:
    """Drops orbax's warning for a save without metrics (a step saved mid-epoch, or one without the
    epoch's metric) once it tracks a best: such steps are kept by recency alone, as intended; and its notes
    that a reader's manager (``read_only``) saves nothing, which is what it was asked."""
    import logging

    logger = logging.getLogger("absl")
    if not any(isinstance(f, _MissingMetricsFilter) for f in logger.filters):
        logger.addFilter(_MissingMetricsFilter())


class _MissingMetricsFilter:
    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(part in message for part in ("did not provide metrics", "read_only=True", "is read only"))


def _quiet_closed_loop_noise() -> None:
    """After a read of damaged files fails, tensorstore still answers the reads orbax had started, through
    an event loop orbax has closed: each prints an unraisable ``RuntimeError('Event loop is closed')``
    traceback (four for the CNN) that looks like a crash. Those alone are dropped; others pass on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_noise", False):
        return

    def hook(args: Any) -> None:
        if not (isinstance(args.exc_value, RuntimeError) and str(args.exc_value) == "Event loop is closed"):
            previous(args)

    hook.drops_closed_loop_noise = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class _Damaged(Exception):
    """A step folder of ours whose files cannot be read."""


def _short(err: BaseException) -> str:
    """An orbax / tensorstore error without the storage spec it appends (hundreds of characters)."""
    text = str(err).split(" [tensorstore_spec=")[0]
    return text if len(text) <= 400 else text[:400] + " ..."


_STORES: "weakref.WeakSet[CheckpointStore]" = weakref.WeakSet()  # every open store of this process
_ORBAX_SAVES = threading.Lock()  # one store starts an orbax save at a time, the others' finished first


class CheckpointStore:
    """An orbax ``CheckpointManager`` in ``directory`` with retention, checksums and fallback.

    Args:
      directory: the folder of step folders.
      max_to_keep: newest checkpoints kept.
      monitor / mode / keep_best: also keep the ``keep_best`` best by the metric ``monitor``.
      async_save: write in the background (``wait()`` before relying on a save): the checksums and
        orbax's own share of a save run on a worker thread, so ``save`` returns once it has queued
        the host arrays (on a GPU orbax's share held the loop ~52 ms a save, the device idle).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, monitor: str | None = None,
                 mode: str = "min", keep_best: int | None = None, async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only  # a reader (load_model): another process's saves under way, damage, left alone
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.clean_temporary()
        ocp = orbax_checkpoint()
        from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

        keep: list = [policies.LatestN(n=max_to_keep)]
        best: dict = {}
        if monitor is not None and keep_best:
            worst = float("inf") if mode == "min" else float("-inf")

            def score(metrics: Mapping[str, Any]) -> float:  # a NaN, or a step ranked by another monitor (a
                value = metrics.get(monitor, worst)  # resume that changed it), ranks last: NaN would
                return worst if value is None or math.isnan(value) else value  # compare unordered and sort anywhere

            keep.append(policies.BestN(get_metric_fn=score, reverse=(mode == "min"), n=keep_best,
                                      keep_checkpoints_without_metrics=False))
            # orbax writes a step's metrics to disk only when it tracks a best itself: without them a
            # resumed run's manager sees the old best as metric-less, and BestN prunes it
            best = {"best_fn": score, "best_mode": mode}
        if best or read_only:
            _quiet_missing_metrics()
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only, read_only=read_only,
            step_prefix=STEP_PREFIX,
            preservation_policy=policies.AnyPreservationPolicy(keep), **best)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._writer = SerialWorker("checkpoint-writer") if async_save else None
        self._closed = self._failed = False
        with _ORBAX_SAVES:  # writer threads list the stores under it
            _STORES.add(self)

    def clean_temporary(self) -> list[Path]:
        """Removes folders a killed save left behind (orbax's temporary names)."""
        removed = [p for p in self.directory.iterdir() if TMP_MARKER in p.name]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def save(self, step: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> None:
        """Writes ``arrays`` and ``meta`` as checkpoint ``step``, filling in missing checksums first.

        With ``async_save`` this queues the write and returns (waiting first for the previous write
        if it is still under way); ``arrays`` must not change afterwards (``meta`` is copied). When
        the previous write failed, this one is written before returning: if it succeeds the earlier
        failure is a warning (the newer checkpoint supersedes it: a preemption save still lands),
        if it fails too its error is raised. ``wait`` raises the last write's failure.
        """
        meta = {**meta, "leaves": [dict(d) for d in meta["leaves"]]}  # the write fills in its copy
        if self._writer is None:
            self._write(step, arrays, meta, metrics)
            return
        try:
            self._writer.drain()
        except Exception as failed:
            self._write(step, arrays, meta, metrics)  # raises its own error, chained to the earlier one
            self.manager.wait_until_finished()
            warnings.warn(f"writing an earlier checkpoint failed ({failed!r}); step {step} was written "
                          "since, so the newest state is on disk.", RuntimeWarning, stacklevel=3)
            return
        self._writer.submit(lambda: self._write(step, arrays, meta, metrics))

    def _write(self, step: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
               metrics: Mapping[str, float] | None) -> None:
        fill_checksums(arrays, meta["leaves"])
        stored = pack_small(arrays, meta["leaves"], PACK_MAX_BYTES)
        ocp = orbax_checkpoint()
        args = ocp.args.Composite(state=ocp.args.StandardSave(stored), meta=ocp.args.JsonSave(dict(meta)))
        with _ORBAX_SAVES:  # orbax's asynchronous saves share process-wide state (operation ids, signals): two
            for other in list(_STORES):  # stores' saves under way together (best + last) failed or hung 300 s
                if other is not self and not other._closed and not other._failed:
                    try:
                        other.manager.wait_until_finished()
                    except Exception:  # noqa: BLE001 - that store's failure: its own wait() raises it, not this save
                        other._failed = True  # and asked once (orbax raises, and logs, it at every wait)
            self._failed = False
            if step in self.manager.all_steps():  # a run resumed from an older step passes this one again
                self.manager.wait_until_finished()
                self.manager.delete(step)
            self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)

    def wait(self) -> None:
        """Blocks until every started save is committed; raises a background write's failure."""
        self._drain_writer()
        self.manager.wait_until_finished()

    def _drain_writer(self) -> None:
        """Lets the queued writes reach orbax: only then may this thread use the manager."""
        if self._writer is not None:
            self._writer.drain()

    def folder(self, step: int) -> Path:
        return self.directory / f"{STEP_PREFIX}_{step}"

    def steps(self) -> list[int]:
        """Step numbers of the ``step_<N>`` folders, newest first (not all need be good checkpoints)."""
        self._drain_writer()
        prefix = STEP_PREFIX + "_"
        found = [p.name[len(prefix):] for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(prefix)]
        return sorted((int(n) for n in found if n.isdigit()), reverse=True)

    def damaged(self) -> list[Path]:
        """The damaged step folders a resume set aside here (``damaged_step_<N>``)."""
        return sorted(p for p in self.directory.iterdir() if p.is_dir() and p.name.startswith("damaged_"))

    def read_meta(self, step: int) -> dict | None:
        """The meta document of ``step``; ``None`` for a folder that holds no checkpoint of ours."""
        try:
            return self._read_meta(step)
        except _Damaged:
            return None

    def _read_meta(self, step: int) -> dict | None:
        """``read_meta``, raising ``_Damaged`` for a meta file that cannot be read."""
        self._drain_writer()
        folder = self.folder(step)
        if not (folder / "meta").is_dir() or not (folder / "state").is_dir():
            return None
        try:
            ocp = orbax_checkpoint()
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:
            raise _Damaged(err) from err
        return meta if isinstance(meta, dict) and meta.get("format") in READABLE_FORMATS else None

    def read_arrays(self, step: int, described: list[dict]) -> dict[str, np.ndarray]:
        self._drain_writer()
        ocp = orbax_checkpoint()
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(stored_shapes(described))))
        arrays = unpack_small({k: np.asarray(v) for k, v in restored["state"].items()}, described)
        verify_checksums(f"checkpoint step {step}", arrays, described)
        return arrays

    def restore_newest(self, check: Any = None, step: int | None = None) -> tuple[int, dict, dict] | None:
        """``(step, meta, arrays)`` of the newest good checkpoint (or of ``step``), else ``None``.

        ``check(step, meta)`` may raise to refuse a checkpoint for good (a structure mismatch);
        a step that cannot be read or fails its checksum is skipped with one warning naming it.
        """
        candidates = [step] if step is not None else self.steps()
        for candidate in candidates:
            try:
                meta = self._read_meta(candidate)
                damage = None
            except _Damaged as err:
                meta, damage = None, err.__cause__
            if meta is None:
                if step is not None:
                    raise CheckpointError(f"{self.folder(step)} holds no readable checkpoint.")
                if damage is not None:
                    self._set_aside(candidate, damage)
                elif any(self.folder(candidate).iterdir()):
                    warnings.warn(f"checkpoint step {candidate} in {self.directory} is not one this version "
                                  "can read; trying an older one.", RuntimeWarning, stacklevel=3)
                continue
            if check is not None:
                check(candidate, meta)
            try:
                arrays = self.read_arrays(candidate, meta["leaves"])
            except MemoryError:  # not the checkpoint's fault: it stays where it is
                raise
            except Exception as err:  # orbax's errors for damaged files rarely say so
                _quiet_closed_loop_noise()
                if step is not None:
                    raise CheckpointError(f"checkpoint step {step} cannot be restored: {_short(err)}") from err
                self._set_aside(candidate, err)
                continue
            return candidate, meta, arrays
        return None

    def _set_aside(self, step: int, err: BaseException) -> None:
        """A damaged step folder is renamed ``damaged_step_<N>``: kept for inspection, but no longer a
        checkpoint, so retention does not keep it in place of good ones and no later resume tries it."""
        if self.read_only:
            warn(f"checkpoint step {step} in {self.directory} is damaged ({_short(err)}); reading an older one.",
                 RuntimeWarning)
            return
        aside = self.directory / f"damaged_{self.folder(step).name}"
        n = 2
        while aside.exists():
            aside, n = self.directory / f"damaged_{self.folder(step).name}-{n}", n + 1
        try:
            self.folder(step).rename(aside)
        except OSError as failed:  # a read-only folder (a checkpoint to fine-tune from): skipped, left in place
            warn(f"checkpoint step {step} in {self.directory} is damaged ({_short(err)}) and could not be "
                 f"moved aside ({failed.strerror}); falling back to an older one.", RuntimeWarning, stacklevel=4)
            return
        self.manager.reload()
        warn(f"checkpoint step {step} in {self.directory} is damaged ({_short(err)}): moved to "
             f"{aside.name}, and falling back to an older one.", RuntimeWarning, stacklevel=4)

    def close(self) -> None:
        self._drain_writer()
        self.manager.wait_until_finished()
        self._closed = True
        self.manager.close()
