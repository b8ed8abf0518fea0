"""Preemption: SIGTERM / SIGINT only set a flag; the trainer saves at the next step boundary.

A handler that does real work inside a signal is fragile (it can interrupt a save); this one
records the first signal and says so on stderr. The trainer checks ``signal`` after every step,
inside evaluation and when the loop ends, saves synchronously, and exits with 128 + the signal
number (143, 130). A second signal stops at once, without the save, as a second Ctrl-C does in
Lightning (a run stuck in its data or a long compile would otherwise ignore every signal): saves
commit atomically, so one cut short leaves the newest committed checkpoint as it was. A repeat
within ``REPEAT_SECONDS`` of the first is taken for the same signal delivered twice (a launcher that
forwards it to a process that also got it as one of its group), so it cannot cut the save short.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_SECONDS = 1.0  # a repeat sooner than this after the first signal is the same one delivered twice


class Preempted(Exception):
    """Raised inside evaluation to leave it when a preemption signal arrived."""


class PreemptionHandler:
    """Installs flag-only handlers for SIGTERM and SIGINT while active (main thread only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.signal: int | None = None
        self.clock = clock
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self._first_at = signum, self.clock()
            _say(f"received {name}: saving a checkpoint at the next step boundary, then exiting (send it again to "
                 "stop at once, without saving)")
            return
        if self.clock() - self._first_at < REPEAT_SECONDS:
            return  # the same signal delivered twice, not a second request
        _say(f"received {name} again: stopping now, without saving (the newest committed checkpoint stands)")
        self.uninstall()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def install(self) -> None:
        self.signal = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


def _say(text: str) -> None:
    """One line on stderr from a signal handler: ``os.write``, as ``print`` may be inside a write already."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass
