"""Several processes (``jax.distributed``): training runs on every process's devices, but the Trainer is not yet
process-aware. What that leaves is said once per process, and the two settings that hang or crash processes
(the prefetch thread, checkpoint writes on a worker thread: each issues collectives out of the loop's order)
are made safe."""

from __future__ import annotations

from typing import Any

import jax

from trainer.user_warnings import warn

_warned = False


def several() -> bool:
    """Whether this process is one of several (``jax.distributed``)."""
    return jax.process_count() > 1


def prefetch_for_processes(prefetch: Any) -> Any:
    """``prefetch`` as several processes can run it: ``"auto"`` becomes 0 (the loop's thread), a thread is refused."""
    if not several():
        return prefetch
    if prefetch not in ("auto", 0):
        raise ValueError(f"prefetch={prefetch!r} with {jax.process_count()} processes: a prefetch thread places "
                         "batches while the step runs, and the processes then meet their collectives in different "
                         "orders and hang. Use prefetch=0 (or 'auto', which is 0 here).")
    _warn_once()
    return 0


def _warn_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warn(f"this is process {jax.process_index()} of {jax.process_count()} (jax.distributed): training runs on every "
         "process's devices, but the Trainer is not yet process-aware. Every process writes the logs, the progress bar "
         "and its own files (give loggers to process 0 only: callbacks=[...] if jax.process_index() == 0); "
         "predict, and evaluation of data each process holds a part of, are not supported; checkpoints are written "
         "on the loop (not in the background) and the prefetch thread is off, as both hang across processes.",
         stacklevel=4)
