"""``SerialWorker``: runs jobs off the caller's thread, one at a time and in order, errors raised back.

A checkpoint's write (checksums, orbax's save) runs here so that the train loop is not held up by it:
on a GPU orbax's share of a save held the loop ~52 ms. (Its Python work then still took the GIL
from the loop; ``checkpoint_store.pack_small`` cut that.) A job's exception is raised on the
caller's thread at the next ``submit`` or ``drain``, never lost.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Callable


class SerialWorker:
    """Each job runs on a thread of its own, started once the previous job has finished.

    So at most one job (and what it holds: a checkpoint's host arrays) is pending, and no thread
    outlives its job: a store that saved once leaves no idle thread behind. The thread is not a
    daemon: a write under way finishes before the interpreter exits. A failure nobody waited for
    (the worker dropped, or the interpreter exiting) is printed to stderr rather than lost.
    """

    def __init__(self, name: str):
        self.name = name
        self._thread: threading.Thread | None = None
        self._failure: dict[str, BaseException | None] = {"error": None}  # shared with the finalizer
        weakref.finalize(self, _report_unraised, name, self._failure)

    def submit(self, job: Callable[[], None]) -> None:
        """Waits for the previous job (raising its failure), then starts ``job``."""
        self.drain()
        failure = self._failure  # not self: the error's traceback would keep this worker alive

        def run() -> None:
            try:
                job()
            except BaseException as error:  # handed to the caller's thread by drain()
                failure["error"] = error

        self._thread = threading.Thread(target=run, name=self.name)
        self._thread.start()

    def drain(self) -> None:
        """Waits for the job under way, if any; raises its exception if it failed (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._failure["error"] = self._failure["error"], None
        if error is not None:
            raise error

    @property
    def busy(self) -> bool:
        """Whether a job is still running."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Finishes the job under way (raising its failure)."""
        self.drain()


def _report_unraised(name: str, failure: dict) -> None:
    if failure["error"] is not None:
        print(f"{name}: a background job failed and nothing waited for it: {failure['error']!r}",
              file=sys.stderr, flush=True)
