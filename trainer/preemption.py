"""Preemption: SIGTERM / SIGINT only set a flag; the trainer saves at the next step boundary.

A handler that does real work inside a signal is fragile (it can interrupt a save); this one
records the first signal and ignores repeats, so a second signal during the final save cannot
leave a half-written newest checkpoint. The trainer checks ``signal`` after every step and
inside evaluation, saves synchronously, and exits with 128 + the signal number (143, 130).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised inside evaluation to leave it when a preemption signal arrived."""


class PreemptionHandler:
    """Installs flag-only handlers for SIGTERM and SIGINT while active (main thread only)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum

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
