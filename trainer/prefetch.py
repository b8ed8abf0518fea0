"""``Prefetcher``: a background thread keeps the next items already placed on the device(s).

The host iterator (numpy batches, or stacked chunks) runs in the thread, and ``place`` (by
default ``jax.device_put``) starts each item's transfer there, so the compiled step never waits
for data that could have been ready. ``depth`` items are kept ahead. An exception in the
iterator is re-raised in the consuming thread, the original object with its traceback; ``close``
(also on leaving a ``with`` block) stops and joins the thread even in the middle of an epoch.

Example::

    with Prefetcher(iter(batches), depth=2) as ahead:
        for batch in ahead:        # already on the device
            state = step(state, batch)
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import jax

_END = object()
CLOSE_TIMEOUT_SECONDS = 10.0  # how long close() waits for a source stuck in next()
SIGNAL_CHECK_SECONDS = 0.1  # how often the loop, waiting for a batch, lets Python run signal handlers


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterates ``source`` in a daemon thread, ``depth`` placed items ahead of the consumer.

    ``wait_seconds`` adds up the time the consumer spent blocked waiting for the next item.
    """

    def __init__(self, source: Iterator[Any], depth: int = 2, place: Callable[[Any], Any] = jax.device_put,
                 start: bool = True):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth={depth!r} must be a positive integer (0 turns prefetch off in Trainer).")
        self._source, self._place = source, place
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._produce, name="nnx-trainer-prefetch", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Starts the thread (``start=False``: the owner keeps the object first, so that an interrupt
        arriving as the thread starts still finds it to close)."""
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:
                if self._stop.is_set() or not self._offer(self._place(item)):
                    return  # closed: what the source still gave is dropped, not placed
        except BaseException as error:  # handed to the consumer, never lost in the thread
            self._offer(_Failure(error))
            return
        self._offer(_END)

    def _offer(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> Any:
        started = time.perf_counter()
        while True:
            try:  # a timed wait: a signal another thread received (SIGTERM, a second Ctrl-C) is handled
                item = self._queue.get(timeout=SIGNAL_CHECK_SECONDS)  # within this, an untimed one not at all
                break
            except queue.Empty:
                continue
        self.wait_seconds += time.perf_counter() - started
        if item is _END:
            self._queue.put(_END)  # later calls keep saying "exhausted"
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)
            raise item.error
        return item

    def close(self, wait: bool = True) -> None:
        """Stops the thread (it may be blocked on a full queue or inside the source) and joins it.

        A source that does not return within ``CLOSE_TIMEOUT_SECONDS`` (a queue whose producer died)
        is warned about and its thread left behind (a daemon, it ends once the source returns), so a
        stop or an error never hangs on it. ``wait=False`` (stopping at once: a second signal, Ctrl-C)
        leaves it behind without waiting.
        """
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if not wait:
            return
        self._thread.join(CLOSE_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            warnings.warn(f"the prefetch thread is still inside the data source's next() after "
                          f"{CLOSE_TIMEOUT_SECONDS:g} s; it is left to end when the source returns (that batch "
                          "is dropped). Iterating the same iterator again before then fails or loses that item.",
                          RuntimeWarning, stacklevel=2)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class BusyClock:
    """Seconds the calling thread has run *or waited to run*: Linux's schedstat (CPU time plus
    run-queue wait), elsewhere its CPU time. Wall time minus this is time spent blocked (a disk, a
    sleep, a lock), not time lost to other busy processes. Bound to the thread that first calls it."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._opened = False

    def __call__(self) -> float:
        if not self._opened:
            self._opened = True
            try:
                self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            except OSError:
                self._fd = None
        if self._fd is not None:
            run, wait = os.pread(self._fd, 128, 0).split()[:2]
            return (int(run) + int(wait)) * 1e-9
        return time.thread_time()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Feed:
    """The loop's source of executions: in its own thread, in a ``Prefetcher``, or ``"auto"``.

    ``depth=0`` pulls in the loop's thread (asynchronous dispatch already overlaps that with the
    device's work, and no thread competes for the GIL); ``depth=N`` starts a ``Prefetcher`` at the first ``next``;
    ``"auto"`` pulls in the loop's thread for ``probe`` executions and ``probe_seconds`` after the
    first (which compiles; the time matters: asynchronous dispatch lets the host race through the
    first executions in a few milliseconds, where one scheduler hiccup looks like a slow disk) and
    moves to a ``Prefetcher`` of depth 2 when the loop spent more than ``threshold`` of that
    time *blocked* waiting for data (wall time minus this thread's running and run-queue time,
    ``BusyClock``: a disk, a sleep, another process's pipe; not other processes using the cores):
    a thread overlaps that with the dispatching. Loading that keeps this thread busy
    (Python, numpy on in-memory arrays) stays inline: a second thread only contends for the GIL
    (measured on 2 cores: the MLP at 0.51x K=1 and 0.94x K=10 with a thread). ``depth_in_use``
    says which it chose.
    """

    def __init__(self, source: Iterator[Any], depth: int | str, place: Callable[[Any], Any],
                 probe: int = 8, threshold: float = 0.3, clock: Callable[[], float] = time.perf_counter,
                 probe_seconds: float = 0.25,
                 place_inline: bool = False, cpu_clock: Callable[[], float] | None = None,
                 measured: dict[str, float] | None = None):
        self._source, self._place = source, place
        self._thread: Prefetcher | None = None  # started by the first ``next``: inside the loop's ``with``
        self._depth = depth if isinstance(depth, int) and depth > 0 else 0
        self.depth_in_use: int | None = None if depth == "auto" else depth
        self._probe, self._threshold, self._probe_seconds = probe, threshold, probe_seconds
        self._pulled, self._waited, self._since = 0, 0.0, 0.0
        self._clock, self._cpu_clock = clock, cpu_clock if cpu_clock is not None else BusyClock()
        self._place_inline = place_inline  # in the loop's thread, jit's own transfer is cheaper than device_put
        self.measured_share: float | None = None  # "auto": the share of time the loop sat blocked on the data
        # "auto": what earlier epochs measured (pulls, seconds blocked, seconds), added to by ``close``: an
        # epoch shorter than the probe goes on measuring in the next, not from nothing in each
        self._measured = measured if measured is not None else {}

    def __iter__(self) -> "Feed":
        return self

    def __next__(self) -> Any:
        if self._thread is None and self._depth:
            self._start_thread(self._depth)
        if self._thread is not None:
            return next(self._thread)
        if self.depth_in_use is not None:  # decided (or not "auto"): nothing to measure
            item = next(self._source)
            return self._place(item) if self._place_inline else item
        started, cpu_started = self._clock(), self._cpu_clock()  # "auto", still measuring
        item = next(self._source)
        self._pulled += 1
        if self._pulled == 2:
            self._since, self._waited = started, 0.0
        self._waited += max(0.0, (self._clock() - started) - (self._cpu_clock() - cpu_started))
        pulled, waited, elapsed = self._totals()
        if pulled >= self._probe + 2 and elapsed >= self._probe_seconds:
            share = self.measured_share = waited / max(elapsed, 1e-9)
            self.depth_in_use = 2 if share > self._threshold else 0
            if self.depth_in_use:
                self._start_thread(self.depth_in_use)
        return self._place(item) if self._place_inline else item

    def _totals(self) -> tuple[int, float, float]:
        """Pulls, seconds blocked on the data and seconds measured, this epoch's (from its second pull: the
        first compiles or follows the epoch's start) with the earlier epochs'."""
        elapsed = self._clock() - self._since if self._pulled >= 2 else 0.0
        waited = self._waited if self._pulled >= 2 else 0.0
        m = self._measured
        return m.get("pulled", 0) + self._pulled, m.get("waited", 0.0) + waited, m.get("elapsed", 0.0) + elapsed

    def _start_thread(self, depth: int) -> None:
        self._thread = Prefetcher(self._source, depth, self._place, start=False)
        self._thread.start()

    def close(self, wait: bool = True) -> None:
        """Stops the prefetch thread, if any (``Prefetcher.close``); "auto" still measuring keeps its tally."""
        if self.depth_in_use is None and self._pulled:
            pulled, waited, elapsed = self._totals()
            self._measured.update(pulled=pulled, waited=waited, elapsed=elapsed)
        if self._thread is not None:
            self._thread.close(wait)
        if isinstance(self._cpu_clock, BusyClock):
            self._cpu_clock.close()
