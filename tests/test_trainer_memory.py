"""The compiler's freed memory goes back to the OS after each step function compiles (glibc)."""

from __future__ import annotations

import sys
import threading

import numpy as np
import optax
import pytest
from flax import nnx

import trainer.loop
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, Trainer
from trainer.memory import _malloc_trim, release_freed_memory


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc only")
def test_freed_heap_pages_of_another_thread_go_back_to_the_os():
    kept = []

    def allocate_and_free():  # as the compiler's threads do: many small blocks, then freed
        blocks = [np.ones(4096) for _ in range(2000)]  # 32 KiB each: heap, not separate mmaps
        kept.append(blocks[-1])  # the newest stays in use, so glibc cannot shrink the heap's top
        del blocks

    worker = threading.Thread(target=allocate_and_free)
    worker.start()
    worker.join()
    before = resident_mib()
    assert release_freed_memory()
    assert before - resident_mib() > 40  # ~62 MiB were freed but still resident


def test_fit_releases_once_per_compiled_step_function(monkeypatch):
    calls = []
    monkeypatch.setattr(trainer.loop, "release_freed_memory", lambda: calls.append(1))
    model = TinyMLP(rngs=nnx.Rngs(0))
    fitted = Trainer(model, optax.adam(1e-2), max_steps=20, steps_per_execution=3)
    fitted.fit(ArrayLoader(make_data(n=96), 16, seed=1))  # 6 chunks of 3, then 2 single steps
    assert fitted.step == 20
    assert len(fitted._compiled) == 2  # the fused and the single step
    assert len(calls) == 2  # once after each compilation, not once a step
