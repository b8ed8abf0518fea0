"""The worker side of the benchmark suite: a ``Pacer`` that a training loop calls after each step.

Every variant (hand loop, Trainer, Keras, Lightning) runs in its own worker process, so its peak
RSS and compile time are its own. The coordinator (``benchmarks/suite.py``) talks to each worker
over stdin / stdout, one JSON object per line, and asks them in turn to run a timed chunk of
steps: the variants are interleaved, so machine noise hits all alike.

Protocol (worker -> coordinator: JSON lines; coordinator -> worker: ``run`` or ``stop`` lines):

1. The worker builds its model and data and starts training; the loop calls
   ``pacer.step_done(n, sync)`` after every dispatched execution of ``n`` steps, ``sync`` being a
   function that blocks until those steps have finished on the device.
2. After the first execution the pacer syncs and sends ``{"event": "first", "steps": n, "seconds": s}``:
   the time from ``pacer.start()`` to the first finished execution of n steps (compilation included).
3. After ``warmup`` more steps it sends ``{"event": "ready", ...extra}`` and waits for a line.
4. ``run``: times the next ``chunk`` steps (synced at the end), sends
   ``{"event": "timed", "steps": n, "seconds": s}``, and waits again.
5. ``stop``: sends ``{"event": "done", "peak_rss_mb": m, "steps": n, ...pacer.final()}`` and exits.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Callable


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Pacer:
    """Counts steps for a worker's training loop and hands control to the coordinator between chunks."""

    def __init__(self, chunk: int, warmup: int, *, stdin=None, stdout=None, clock: Callable[[], float] = time.monotonic):
        self.chunk, self.warmup = int(chunk), int(warmup)
        self._in, self._out = stdin or sys.stdin, stdout or sys.stdout
        self.extra: dict[str, Any] = {}  # added to the "ready" message (e.g. flops per step)
        self.final: Callable[[], dict[str, Any]] | None = None  # its result is added to the "done" message
        self.count = 0
        self._phase = "start"
        self._target = 0
        self._started = self._t0 = 0.0
        self._clock = clock  # for running_clock; injectable for tests
        self._waited = 0.0  # seconds spent waiting for the coordinator while other variants ran

    def start(self) -> None:
        """Call just before the training loop's first step (after building model and data)."""
        self._started = time.perf_counter()

    def send(self, message: dict[str, Any]) -> None:
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()

    def step_done(self, n: int = 1, sync: Callable[[], Any] | None = None) -> None:
        """Records ``n`` finished dispatches; may block (sync, report, wait for the coordinator)."""
        self.count += n
        if self._phase == "start":
            if sync:
                sync()
            self.send({"event": "first", "steps": self.count, "seconds": time.perf_counter() - self._started})
            self._phase, self._target = "warmup", self.count + self.warmup
        if self._phase == "warmup" and self.count >= self._target:
            if sync:
                sync()
            self.send({"event": "ready", **self.extra})
            self._wait()
        elif self._phase == "timed" and self.count >= self._target:
            if sync:
                sync()
            self.send({"event": "timed", "steps": self.count - self._timed_from,
                       "seconds": time.perf_counter() - self._t0})
            self._wait()

    def running_clock(self) -> float:
        """``time.monotonic()`` less the time this worker was paused for the other variants.

        A time-based interval (``Checkpoint(min_interval_seconds=30)``) measured with it fires as
        often per step as in an uninterrupted run; on the wall clock every resumed chunk would find
        it due, since the other variants' chunks count as elapsed.
        """
        return self._clock() - self._waited

    def _wait(self) -> None:
        paused = self._clock()
        line = self._in.readline().strip()
        self._waited += self._clock() - paused
        if line == "run":
            self._phase, self._timed_from = "timed", self.count
            self._target = self.count + self.chunk
            self._t0 = time.perf_counter()
            return
        final = self.final() if self.final else {}
        self.send({"event": "done", "peak_rss_mb": peak_rss_mb(), "steps": self.count, **final})
        self._out.flush()
        os._exit(0)  # leave any framework's fit loop at once; nothing of the run is kept

