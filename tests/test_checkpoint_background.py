"""Checkpoint writes run on a worker thread: the loop goes on, a failed write is raised, the meta is a snapshot."""

from __future__ import annotations

import threading

import optax
import pytest
from flax import nnx

from callbacks import Callback, Checkpoint
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, Trainer
from trainer.background import SerialWorker
from trainer.checkpoint_store import CheckpointStore


def test_serial_worker_runs_jobs_in_order_one_at_a_time_and_leaves_no_thread():
    worker, gate, ran = SerialWorker("test-writer"), threading.Event(), []
    worker.submit(lambda: (gate.wait(30), ran.append(1)))
    second = threading.Thread(target=worker.submit, args=(lambda: ran.append(2),))
    second.start()
    second.join(0.2)
    assert second.is_alive() and worker.busy  # the second submit waits for the first job
    gate.set()
    second.join(30)
    worker.drain()
    assert ran == [1, 2]
    assert not worker.busy and not [t for t in threading.enumerate() if t.name == "test-writer"]


def test_serial_worker_raises_a_failed_job_on_the_callers_thread_once():
    worker = SerialWorker("test-writer")
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.submit(lambda: None)  # waits for the failed job, then reports it
    worker.submit(lambda: None)
    worker.drain()  # reported once, not again
    worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        worker.close()


def held_writes(monkeypatch, gate: threading.Event, log: list):
    """Makes every checkpoint write wait for ``gate`` (logging its start and end)."""
    write = CheckpointStore._write

    def held(self, step, *args):
        log.append(("start", step))
        assert gate.wait(30), "the write was never released"
        write(self, step, *args)
        log.append(("done", step))

    monkeypatch.setattr(CheckpointStore, "_write", held)


def make(workdir, max_steps, every, *extra):
    return Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=max_steps, workdir=workdir,
                   callbacks=[Checkpoint(every_n_steps=every, every_n_epochs=None), *extra])


