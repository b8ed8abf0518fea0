"""``TensorBoardWriter``: TensorBoard event files through tensorboardX (no TensorFlow needed).

Events are written in the calling thread with tensorboardX's own record writer (``EventsWriter``)
and summary builders, not through ``SummaryWriter``, whose events go through a
``multiprocessing.Queue`` to a writer thread: on two cores that queue's feeder and writer threads,
woken at every window, cost the fused tiny MLP ~8% of its wall time (``benchmarks/HISTORY.md``);
a window of 6 scalars written here costs ~12 us of CPU (with the ``crc32c`` package tensorboardX uses
for its checksums; 31 us with its pure-Python one) against ~104 us through the queue.

Example::

    MetricsLogger([TensorBoardWriter("runs/x/tb")], log_every=50)   # then: tensorboard --logdir runs/x/tb
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import sys
import time
from typing import Any, Mapping

import numpy as np

from callbacks.writers import MetricWriter, plain, to_uint8

_FILE_NUMBERS = itertools.count()
_NO_STEP = 2**63 - 1  # past every step: a session start there purges nothing


class TensorBoardWriter(MetricWriter):
    """Scalars, images (``[H, W, C]``), texts and hyperparameters as TensorBoard events in ``logdir``.

    ``flush_seconds``: tensorboardX's flush also ``fsync``s (about a millisecond), so ``fsync``s closer
    together than this are skipped; every ``flush`` still hands the events to the operating system (a
    killed process loses none), and ``close`` always ``fsync``s.
    """

    def __init__(self, logdir: str | os.PathLike, flush_seconds: float = 2.0):
        self.logdir = str(logdir)
        self.flush_seconds = flush_seconds
        self._flushed = -float("inf")
        self._writer = None
        self._purge_step: int | None = None

    def _open(self):
        if self._writer is None:
            tbx = _tensorboardx()
            os.makedirs(self.logdir, exist_ok=True)
            # a name of its own: two files opened within one second would otherwise share one ('wb');
            # the counter zero-padded, so that a rewind's file sorts after the file it purges
            self._writer = tbx.event_file_writer.EventsWriter(
                os.path.join(self.logdir, "events"), filename_suffix=f".{os.getpid()}.{next(_FILE_NUMBERS):06d}")
            if self._purge_step is not None:  # what tensorboardX's SummaryWriter(purge_step=...) writes, but
                # the TensorBoard server takes a run's first START as its start, purging nothing: a START past
                # any step (purging nothing) comes first, so that the purge step's own START purges
                event_pb2 = tbx.proto.event_pb2
                self._writer.write_event(event_pb2.Event(step=self._purge_step, file_version="brain.Event:2"))
                for step in (_NO_STEP, self._purge_step):
                    self._writer.write_event(event_pb2.Event(
                        step=step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
            self._purge_step = None
        return self._writer

    def _write(self, step: int, summary: Any) -> None:
        writer = self._open()
        writer.write_event(_tensorboardx().proto.event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def earlier_output(self) -> str | None:
        found = os.path.isdir(self.logdir) and any("tfevents" in name for name in os.listdir(self.logdir))
        return self.logdir if found else None

    def rewind(self, step: int) -> None:
        """TensorBoard drops the events after ``step`` when the next file starts with a purge step; a rewind
        to 0 (a fresh start) drops the config written at step 0 too (the logger writes it again)."""
        self.close()
        self._purge_step = step + 1 if step > 0 else 0

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One event holding every scalar of the window, as TensorFlow's writers do."""
        summary_pb2 = _tensorboardx().proto.summary_pb2
        values = [summary_pb2.Summary.Value(tag=_tag(name), simple_value=float(value)) for name, value in scalars.items()]
        self._write(step, summary_pb2.Summary(value=values))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """One image summary per name (``[H, W, C]``, as uint8)."""
        for name, image in images.items():
            self._write(step, _tensorboardx().summary.image(name, to_uint8(image), dataformats="HWC"))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """One text summary per name (the Text tab renders markdown)."""
        for name, text in texts.items():
            self._write(step, _tensorboardx().summary.text(name, text))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The config as a text summary ``config`` (JSON): readable in the Text tab as written."""
        self.write_texts(0, {"config": "```\n" + json.dumps(plain(hparams), indent=2, sort_keys=True) + "\n```"})

    def flush(self) -> None:
        """Hands the written events to the operating system; ``fsync``s (about a millisecond) at most
        once per ``flush_seconds``."""
        if self._writer is None:
            return
        if time.monotonic() - self._flushed >= self.flush_seconds:
            self._writer.flush()
            self._flushed = time.monotonic()
        else:  # tensorboardX's flush always fsyncs: the file's own buffer alone
            file = getattr(getattr(self._writer, "_py_recordio_writer", None), "_writer", None)
            if file is not None and hasattr(file, "fileno"):  # a local file (not tensorboardX's S3 writer)
                file.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_INVALID_TAG = re.compile(r"[^-/\w\.]")


@functools.lru_cache(maxsize=4096)
def _tag(name: str) -> str:
    """The tag tensorboardX's ``add_scalar`` would write for ``name`` (other characters become ``_``)."""
    return _INVALID_TAG.sub("_", name).lstrip("/")


@functools.lru_cache(maxsize=1)
def _tensorboardx():
    """The ``tensorboardX`` package (with its ``summary``, ``event_file_writer`` and ``proto``
    modules), imported without PyTorch.

    tensorboardX imports ``torch`` whenever it is installed (to accept its tensors), which costs
    about 190 MB of memory and seconds of start-up in a JAX program that never made a tensor; this
    writer passes numpy only, so torch is hidden during that import unless it was already loaded.
    """
    hide = "tensorboardX" not in sys.modules and "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX
    try:
        import tensorboardX
        import tensorboardX.event_file_writer
        import tensorboardX.proto.event_pb2
        import tensorboardX.proto.summary_pb2
        import tensorboardX.summary
    finally:
        if hide:
            del sys.modules["torch"]
    return tensorboardX
