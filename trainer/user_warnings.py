"""Warnings pointed at the user's own line: the first frame outside this library's packages (``trainer``,
``callbacks``, ``recipes``), whatever the depth of the call between (a decorator, a callback's dispatch, the
loop). A warning from a thread of ours (prefetch), where no such frame is, keeps the given ``stacklevel``."""

from __future__ import annotations

import os
import sys
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGES = tuple(os.path.join(_ROOT, name) + os.sep for name in ("trainer", "callbacks", "recipes"))


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn`` at the user's frame that called into the library (``stacklevel`` where none is)."""
    frame, depth = sys._getframe(1), 0
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGES):
        frame, depth = frame.f_back, depth + 1
    ours = frame is None or frame.f_globals.get("__name__") == "threading"  # a thread of ours started it
    warnings.warn(message, category, stacklevel=stacklevel + 1 if ours else 2 + depth)
