"""``SerialWorker``: one thread running jobs in the order they were handed over, errors raised back.

A checkpoint's write (checksums, orbax's save) runs here so that the train loop is not held up by it:
on a GPU orbax's share of a save held the loop ~52 ms. (Its Python work then still took the GIL
from the loop; ``checkpoint_store.pack_small`` cut that.) A job's exception is raised on the
caller's thread at the next ``submit`` or ``drain``, never lost.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable


class SerialWorker:
    """Runs submitted jobs one at a time on a worker thread, at most ``depth`` of them queued or running."""

    def __init__(self, name: str, depth: int = 1):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._depth = depth
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, job: Callable[[], None]) -> None:
        """Queues ``job``; first waits for older jobs while ``depth`` are pending (bounding what they hold)."""
        self._reap(keep=self._depth - 1)
        self._pending.append(self._pool.submit(job))

    def drain(self) -> None:
        """Waits for every submitted job; raises the first one's exception, if any failed."""
        self._reap(keep=0)

    @property
    def busy(self) -> bool:
        return any(not f.done() for f in self._pending)

    def _reap(self, keep: int) -> None:
        while sum(not f.done() for f in self._pending) > keep:  # the oldest first: jobs run in order
            concurrent.futures.wait([next(f for f in self._pending if not f.done())])
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if f not in done]
        errors = [f.exception() for f in done if f.exception() is not None]
        if errors:
            raise errors[0]  # a job's exception, re-raised on the caller's thread

    def close(self) -> None:
        """Finishes the queued jobs (raising a failure) and stops the thread."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)
