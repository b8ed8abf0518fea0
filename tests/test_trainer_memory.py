"""The compiler's freed memory goes back to the OS after each step function compiles (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

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
    assert len({key[0] if isinstance(key, tuple) else key for key in fitted._compiled}) == 2  # fused, single
    assert len(calls) == 2  # once after each compilation, not once a step


def test_a_run_that_saves_nothing_does_not_import_orbax(tmp_path):
    # orbax.checkpoint is ~26 MiB of resident memory; only checkpointing and export need it.
    script = f"""
import sys
import numpy as np, optax
from flax import nnx
sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import TinyMLP, make_data
from recipes.common import standard_callbacks
from trainer import ArrayLoader, Trainer
trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), max_epochs=1,
                  callbacks=standard_callbacks({str(tmp_path)!r}, log_every=2, progress=False))
trainer.fit(ArrayLoader(make_data(), batch_size=32))
print("after fit", "orbax.checkpoint" in sys.modules)
trainer.save_model({str(tmp_path / "export")!r})
print("after export", "orbax.checkpoint" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after fit False" in out.stdout and "after export True" in out.stdout, out.stdout


def test_the_guard_and_the_metric_accumulators_start_without_compiling_anything():
    # Each eager jnp call compiles a program of its own (~1 MiB resident apiece on XLA:CPU), so the
    # zeros the run starts from are made on the host; a fresh process, as no program is cached there.
    script = """
import logging, jax
jax.config.update("jax_log_compiles", True)
records = []
handler = logging.Handler(); handler.emit = records.append
for name in ("jax._src.dispatch", "jax._src.interpreters.pxla"):
    logging.getLogger(name).addHandler(handler)
from trainer.step import init_guard
from trainer.sums import empty_sums
guard = init_guard()
sums = empty_sums({"loss": (), "accuracy": (), "nonfinite_total": (), "_valid": ()}, {})
compiled = [r.getMessage()[:80] for r in records if r.getMessage().startswith(("Compiling", "Finished XLA compilation"))]
print("guard", {k: v.item() for k, v in guard.items()})
print("sums", sorted((k, type(m).__name__, float(m.total), int(m.count)) for k, m in sums.items()))
print("compiled", len(compiled), compiled)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["compiled"].startswith("0 "), lines["compiled"]
    assert "'halted': False" in lines["guard"] and "'halt_step': -1" in lines["guard"]
    assert lines["sums"] == str([("accuracy", "Average", 0.0, 0), ("loss", "Average", 0.0, 0),
                                 ("nonfinite_total", "LastValue", 0.0, 0)])