def test_training_goes_on_while_a_save_is_written_and_fit_ends_after_the_commit(tmp_path, monkeypatch):
    gate, log, seen = threading.Event(), [], []

    class Release(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 5:  # the save after step 4 is queued, held: the loop ran on to step 5 anyway
                seen.append(list(log))
                gate.set()

    held_writes(monkeypatch, gate, log)
    trainer = make(tmp_path, 6, 4, Release())
    trainer.fit(ArrayLoader(make_data(), 16, seed=0))
    assert ("done", 4) not in seen[0]
    assert log[-1] == ("done", 6)  # the final save, committed before fit returned
    store = trainer.checkpoints[0].store
    assert store.steps() == [6, 4]
    step, meta, _ = store.restore_newest(step=4)  # verifies every checksum computed in the background
    assert step == 4 and all(isinstance(d["crc32"], int) for d in meta["leaves"])


def test_the_meta_written_is_what_the_trainer_held_when_it_saved(tmp_path, monkeypatch):
    gate, log = threading.Event(), []

    class Release(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 7:  # the epoch ended (history grew) after the save at step 6 was queued
                assert len(trainer.history) == 1
                gate.set()

    held_writes(monkeypatch, gate, log)
    trainer = make(tmp_path, 8, 6, Release())
    trainer.fit(ArrayLoader(make_data(), 16, seed=0))  # 6 batches an epoch
    meta = trainer.checkpoints[0].store.read_meta(6)
    assert (meta["step"], meta["history"]) == (6, [])


def test_a_write_that_keeps_failing_is_raised_by_fit(tmp_path, monkeypatch):
    def broken(self, step, *args):
        raise OSError(f"disk full while writing step {step}")

    monkeypatch.setattr(CheckpointStore, "_write", broken)
    trainer = make(tmp_path, 6, 2)
    with pytest.raises(OSError, match="disk full while writing step 4") as raised:
        trainer.fit(ArrayLoader(make_data(), 16, seed=0))
    assert "step 2" in str(raised.value.__context__)  # the first failure, chained
    assert trainer.step == 4  # raised by the next save, not only at the end


def first_write_fails(monkeypatch) -> list:
    """Makes the first checkpoint write raise; returns the list its step lands in."""
    write, failures = CheckpointStore._write, []

    def fails_once(self, step, *args):
        if not failures:
            failures.append(step)
            raise OSError(f"transient failure at step {step}")
        write(self, step, *args)

    monkeypatch.setattr(CheckpointStore, "_write", fails_once)
    return failures


def test_after_one_failed_write_the_next_save_is_written_and_the_failure_warned(tmp_path, monkeypatch):
    first_write_fails(monkeypatch)
    trainer = make(tmp_path, 6, 2)
    with pytest.warns(RuntimeWarning, match="transient failure at step 2.*step 4 was written since"):
        trainer.fit(ArrayLoader(make_data(), 16, seed=0))
    store = trainer.checkpoints[0].store
    assert store.steps() == [6, 4] and store.restore_newest()[0] == 6


def test_a_preemption_save_lands_after_a_failed_write(tmp_path, monkeypatch):
    trainer = make(tmp_path, 2, 10**6)
    trainer.fit(ArrayLoader(make_data(), 16, seed=0))  # a good checkpoint at step 2
    checkpoint, failures = trainer.checkpoints[0], first_write_fails(monkeypatch)
    trainer.step = 3
    assert checkpoint.save(trainer)  # a periodic save: its write fails in the background, unreported
    trainer.step = 4
    with pytest.warns(RuntimeWarning, match="transient failure at step 3.*step 4 was written since"):
        assert checkpoint.save(trainer, wait=True)  # what save_and_exit calls on a preemption
    assert failures == [3] and checkpoint.store.restore_newest()[0] == 4


def test_the_dict_on_checkpoint_save_gets_is_not_changed_by_the_write(tmp_path):
    seen = []

    class Keep(Callback):
        def on_checkpoint_save(self, trainer, checkpoint):
            seen.append(checkpoint)

    trainer = make(tmp_path, 4, 2, Keep())
    trainer.fit(ArrayLoader(make_data(), 16, seed=0))  # every write has finished by now
    assert len(seen) == 2
    assert all(d["crc32"] is None and "packed" not in d for meta in seen for d in meta["leaves"])
    assert trainer.checkpoints[0].store.read_meta(4)["leaves"][0]["crc32"] is not None


def test_a_failed_write_does_not_hide_the_error_that_stopped_fit(tmp_path, monkeypatch):
    gate = threading.Event()

    def broken(self, step, *args):
        gate.wait(30)
        raise OSError("disk full")

    class Crash(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 3:  # the save of step 2 is still being written, and will fail
                gate.set()
                raise KeyError("the user's callback failed")

    monkeypatch.setattr(CheckpointStore, "_write", broken)
    with pytest.warns(RuntimeWarning, match="checkpoint write failed as well.*disk full"):
        with pytest.raises(KeyError, match="the user's callback failed"):
            make(tmp_path, 6, 2, Crash()).fit(ArrayLoader(make_data(), 16, seed=0))


def test_a_failure_nothing_waited_for_is_printed_not_lost(capsys):
    import gc

    worker = SerialWorker("test-writer")
    worker.submit(lambda: 1 / 0)
    worker._thread.join()  # finished, its failure not yet handed over
    del worker
    gc.collect()
    assert "test-writer: a background job failed and nothing waited for it: ZeroDivisionError" in capsys.readouterr().err


def test_two_checkpoint_callbacks_save_side_by_side(tmp_path):
    """Lightning's best + last: two stores' asynchronous orbax saves under way together failed
    (FileExistsError / FileNotFoundError in orbax's temporary folders) or hung for 300 s."""
    import os

    data = make_data(n=256)
    best = Checkpoint(tmp_path / "best", monitor="loss", max_to_keep=1)
    last = Checkpoint(tmp_path / "last", max_to_keep=2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=8, callbacks=[best, last])
    history = trainer.fit(ArrayLoader(data, 32))  # 8 steps an epoch: a save of each at every epoch's end
    assert sorted(os.listdir(tmp_path / "last")) == ["step_56", "step_64"]
    lowest = min(history, key=lambda row: row["loss"])["epoch"]
    assert sorted(os.listdir(tmp_path / "best")) == sorted({f"step_{8 * lowest + 8}", "step_64"})
    for folder in ("best", "last"):
        again = Trainer(TinyMLP(rngs=nnx.Rngs(1)), optax.adam(1e-2), max_epochs=8,
                        callbacks=[Checkpoint(tmp_path / folder, max_to_keep=2)])
        again.fit(ArrayLoader(data, 32), resume=True)
        assert again.step == 64


def test_a_store_whose_save_failed_does_not_fail_another_stores_saves(tmp_path):
    """The second store waits for the others' saves to finish: one that failed (a full disk) raised its
    error into every save of the other, which then never saved again."""
    import numpy as np

    from trainer.checkpoint_arrays import flatten

    broken, healthy = CheckpointStore(tmp_path / "broken"), CheckpointStore(tmp_path / "healthy")
    calls = []

    def failed():
        calls.append(1)
        raise OSError("No space left on device")

    broken.manager.wait_until_finished = failed
    arrays, leaves = flatten({"w": np.ones((4, 4), np.float32)}, checksums=False)
    for step in (1, 2):
        healthy.save(step, arrays, {"format": 1, "leaves": leaves})
        healthy.wait()
    assert healthy.steps() == [2, 1] and len(calls) == 1  # asked once, then left to report its own failure
