"""``TensorBoardWriter``: TensorBoard event files through tensorboardX (no TensorFlow needed).

Example::

    MetricsLogger([TensorBoardWriter("runs/x/tb")], log_every=50)   # then: tensorboard --logdir runs/x/tb
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from typing import Any, Mapping

import numpy as np

from callbacks.writers import MetricWriter, _plain, to_uint8


class TensorBoardWriter(MetricWriter):
    """Scalars, images (``[H, W, C]``), texts and hyperparameters as TensorBoard events in ``logdir``.

    ``flush_seconds``: tensorboardX's flush also ``fsync``s (about a millisecond), so flushes closer
    together than this are skipped; ``close`` always flushes.
    """

    def __init__(self, logdir: str | os.PathLike, flush_seconds: float = 2.0):
        self.logdir = str(logdir)
        self.flush_seconds = flush_seconds
        self._flushed = -float("inf")
        self._writer = None
        self._purge_step: int | None = None

    def _open(self):
        if self._writer is None:
            self._writer = _summary_writer_class()(self.logdir, purge_step=self._purge_step)
            self._purge_step = None
        return self._writer

    def rewind(self, step: int) -> None:
        """TensorBoard drops the events after ``step`` when the next file starts with a purge step."""
        self.close()
        self._purge_step = step + 1

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One event holding every scalar of the window, as TensorFlow's writers do.

        ``add_scalar`` would send one event per value through tensorboardX's multiprocessing queue:
        ~250 us each (a window of 5 scalars took 1.25 ms, at the tiny MLP's 80 windows a second).
        """
        writer = self._open()
        file_writer = getattr(writer, "_get_file_writer", None)
        if file_writer is None:  # a tensorboardX without it: one event per value
            for name, value in scalars.items():
                writer.add_scalar(name, float(value), global_step=int(step))
            return
        from tensorboardX.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=_tag(name), simple_value=float(value)) for name, value in scalars.items()]
        file_writer().add_summary(Summary(value=values), int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        writer = self._open()
        for name, image in images.items():
            writer.add_image(name, to_uint8(image), global_step=int(step), dataformats="HWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        writer = self._open()
        for name, text in texts.items():
            writer.add_text(name, text, global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The config as a text summary ``config`` (JSON): readable in the Text tab as written."""
        self._open().add_text("config", "```\n" + json.dumps(_plain(hparams), indent=2, sort_keys=True) + "\n```", 0)

    def flush(self) -> None:
        if self._writer is not None and time.monotonic() - self._flushed >= self.flush_seconds:
            self._writer.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_INVALID_TAG = re.compile(r"[^-/\w\.]")


@functools.lru_cache(maxsize=4096)
def _tag(name: str) -> str:
    """The tag tensorboardX's ``add_scalar`` would write for ``name`` (other characters become ``_``)."""
    return _INVALID_TAG.sub("_", name).lstrip("/")


def _summary_writer_class():
    """``tensorboardX.SummaryWriter``, imported without PyTorch.

    tensorboardX imports ``torch`` whenever it is installed (to accept its tensors), which costs
    about 190 MB of memory and seconds of start-up in a JAX program that never made a tensor; this
    writer passes numpy only, so torch is hidden during that import unless it was already loaded.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tensorboardX
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
