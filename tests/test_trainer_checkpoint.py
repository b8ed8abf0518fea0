"""Checkpoints: exact resume, preemption, damage, mismatch, retention, what lands in the logs."""

from __future__ import annotations

import io
import json
import os
import signal
import warnings
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import (Callback, Checkpoint, CheckpointError, EarlyStopping, Evaluator, JsonlWriter, MetricsLogger,
                       NaNDetector, ProgressBar, read_jsonl)
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, Trainer

SCRIPT = Path(__file__).parent / "checkpoint_script.py"


def leaves_of(trainer):
    tree = (trainer.state.params, trainer.state.opt_state, trainer.state.model_state)
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


def bitwise_equal(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.should_stop = True


class TermInEvaluation(Callback):
    """SIGTERM while the evaluation of ``step`` runs (a preemption inside it)."""

    def __init__(self, step):
        self.step = step

    def on_eval_start(self, trainer):
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def make(workdir, max_steps, *extra, every=4):
    return Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=max_steps, workdir=workdir,
                   callbacks=[NaNDetector(), Checkpoint(every_n_steps=every, every_n_epochs=None), *extra])


def test_resume_mid_epoch_is_bitwise_identical_to_an_unbroken_run(tmp_path):
    data = make_data()  # 6 batches of 16 per epoch; the stop falls mid-epoch
    unbroken = make(tmp_path / "a", 20)
    unbroken.fit(ArrayLoader(data, 16, seed=2))
    first = make(tmp_path / "b", 20, StopAt(10))
    first.fit(ArrayLoader(data, 16, seed=2))
    assert first.step == 10 and sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step_10", "step_4", "step_8"]
    second = make(tmp_path / "b", 20)
    second.fit(ArrayLoader(data, 16, seed=2), resume=True)
    assert (second.step, second.epoch, second.position) == (20, 3, 2)
    assert bitwise_equal(leaves_of(second), leaves_of(unbroken))
    assert second.history == unbroken.history


def test_a_fresh_run_over_another_runs_checkpoints_is_refused_and_they_stay(tmp_path, data):
    make(tmp_path, 8).fit(ArrayLoader(data, 16, seed=2))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    with pytest.raises(CheckpointError, match=r"already holds checkpoints of an earlier run \(steps 8, 4\).*resume=True"):
        make(tmp_path, 12).fit(ArrayLoader(data, 16, seed=2))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()} == before
    again = make(tmp_path, 12)
    again.fit(ArrayLoader(data, 16, seed=2), resume=True)  # continuing it is what the message offers
    assert again.step == 12


def test_resume_true_on_an_empty_workdir_starts_fresh_and_says_so(tmp_path, data, capsys):
    trainer = make(tmp_path, 3)
    trainer.fit(ArrayLoader(data, 16), resume=True)
    assert trainer.step == 3
    assert f"resume=True: no checkpoints in {tmp_path / 'checkpoints'}; starting fresh" in capsys.readouterr().err


def test_resume_true_with_nowhere_to_look_is_refused_before_training(data):
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=3)  # no workdir, no Checkpoint
    with pytest.raises(ValueError, match=r"resume=True.*has neither \(workdir=None, no Checkpoint callback\)"):
        trainer.fit(ArrayLoader(data, 16), resume=True)
    assert trainer.step == 0


def test_resume_paths_a_workdir_an_empty_name_and_a_rewind_of_the_own_folder(tmp_path, data):
    make(tmp_path / "run", 12).fit(ArrayLoader(data, 16))  # steps 4, 8, 12
    from_workdir = make(tmp_path / "other", 12)
    from_workdir.fit(ArrayLoader(data, 16), resume=tmp_path / "run")  # the workdir: its checkpoints folder
    assert from_workdir.step == 12
    with pytest.raises(ValueError, match="resume='' names no folder"):
        make(tmp_path / "third", 12).fit(ArrayLoader(data, 16), resume="")
    branch = make(tmp_path / "branch", 8)  # branching from step 4 into another workdir: nothing replaced, no word
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        branch.fit(ArrayLoader(data, 16), resume=tmp_path / "run" / "checkpoints" / "step_4")
    assert branch.step == 8
    rewind = make(tmp_path / "run", 8)  # rewinding the run itself replaces steps 8 and 12: said
    with pytest.warns(RuntimeWarning, match=r"resuming from step 4 .* also holds the newer steps \[8, 12\]: this rewinds"):
        rewind.fit(ArrayLoader(data, 16), resume=tmp_path / "run" / "checkpoints" / "step_4")


def test_resuming_with_another_batch_size_is_refused(tmp_path, data):
    make(tmp_path, 5, every=5).fit(ArrayLoader(data, 16))
    with pytest.raises(ValueError, match="batch_size=16 but this loader has batch_size=32: its position counts"):
        make(tmp_path, 10, every=5).fit(ArrayLoader(data, 32), resume=True)


def test_explicit_missing_checkpoint_path_is_an_error(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make(tmp_path, 3).fit(ArrayLoader(data, 16), resume=tmp_path / "nowhere")


def test_resume_from_an_explicit_step_folder(tmp_path, data):
    make(tmp_path, 8).fit(ArrayLoader(data, 16))
    trainer = make(tmp_path / "other", 10)
    trainer.fit(ArrayLoader(data, 16), resume=tmp_path / "checkpoints" / "step_4")
    assert trainer.step == 10  # started from step 4



def bad_at(position: int, data: dict) -> ArrayLoader:
    """Batches of 8 in order, the one at ``position`` of every epoch with a NaN input."""
    x = data["x"].copy()
    x[position * 8] = np.nan
    return ArrayLoader({"x": x, "label": data["label"]}, 8, shuffle=False)

def flip_a_byte(step_dir: Path) -> None:
    """Damages the largest array file of a checkpoint step in place."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))


def test_damaged_newest_checkpoint_falls_back_with_one_warning(tmp_path, data):
    make(tmp_path, 8).fit(ArrayLoader(data, 16))  # saves 4 and 8
    flip_a_byte(tmp_path / "checkpoints" / "step_8")
    (tmp_path / "checkpoints" / "99").mkdir()  # foreign and empty folders are no checkpoints
    (tmp_path / "checkpoints" / "step_77").mkdir()
    (tmp_path / "checkpoints" / "step_12.orbax-checkpoint-tmp-123").mkdir()  # a killed save's leftover
    restored = []

    class Seen(Callback):
        def on_checkpoint_restore(self, trainer, checkpoint):
            restored.append(checkpoint["step"])

    trainer = make(tmp_path, 8, Seen())
    with pytest.warns(RuntimeWarning, match="step 8 in .* is damaged .*: moved to damaged_step_8") as caught:
        trainer.fit(ArrayLoader(data, 16), resume=True)
    assert restored == [4]
    assert len([w for w in caught if "is damaged" in str(w.message)]) == 1
    assert (tmp_path / "checkpoints" / "damaged_step_8" / "state").is_dir()  # kept for inspection
    assert not (tmp_path / "checkpoints" / "step_12.orbax-checkpoint-tmp-123").exists()
    assert trainer.step == 8  # and step 8 was saved again, replacing the damaged one
    again = make(tmp_path / "unused", 8)
    again.fit(ArrayLoader(data, 16), resume=tmp_path / "checkpoints" / "step_8")
    assert again.step == 8




def test_load_model_reads_a_runs_checkpoints_and_changes_nothing_there(tmp_path, data):
    """load_model opened the store as a run does: it removed another process's save under way (that run then
    failed) and renamed a damaged checkpoint."""
    from trainer import load_model

    trainer = make(tmp_path, 8)
    trainer.fit(ArrayLoader(data, 16))  # saves 4 and 8
    kept = jax.tree.map(np.array, trainer.state.params)
    trainer.max_steps = 12
    trainer.fit(ArrayLoader(data, 16))  # and 12
    flip_a_byte(tmp_path / "checkpoints" / "step_12")
    in_flight = tmp_path / "checkpoints" / "step_16.orbax-checkpoint-tmp-123"  # another process's save
    in_flight.mkdir()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.warns(RuntimeWarning, match="step 12 .* is damaged") as caught:
        loaded = load_model(tmp_path, TinyMLP(dropout=0.3, rngs=nnx.Rngs(5)))
    assert {w.filename for w in caught if "damaged" in str(w.message)} == {__file__}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    assert bitwise_equal([np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded, nnx.Param))],
                         [np.asarray(x) for x in jax.tree.leaves(kept)])


def test_a_damaged_checkpoint_in_a_folder_that_cannot_be_renamed_is_skipped_in_place(tmp_path, data, monkeypatch):
    """A read-only checkpoints folder (one to fine-tune from): setting the damaged step aside failed and
    took the resume down with it; it is skipped where it is, and the older step restored."""
    make(tmp_path, 8).fit(ArrayLoader(data, 16))  # saves 4 and 8
    flip_a_byte(tmp_path / "checkpoints" / "step_8")

    def read_only(self, target):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Path, "rename", read_only)
    trainer = make(tmp_path / "fine_tune", 6)
    with pytest.warns(RuntimeWarning, match=r"step 8 .* is damaged .* could not be moved aside \(Read-only file system\)"):
        trainer.fit(ArrayLoader(data, 16), resume=tmp_path / "checkpoints")
    assert trainer.step == 6 and (tmp_path / "checkpoints" / "step_8").is_dir()

def test_the_closed_event_loop_noise_after_a_damaged_read_is_dropped_and_nothing_else(monkeypatch):
    """tensorstore answers the reads of a failed restore through orbax's closed event loop: each answer
    printed an unraisable traceback ('Event loop is closed', four for the CNN); only those are dropped."""
    import types

    from trainer.checkpoint_store import _quiet_closed_loop_noise

    passed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda args: passed.append(args.exc_value))
    _quiet_closed_loop_noise()
    _quiet_closed_loop_noise()  # once: not a chain of filters
    noise, other = RuntimeError("Event loop is closed"), RuntimeError("something else")
    for error in (noise, other, ValueError("Event loop is closed")):
        sys.unraisablehook(types.SimpleNamespace(exc_value=error, exc_type=type(error), object=None))
    assert [str(e) for e in passed] == ["something else", "Event loop is closed"] and passed[0] is other

def test_nothing_valid_left_is_a_clear_error(tmp_path, data):
    make(tmp_path, 4, every=4).fit(ArrayLoader(data, 16))
    flip_a_byte(tmp_path / "checkpoints" / "step_4")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="no usable checkpoint remains.*"
                                                                         "moved to damaged_step_4"):
        make(tmp_path, 8).fit(ArrayLoader(data, 16), resume=True)
    with pytest.raises(CheckpointError, match="no usable checkpoint remains"):  # not a fresh start either
        make(tmp_path, 8).fit(ArrayLoader(data, 16), resume=True)


def test_a_damaged_checkpoint_set_aside_is_not_kept_in_place_of_good_ones(tmp_path, data):
    """Resumed past a damaged newest step, retention counts only good checkpoints: the damaged step 8
    no longer holds one of the two places while the good step 4 is pruned."""
    def run(max_steps, every):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=max_steps, workdir=tmp_path,
                callbacks=[Checkpoint(every_n_steps=every, every_n_epochs=None, max_to_keep=2)]
                ).fit(ArrayLoader(data, 16), resume=True)

    run(8, 4)  # saves 4 and 8
    flip_a_byte(tmp_path / "checkpoints" / "step_8")
    with pytest.warns(RuntimeWarning, match="step 8 .* is damaged"):
        run(9, 9)  # from 4: saves 9
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["damaged_step_8", "step_4", "step_9"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damaged step is tried no more
        run(10, 10)


def test_restoring_into_a_different_model_names_step_path_and_shapes(tmp_path, data):
    make(tmp_path, 4).fit(ArrayLoader(data, 16))
    other = Trainer(TinyMLP(hidden=32, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=8, workdir=tmp_path,
                    callbacks=[NaNDetector(), Checkpoint(every_n_steps=4)])
    with pytest.raises(CheckpointError, match=r"step 4 does not fit .* at \.params\['l1'\]\['bias'\]\.value: "
                                              r"stored float32\[16\], expected float32\[32\]"):
        other.fit(ArrayLoader(data, 16), resume=True)



def test_an_iterator_whose_state_is_not_arrayloaders_is_checkpointed_without_it(tmp_path, data):
    """grain's iterators answer get_state() with bytes: a save crashed on them ('bytes' object is not a
    mapping). Only ArrayLoader's state is kept (and restored); a resume of other data starts a fresh pass."""
    class GrainLike:
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            outer = self

            class Iterator:
                position = 0

                def __next__(self):
                    if self.position == len(outer.batches):
                        raise StopIteration
                    self.position += 1
                    return outer.batches[self.position - 1]

                def get_state(self):
                    return json.dumps({"position": self.position}).encode()

            return Iterator()

    batches = list(ArrayLoader(data, 16, shuffle=False))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=3, workdir=tmp_path,
                      callbacks=[Checkpoint(every_n_steps=2, every_n_epochs=None)])
    trainer.fit(GrainLike(batches))
    assert trainer.checkpoints[0].open(trainer).read_meta(2)["data_state"] is None

def test_a_callback_state_with_arrays_comes_back_as_lists(tmp_path, data):
    import jax.numpy as jnp

    class Counts(Callback):
        def __init__(self):
            self.loaded = None

        def state_dict(self):
            return {"device": jnp.arange(3.0), "host": np.array([[1, 2]]), "pair": (4, 5), "scalar": np.float32(0.5)}

        def load_state_dict(self, state):
            self.loaded = state

    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=4, workdir=tmp_path,
            callbacks=[Counts(), Checkpoint(every_n_steps=4)]).fit(ArrayLoader(data, 16))
    again = Counts()
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=4, workdir=tmp_path,
            callbacks=[again, Checkpoint(every_n_steps=4)]).fit(ArrayLoader(data, 16), resume=True)
    assert again.loaded == {"device": [0.0, 1.0, 2.0], "host": [[1, 2]], "pair": [4, 5], "scalar": 0.5}


def test_restoring_with_another_optimizer_is_refused(tmp_path, data):
    make(tmp_path, 4).fit(ArrayLoader(data, 16))
    other = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, workdir=tmp_path,
                    callbacks=[NaNDetector(), Checkpoint(every_n_steps=4)])
    with pytest.raises(CheckpointError, match=r"does not fit the current model and optimizer: it has "
                                              r"\['\.opt_state.*which the current model and optimizer lacks\."):
        other.fit(ArrayLoader(data, 16), resume=True)


def test_config_difference_warns_naming_it(tmp_path, data):
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=4, workdir=tmp_path, config={"lr": 0.01},
            callbacks=[Checkpoint(every_n_steps=4)]).fit(ArrayLoader(data, 16))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=6, workdir=tmp_path, config={"lr": 0.02},
                      callbacks=[Checkpoint(every_n_steps=4)])
    with pytest.warns(RuntimeWarning, match=r"different config: lr: saved 0.01, now 0.02"):
        trainer.fit(ArrayLoader(data, 16), resume=True)



def test_resuming_under_another_optimizer_with_the_same_arrays_warns(tmp_path, data):
    """Adam's state has AdamW's arrays (the weight decay keeps none): restored silently before."""
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=4, workdir=tmp_path,
            callbacks=[Checkpoint(every_n_steps=4)]).fit(ArrayLoader(data, 16))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=6, workdir=tmp_path,
                      callbacks=[Checkpoint(every_n_steps=4)])
    with pytest.warns(RuntimeWarning, match=r"different optimizer: state: saved '\(ScaleByAdamState, EmptyState\)', "
                                            r"now '\(ScaleByAdamState, EmptyState, EmptyState\)'"):
        trainer.fit(ArrayLoader(data, 16), resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same optimizer: nothing to say
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=8, workdir=tmp_path,
                callbacks=[Checkpoint(every_n_steps=4)]).fit(ArrayLoader(data, 16), resume=True)

def test_callback_states_and_logs_continue_without_duplicates(tmp_path, data):
    def build(max_steps, *extra):
        logger = MetricsLogger([JsonlWriter(tmp_path / "metrics.jsonl")], log_every=2)
        stopper = EarlyStopping(monitor="loss", patience=50)
        return make(tmp_path, max_steps, logger, stopper, *extra, every=4), stopper

    first, stopper = build(20, StopAt(6))
    first.fit(ArrayLoader(data, 16))  # logs steps 2, 4, 6 and checkpoints 4 and 6 (at the end)
    second, stopper2 = build(14)
    second.fit(ArrayLoader(data, 16), resume=tmp_path / "checkpoints" / "step_4")  # back to 4: step 6 logs again
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "scalars" in r]
    assert steps == [2, 4, 6, 8, 10, 12, 14]


def test_max_to_keep_and_best_k_retention(tmp_path, data):
    scores = iter([0.9, 0.1, 0.8, 0.7, 0.6, 0.5])

    class Score(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            logs["score"] = next(scores)  # runs before the epoch's history entry is read for saving

    cp = Checkpoint(every_n_epochs=1, max_to_keep=2, monitor="score", mode="min", keep_best=1)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=6, workdir=tmp_path,
                      callbacks=[Score(), cp])
    trainer.fit(ArrayLoader(data, 32))
    kept = sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    assert kept == [6, 15, 18]  # the best (epoch 2, step 6) and the two newest


def test_the_best_checkpoint_loads_into_a_model_built_afresh(tmp_path, data):
    """No way led from a kept best checkpoint to a model (load_model read exports only)."""
    from trainer import load_model

    scores = iter([0.9, 0.1, 0.8, 0.7])
    kept = {}

    class Score(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            logs["score"] = next(scores)
            kept[trainer.step] = jax.tree.map(np.array, trainer.state.params)

    cp = Checkpoint(every_n_epochs=1, max_to_keep=1, monitor="score", mode="min")
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=4, workdir=tmp_path,
                      callbacks=[Score(), cp])
    trainer.fit(ArrayLoader(data, 32))
    assert cp.best_step == 6 and cp.best_path == tmp_path.absolute() / "checkpoints" / "step_6"
    best = load_model(cp.best_path, TinyMLP(rngs=nnx.Rngs(1)))
    assert bitwise_equal([np.asarray(x) for x in jax.tree.leaves(nnx.state(best, nnx.Param))],
                         [np.asarray(x) for x in jax.tree.leaves(kept[6])])
    newest = load_model(tmp_path, TinyMLP(rngs=nnx.Rngs(1)))  # a run's workdir: its newest checkpoint
    assert bitwise_equal([np.asarray(x) for x in jax.tree.leaves(nnx.state(newest, nnx.Param))],
                         [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)])
    with pytest.raises(CheckpointError, match="lacks|has"):
        load_model(cp.best_path, nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    assert Checkpoint().best_step is None  # no monitor


@pytest.mark.parametrize("mode, scores, best", [("min", [0.5, float("nan"), 0.8, 0.9, 0.95], 3),
                                                ("max", [0.5, float("nan"), 0.4, 0.3, 0.2], 3)])
def test_a_nan_of_the_monitored_metric_ranks_last_and_the_best_is_kept(tmp_path, data, mode, scores, best):
    """NaN compares unordered: orbax's ranking sorted it anywhere and pruned the best checkpoint."""
    values = iter(scores)

    class Score(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            logs["score"] = next(values)

    cp = Checkpoint(every_n_epochs=1, max_to_keep=1, monitor="score", mode=mode, keep_best=1)
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=len(scores), workdir=tmp_path,
            callbacks=[Score(), cp]).fit(ArrayLoader(data, 32))
    kept = sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    assert kept == [best, 3 * len(scores)]


def test_step_saves_are_not_ranked_by_the_previous_epoch_metric(tmp_path, data):
    scores = iter([0.9, 0.5, 0.6, 0.7])  # epochs end at steps 3, 6, 9, 12; step saves every 2 steps

    class Accuracy(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            logs["eval/accuracy"] = next(scores)

    cp = Checkpoint(every_n_steps=2, every_n_epochs=1, max_to_keep=1, monitor="eval/accuracy")
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=4, workdir=tmp_path,
            callbacks=[Accuracy(), cp]).fit(ArrayLoader(data, 32))
    kept = sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    assert kept == [3, 12]  # epoch 0's end (0.9) and the newest; step 6, saved at its epoch's end too, scored 0.5


def test_step_saves_are_ranked_by_the_evaluation_at_their_step(tmp_path, data):
    """Checkpoint(monitor=..., every_n_steps=N, every_n_epochs=None) never ranked a save and pruned the
    best, silently: a save at an evaluation's step is ranked by it (Lightning's way), one at an epoch's
    last step by the epoch's evaluation."""
    import warnings

    scores = iter([0.4, 0.9, 0.5, 0.6, 0.7, 0.8])

    class Scored(Evaluator):  # an evaluation every 2 steps whose accuracy is scripted
        def run(self, trainer):
            self.last_metrics, self.last_step = {"eval/accuracy": next(scores)}, trainer.step
            self.history.append((trainer.step, self.last_metrics))
            return self.last_metrics

    cp = Checkpoint(every_n_steps=2, every_n_epochs=None, max_to_keep=1, monitor="eval/accuracy")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "not among the metrics"
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=12, workdir=tmp_path,
                callbacks=[Scored(ArrayLoader(data, 32), every_n_steps=2, every_n_epochs=None), cp]).fit(
            ArrayLoader(data, 16))
    kept = sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    assert kept == [4, 12]  # the best (0.9 at step 4) and the newest
    epochs = Checkpoint(every_n_steps=6, every_n_epochs=None, max_to_keep=1, monitor="loss", mode="max")
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=3, workdir=tmp_path / "epochs",
                      callbacks=[epochs])
    trainer.fit(ArrayLoader(data, 16))  # 6 steps an epoch: each save at an epoch's end, ranked by its loss
    kept = sorted(int(p[5:]) for p in os.listdir(tmp_path / "epochs" / "checkpoints") if p.startswith("step_"))
    assert kept == [6, 18]  # the highest loss is the first epoch's
    every_other = Checkpoint(max_to_keep=1, monitor="eval/loss")  # an evaluation every 2 epochs: no false alarm
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=4, workdir=tmp_path / "other",
                callbacks=[Evaluator(ArrayLoader(data, 32), every_n_epochs=2), every_other]).fit(ArrayLoader(data, 32))


def test_a_resume_with_another_monitor_ranks_the_old_steps_last(tmp_path, data):
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, workdir=tmp_path,
            callbacks=[Checkpoint(monitor="loss")]).fit(ArrayLoader(data, 32))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=4, workdir=tmp_path,
                      callbacks=[Checkpoint(monitor="accuracy", max_to_keep=1)])
    trainer.fit(ArrayLoader(data, 32), resume=True)
    assert trainer.epoch == 4


def test_max_to_keep_none_keeps_every_checkpoint(tmp_path, data):
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=5, workdir=tmp_path,
            callbacks=[Checkpoint(every_n_epochs=1, max_to_keep=None)]).fit(ArrayLoader(data, 32))
    assert sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_")) == [
        3, 6, 9, 12, 15]


def test_best_k_retention_by_an_accuracy_with_mode_auto(tmp_path, data):
    scores = iter([0.5, 0.9, 0.6, 0.7])

    class Accuracy(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            logs["eval/accuracy"] = next(scores)

    cp = Checkpoint(every_n_epochs=1, max_to_keep=1, monitor="eval/accuracy")  # mode "auto": max; keep_best 1
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=4, workdir=tmp_path,
            callbacks=[Accuracy(), cp]).fit(ArrayLoader(data, 32))
    kept = sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    assert kept == [6, 12]  # the highest accuracy (epoch 1, step 6) and the newest
    scores = iter([0.55, 0.65])  # a resumed run, none of whose epochs beats the best
    cp = Checkpoint(every_n_epochs=1, max_to_keep=1, monitor="eval/accuracy", keep_best=1)
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=6, workdir=tmp_path,
            callbacks=[Accuracy(), cp]).fit(ArrayLoader(data, 32), resume=True)
    kept = sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    assert kept == [6, 18]  # the best of the first run survives the second


def test_a_monitor_that_is_never_logged_warns_once_naming_the_metrics(tmp_path, data):
    cp = Checkpoint(every_n_epochs=1, max_to_keep=1, monitor="eval/acc", keep_best=1)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=3, workdir=tmp_path, callbacks=[cp])
    with pytest.warns(RuntimeWarning, match=r"monitor='eval/acc'\) is not among the metrics \['accuracy'") as seen:
        trainer.fit(ArrayLoader(data, 32))
    assert sum("monitor='eval/acc'" in str(w.message) for w in seen) == 1


def test_min_interval_skips_periodic_saves_but_never_the_last(tmp_path, data):
    """Every epoch (3 steps) is due; the clock says 4 s pass per epoch; saves at least 10 s apart."""
    epochs = iter(range(100))
    cp = Checkpoint(every_n_epochs=1, max_to_keep=10, min_interval_seconds=10, clock=lambda: 4.0 * next(epochs))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=7, workdir=tmp_path, callbacks=[cp])
    trainer.fit(ArrayLoader(data, 32))
    saved = sorted(int(p[5:]) for p in os.listdir(tmp_path / "checkpoints") if p.startswith("step_"))
    # clock reads: a save at epoch 1 (t=0); epochs 2, 3 read 4, 8 (too soon); epoch 4 reads 12, saves (t=16);
    # epochs 5, 6 read 20, 24; epoch 7 reads 28 (>= 26), saves; the fit's end has just saved
    assert saved == [3, 12, 21]
    with pytest.raises(ValueError, match="min_interval_seconds=-1"):
        Checkpoint(min_interval_seconds=-1)


def run_script(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_killed_run_resumed_ends_bitwise_identical(tmp_path):
    ref = run_script(tmp_path / "ref", 20, "--out", tmp_path / "ref.npz")
    assert ref.returncode == 0, ref.stderr
    killed = run_script(tmp_path / "run", 20, "--kill-at", 11)
    assert killed.returncode == -signal.SIGKILL
    resumed = run_script(tmp_path / "run", 20, "--resume", "--out", tmp_path / "run.npz")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from checkpoint step" in resumed.stderr
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert bitwise_equal([a[k] for k in a.files], [b[k] for k in b.files])
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "scalars" in r]
    assert steps == list(range(2, 21, 2))  # no duplicated or missing step


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resumes_bitwise(tmp_path):
    run_script(tmp_path / "ref", 16, "--out", tmp_path / "ref.npz")
    termed = run_script(tmp_path / "run", 16, "--term-at", 7)
    assert termed.returncode == 143, termed.stderr
    assert "received SIGTERM: saved checkpoint step 7" in termed.stderr and "resume" in termed.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_7").is_dir()
    resumed = run_script(tmp_path / "run", 16, "--resume", "--out", tmp_path / "run.npz")
    assert resumed.returncode == 0 and "resumed from checkpoint step 7" in resumed.stderr
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert bitwise_equal([a[k] for k in a.files], [b[k] for k in b.files])
    # the logs too: the preempted fit wrote no interim record of its partial window (step 7), which stayed
    logged = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("ref", "run")]
    assert logged[0] == logged[1] and any('"step": 8' in line for line in logged[0])


def test_nan_rollback_restores_skips_the_bad_batch_and_matches_a_clean_run(tmp_path):
    data = make_data()
    x = data["x"].copy()
    x[7 * 8] = np.nan  # the batch at position 7 (step 8) goes bad
    bad = ArrayLoader({"x": x, "label": data["label"]}, 8, shuffle=False)
    detector = NaNDetector(policy="rollback", check_every=1)
    trainer = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=11, workdir=tmp_path,
                      callbacks=[detector, Checkpoint(every_n_steps=3, every_n_epochs=None, max_to_keep=1)])
    with pytest.warns(RuntimeWarning, match="non-finite loss and gradients at step 8 .*rolling back"):
        trainer.fit(bad)
    assert detector.rollbacks == [8] and trainer.skip_batches == {(0, 7)}
    keep = np.r_[0:56, 64:96]  # the same data without the bad batch
    clean = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=11,
                    callbacks=[NaNDetector()])
    clean.fit(ArrayLoader({"x": x[keep], "label": data["label"][keep]}, 8, shuffle=False))
    assert bitwise_equal(leaves_of(trainer), leaves_of(clean))
    # the epoch's mean counts the steps before the restored checkpoint too, as the clean run's does
    assert trainer.history[-1]["loss"] == pytest.approx(clean.history[-1]["loss"], rel=1e-6)
    for folder in (tmp_path / "checkpoints").iterdir():  # nothing non-finite was ever written
        assert folder.name.startswith("step_")


def _late_bad_batch():
    data = make_data()
    x = data["x"].copy()
    x[8 * 8] = np.nan  # the batch at position 8 (step 9) of 12 goes bad
    return data, x, ArrayLoader({"x": x, "label": data["label"]}, 8, shuffle=False)


def test_nan_rollback_in_the_last_steps_before_max_steps_still_trains_to_the_end(tmp_path):
    """The bad step falls between the last sparse check and ``max_steps``: it is checked at the last
    step and rolled back then, and the run still trains its steps (it ended halted, a step short)."""
    data, x, bad = _late_bad_batch()
    detector = NaNDetector(policy="rollback")  # checks every 10 steps
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=10, workdir=tmp_path,
                      callbacks=[detector, Checkpoint(every_n_steps=4, every_n_epochs=None)])
    with pytest.warns(RuntimeWarning, match="at step 9 .*rolling back"):
        trainer.fit(bad)
    assert detector.rollbacks == [9] and trainer._rollback_request is None
    assert trainer.step == 10 and not bool(jax.device_get(trainer.state.guard["halted"]))
    keep = np.r_[0:64, 72:96]
    clean = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=10, callbacks=[NaNDetector()])
    clean.fit(ArrayLoader({"x": x[keep], "label": data["label"][keep]}, 8, shuffle=False))
    assert bitwise_equal(leaves_of(trainer), leaves_of(clean))


def test_a_rollback_asked_for_at_the_fits_end_is_done_before_fit_returns(tmp_path):
    """A stop at the bad step (a callback after the detector): the loop has ended when the detector
    reads the bad step in ``on_fit_end``; ``fit`` restores the newest good checkpoint and says so."""
    class StopWithReason(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 9:
                trainer.request_stop("mine")

    _, _, bad = _late_bad_batch()
    model = TinyMLP(rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.adam(1e-2), max_steps=12, workdir=tmp_path,
                      callbacks=[NaNDetector(policy="rollback"), StopWithReason(),
                                 Checkpoint(every_n_steps=4, every_n_epochs=None)])
    with pytest.warns(RuntimeWarning, match=r"fit ended with a rollback pending: restored .* step 8"):
        trainer.fit(bad)
    assert trainer.step == 8 and trainer._rollback_request is None and trainer.skip_batches == {(0, 8)}
    assert not bool(jax.device_get(trainer.state.guard["halted"])) and trainer.stop_reason == "mine"
    held = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]  # the caller's module
    assert bitwise_equal(held, [np.asarray(x) for x in jax.tree.leaves(trainer.state.params)])


def test_a_rollback_cuts_the_loggers_history_without_reading_its_file_back(tmp_path):
    """A rollback inside the run cuts the logger's history back to the checkpoint (no read of the whole
    log, which a long run's makes slow); a resume in a new process's logger reads it back once."""
    class CountingJsonl(JsonlWriter):
        reads = 0

        def read_scalars(self):
            CountingJsonl.reads += 1
            return super().read_scalars()

    bad = bad_at(7, make_data())  # step 8 goes bad
    logger = MetricsLogger([CountingJsonl(tmp_path / "log.jsonl")], log_every=2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=11, workdir=tmp_path,
                      callbacks=[NaNDetector(policy="rollback", check_every=1), logger,
                                 Checkpoint(every_n_steps=3, every_n_epochs=None)])
    with pytest.warns(RuntimeWarning, match="rolling back"):
        trainer.fit(bad)
    steps = [s for s, _ in logger.history]
    assert CountingJsonl.reads == 0 and steps == sorted(set(steps)) and steps[-1] == 11
    assert steps == [r["step"] for r in read_jsonl(tmp_path / "log.jsonl") if "scalars" in r]
    fresh = MetricsLogger([CountingJsonl(tmp_path / "log.jsonl")], log_every=2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=12, workdir=tmp_path,
                      callbacks=[NaNDetector(policy="rollback", check_every=1), fresh,
                                 Checkpoint(every_n_steps=3, every_n_epochs=None)])
    trainer.fit(bad, resume=True)
    assert CountingJsonl.reads == 1 and [s for s, _ in fresh.history] == [*steps, 12]  # from the final save, 11


def test_a_second_fit_resuming_an_earlier_step_restarts_the_epochs_sums_there(tmp_path):
    """Stop at 6, then the same (built) trainer resumes step 4 and ends the 10-batch epoch: its mean
    is the unbroken run's (steps 5 and 6 counted once, those before 4 counted)."""
    data = ArrayLoader(make_data(n=160), 16, seed=0)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=6,
                      callbacks=[Checkpoint(tmp_path, every_n_steps=4, every_n_epochs=None)])
    trainer.fit(data)
    trainer.max_steps = 10
    with pytest.warns(RuntimeWarning, match=r"also holds the newer steps \[6\]"):  # it rewinds over step 6
        resumed = trainer.fit(data, resume=tmp_path / "step_4")
    unbroken = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=10).fit(data)
    assert len(resumed) == 1 and "partial_epoch" not in resumed[0]
    assert resumed[0]["loss"] == pytest.approx(unbroken[0]["loss"], rel=1e-6)


@pytest.mark.parametrize("check_every", [1, 2])
def test_nan_rollback_catches_every_later_bad_step_too(tmp_path, check_every):
    loader = bad_at(3, make_data(n=64))  # the batch at position 3 of every epoch goes bad (no shuffling)
    detector = NaNDetector(policy="rollback", check_every=check_every)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=3, workdir=tmp_path,
                      callbacks=[detector, Checkpoint(every_n_epochs=1, async_save=False)])
    with pytest.warns(RuntimeWarning, match="rolling back"):
        trainer.fit(loader)
    # one rollback an epoch, each from the bad batch; every other batch trained on
    assert len(detector.rollbacks) == 3 and trainer.skip_batches == {(0, 3), (1, 3), (2, 3)}
    assert trainer.step == 21 and not bool(jax.device_get(trainer.state.guard["halted"]))
    assert all(np.isfinite(h["loss"]) for h in trainer.history) and len(trainer.history) == 3
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps[-1] == 21


def test_nan_rollbacks_are_counted_in_the_history_and_the_logs(tmp_path):
    """The restored guard counts no bad step, so the rollbacks are logged by name: each epoch's row of
    ``history`` holds the count so far, and the loggers' window after each rollback."""
    loader = bad_at(3, make_data(n=64))  # position 3 of every epoch goes bad
    logger = MetricsLogger([JsonlWriter(tmp_path / "log.jsonl")], log_every=2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, workdir=tmp_path,
                      callbacks=[NaNDetector(policy="rollback", check_every=1), logger,
                                 Checkpoint(every_n_epochs=1, async_save=False)])
    with pytest.warns(RuntimeWarning, match="rolling back"):
        history = trainer.fit(loader)
    assert [h["nan_rollbacks"] for h in history] == [1.0, 2.0]
    logged = [(r["step"], r["scalars"]["nan_rollbacks"]) for r in read_jsonl(tmp_path / "log.jsonl")
              if "nan_rollbacks" in r.get("scalars", {})]
    assert logged == [(2, 1.0), (8, 2.0)]  # the first window after each restore (to steps 0 and 7)


def test_a_stop_during_the_epoch_end_evaluation_keeps_the_epoch_train_metrics(tmp_path, data):
    class InterruptEvaluation(Callback):  # Ctrl-C while epoch 1's evaluation runs
        def on_eval_start(self, trainer):
            if trainer.epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)

    def run(workdir, *extra, resume=False):
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=3, workdir=workdir,
                          callbacks=[*extra, Checkpoint(async_save=False)])
        return trainer, trainer.fit(ArrayLoader(data, 32), eval_data=ArrayLoader(data, 32, shuffle=False),
                                    resume=resume)

    with pytest.raises(SystemExit) as stopped:
        run(tmp_path / "run", InterruptEvaluation())
    assert stopped.value.code == 130
    _, resumed = run(tmp_path / "run", resume=True)
    _, unbroken = run(tmp_path / "ref")
    assert [sorted(h) for h in resumed] == [sorted(h) for h in unbroken]  # loss and accuracy of epoch 1 too
    assert [h["loss"] for h in resumed] == [h["loss"] for h in unbroken]


def test_a_signal_after_the_last_step_still_saves_and_exits(tmp_path, data):
    """SIGTERM during the last epoch's on_epoch_end: no step follows to notice it, but fit still ends
    with the save and exit 143 (it returned normally, exit 0)."""
    class TermAtTheEnd(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, workdir=tmp_path,
                      callbacks=[TermAtTheEnd(), Checkpoint(every_n_epochs=None, async_save=False)])
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(ArrayLoader(data, 32))
    assert stopped.value.code == 143 and (tmp_path / "checkpoints" / "step_6").is_dir()


def test_a_second_signal_does_not_wait_for_a_prefetch_thread_stuck_in_the_data(tmp_path, data):
    """The data source blocks for good after the signals: stopping at once leaves its (daemon) thread
    behind rather than waiting the close timeout for it and warning."""
    from trainer.preemption import REPEAT_SECONDS

    import threading

    now, release, handled = [100.0], threading.Event(), threading.Event()

    def stuck_batches():  # in the prefetch thread; the loop waits for its first batch, where the signals reach it
        os.kill(os.getpid(), signal.SIGTERM)
        handled.wait()  # (two signals sent at once would reach the handler as one)
        now[0] += 2 * REPEAT_SECONDS
        os.kill(os.getpid(), signal.SIGTERM)
        release.wait()  # stuck, as a source whose producer died
        yield from ArrayLoader(data, 32, shuffle=False)

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=6, workdir=tmp_path,
                      callbacks=[Checkpoint(every_n_steps=1, every_n_epochs=None, async_save=False)], prefetch=2)
    trainer._preemption.clock = lambda: now[0]
    handle = trainer._preemption._handle

    def handle_and_tell(signum, frame):
        handled.set()
        handle(signum, frame)

    trainer._preemption._handle = handle_and_tell
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # "the prefetch thread is still inside ..."
            with pytest.raises(SystemExit) as stopped:
                trainer.fit(stuck_batches())
    finally:
        release.set()  # the thread left behind ends (later tests count prefetch threads)
        for thread in threading.enumerate():
            if thread.name == "nnx-trainer-prefetch":
                thread.join(10)
    assert stopped.value.code == 143


def test_a_second_signal_stops_at_once_without_saving(tmp_path, data, capfd):
    """A run stuck outside a step (its data) gets SIGTERM twice: the first is acknowledged, the second
    (two seconds later on the handler's clock) stops it there, with no save (the first would wait for a
    step that never comes); one repeated at once is the same signal delivered twice, and ignored."""
    from trainer.preemption import REPEAT_SECONDS

    now = [100.0]

    def stuck_batches():
        for i, batch in enumerate(ArrayLoader(data, 32, shuffle=False)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)  # at the same time: ignored
                now[0] += 2 * REPEAT_SECONDS
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=3, workdir=tmp_path,
                      callbacks=[Checkpoint(every_n_steps=1, every_n_epochs=None, async_save=False)], prefetch=0)
    trainer._preemption.clock = lambda: now[0]
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(stuck_batches())
    err = capfd.readouterr().err
    assert stopped.value.code == 143 and "received SIGTERM: saving a checkpoint at the next step boundary" in err
    assert "received SIGTERM again: stopping now, without saving" in err
    assert trainer.step == 2 and sorted(os.listdir(tmp_path / "checkpoints")) == ["step_1", "step_2"]


def test_a_step_evaluation_cut_short_by_a_preemption_runs_when_the_run_resumes(tmp_path, data):
    """SIGTERM during step 6's evaluation: the checkpoint of step 6 holds no result for it, so the
    resumed run evaluates step 6 before its first step; the logs hold every evaluation once."""
    def run(workdir, *extra, resume=False):
        evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_steps=3, every_n_epochs=None)
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=12, workdir=workdir,
                          callbacks=[evaluator, *extra, MetricsLogger([JsonlWriter(workdir / "log.jsonl")], log_every=3),
                                     Checkpoint(every_n_steps=12, every_n_epochs=None, async_save=False)])
        trainer.fit(ArrayLoader(data, 32), resume=resume)
        return evaluator

    with pytest.raises(SystemExit):
        run(tmp_path / "run", TermInEvaluation(6))
    resumed = run(tmp_path / "run", resume=True)
    unbroken = run(tmp_path / "ref")
    assert [s for s, _ in resumed.history] == [6, 9, 12]
    assert resumed.history == unbroken.history[1:]
    evaluations = [r["step"] for r in read_jsonl(tmp_path / "run" / "log.jsonl") if "eval/loss" in r.get("scalars", {})]
    assert evaluations == [3, 6, 9, 12]


def test_nan_rollback_gives_up_after_max_rollbacks(tmp_path, data):
    x = data["x"].copy()
    x[32:] = np.nan  # every batch from the third on is bad
    loader = ArrayLoader({"x": x, "label": data["label"]}, 16, shuffle=False)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=30, workdir=tmp_path,
                      callbacks=[NaNDetector(policy="rollback", max_rollbacks=2, check_every=1),
                                 Checkpoint(every_n_steps=2, every_n_epochs=None)])
    with pytest.warns(RuntimeWarning), pytest.raises(Exception, match="after 2 rollbacks"):
        trainer.fit(loader)


def test_nan_rollback_needs_a_checkpoint(data):
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=3,
                      callbacks=[NaNDetector(policy="rollback")])
    with pytest.raises(ValueError, match="needs a Checkpoint"):
        trainer.fit(ArrayLoader(data, 16))


@pytest.mark.slow
def test_second_sigint_during_the_save_still_leaves_a_good_checkpoint(tmp_path):
    ref = run_script(tmp_path / "ref", 12, "--out", tmp_path / "ref.npz")
    assert ref.returncode == 0, ref.stderr
    interrupted = run_script(tmp_path / "run", 12, "--int-twice-at", 5)
    assert interrupted.returncode == 130, interrupted.stderr
    assert "received SIGINT: saved checkpoint step 5" in interrupted.stderr
    resumed = run_script(tmp_path / "run", 12, "--resume", "--out", tmp_path / "run.npz")
    assert resumed.returncode == 0 and "resumed from checkpoint step 5" in resumed.stderr
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert bitwise_equal([a[k] for k in a.files], [b[k] for k in b.files])


def test_checksum_reads_the_same_bytes_as_a_copy():
    """The in-place CRC32 equals the CRC32 of ``tobytes()`` for every dtype a state holds, 0-d included."""
    import zlib

    import ml_dtypes

    from trainer.checkpoint_arrays import crc32

    rng = np.random.default_rng(0)
    for value in (rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=7).astype(ml_dtypes.bfloat16),
                  np.array(3, np.int32), np.array([True, False, True]), rng.integers(0, 9, (2, 2, 2)).astype(np.uint32)):
        assert crc32(value) == zlib.crc32(value.tobytes()), value.dtype


@pytest.mark.parametrize("pack_max_bytes", [1 << 20, 100, -1])
def test_small_arrays_are_stored_joined_per_dtype_and_resume_bitwise(tmp_path, data, monkeypatch, pack_max_bytes):
    import trainer.checkpoint_store as store_module
    from trainer.checkpoint_arrays import stored_shapes

    monkeypatch.setattr(store_module, "PACK_MAX_BYTES", pack_max_bytes)  # all, some or none joined
    unbroken = make(tmp_path / "a", 8)
    unbroken.fit(ArrayLoader(data, 16, seed=2))
    first = make(tmp_path / "b", 8, StopAt(4))
    first.fit(ArrayLoader(data, 16, seed=2))
    meta = first.checkpoints[0].store.read_meta(4)
    stored = stored_shapes(meta["leaves"])
    small = [d for d in meta["leaves"] if int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize <= pack_max_bytes]
    assert len(stored) == len(meta["leaves"]) - len(small) + len({d["dtype"] for d in small})
    second = make(tmp_path / "b", 8)
    second.fit(ArrayLoader(data, 16, seed=2), resume=True)
    assert bitwise_equal(leaves_of(second), leaves_of(unbroken))


def test_a_format_1_checkpoint_still_resumes(tmp_path, data, monkeypatch):
    import trainer.checkpoint as checkpoint_module
    import trainer.checkpoint_store as store_module

    unbroken = make(tmp_path / "a", 8)
    unbroken.fit(ArrayLoader(data, 16, seed=2))
    with monkeypatch.context() as patch:  # as the first release wrote it: every array alone, format 1
        patch.setattr(store_module, "PACK_MAX_BYTES", -1)
        patch.setattr(checkpoint_module, "FORMAT", 1)
        make(tmp_path / "b", 8, StopAt(4)).fit(ArrayLoader(data, 16, seed=2))
    second = make(tmp_path / "b", 8)
    assert second.checkpoints[0].open(second).read_meta(4)["format"] == 1
    second.fit(ArrayLoader(data, 16, seed=2), resume=True)
    assert bitwise_equal(leaves_of(second), leaves_of(unbroken))


def test_a_halted_guard_is_not_saved_and_the_last_good_checkpoint_stays(tmp_path, data):
    import jax.numpy as jnp

    trainer = make(tmp_path, 4)
    trainer.fit(ArrayLoader(data, 16))  # good checkpoints at step 4
    checkpoint = trainer.checkpoints[0]
    trainer.state = trainer.state.replace(guard={**trainer.state.guard, "halted": jnp.array(True)})
    trainer.step = 5
    with pytest.warns(RuntimeWarning, match="not saving step 5: training halted"):
        assert checkpoint.save(trainer, wait=True) is False
    assert checkpoint.store.steps() == [4]


def test_a_failing_on_fit_end_does_not_skip_the_final_checkpoint(tmp_path, data):
    class Broken(Callback):  # a plot that cannot be written, say
        def on_fit_end(self, trainer):
            raise OSError("disk full")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=5, workdir=tmp_path,
                      callbacks=[Broken(), Checkpoint(every_n_epochs=None)])
    with pytest.raises(OSError, match="disk full"):
        trainer.fit(ArrayLoader(data, 16))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_5"]  # saved after the error, then raised


def test_a_rollback_asked_for_at_the_last_epochs_end_is_done_before_fit_ends(tmp_path, data):
    """Asked in on_epoch_end of the last epoch: restored from epoch 0's checkpoint (not from the one
    that epoch would save), its bad batch skipped on the replay, and nothing left pending."""
    restores = []

    class RollBackOnce(Callback):
        asked = False

        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1 and not self.asked:
                self.asked = True
                trainer.request_rollback(trainer.step)

        def on_checkpoint_restore(self, trainer, checkpoint):
            restores.append(trainer.step)

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2,
                      callbacks=[RollBackOnce(), Checkpoint(tmp_path, max_to_keep=5)])
    trainer.fit(ArrayLoader(data, 16, seed=0))  # 6 batches an epoch
    assert restores == [6] and trainer._rollback_request is None
    assert trainer.skip_batches == {(1, 5)} and (trainer.step, trainer.epoch) == (11, 2)


class Counter(Callback):
    """A callback with state: the steps it saw, from ``start``."""

    def __init__(self, start=0):
        self.seen = start

    def on_step_end(self, trainer, step, metrics):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_callback_states_follow_their_class_not_their_place_in_the_list(tmp_path, data):
    """Resumed with another callback put in front (a recipe's --progress) and one left out: each state
    reaches its callback by class (and order among its class); the one left out is warned about."""
    class Other(Counter):
        pass

    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4,
            callbacks=[Counter(100), Other(), Counter(200), Checkpoint(tmp_path, every_n_steps=4)]
            ).fit(ArrayLoader(data, 16))
    first, second = Counter(), Counter()
    with pytest.warns(RuntimeWarning, match=r"holds state for callbacks \['Other'\] that this trainer does not have"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4,
                callbacks=[ProgressBar(plain=True, stream=io.StringIO()), first, second,
                           Checkpoint(tmp_path, every_n_steps=4)]).fit(ArrayLoader(data, 16), resume=True)
    assert (first.seen, second.seen) == (104, 204)


def test_a_callback_state_json_cannot_keep_is_refused_by_name(tmp_path, data):
    class Tags(Counter):
        def state_dict(self):
            return {"seen": self.seen, "tags": {"a", "b"}}

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4,
                      callbacks=[Tags(), Checkpoint(tmp_path, every_n_steps=4)])
    with pytest.raises(TypeError, match=r"Tags.state_dict\(\)\['tags'\] holds a set .* a checkpoint \(JSON\) cannot keep"):
        trainer.fit(ArrayLoader(data, 16))
    assert trainer.step == 0  # refused when fit started, not at the first save after training


def test_a_resume_that_finds_no_checkpoint_rewinds_the_logs_of_the_run_that_left_none(tmp_path, data):
    """A run killed before its first checkpoint, resumed: it starts fresh, and its logs start again
    rather than holding steps 2, 4 twice (and the config twice)."""
    class Killed(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 5:
                raise RuntimeError("killed")

    def run(*extra, resume=False):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, workdir=tmp_path,
                callbacks=[MetricsLogger([JsonlWriter(tmp_path / "log.jsonl")], log_every=2),
                           Checkpoint(every_n_steps=100, every_n_epochs=None), *extra]
                ).fit(ArrayLoader(data, 16), resume=resume)

    with pytest.raises(RuntimeError, match="killed"):
        run(Killed())
    assert [r.get("step") for r in read_jsonl(tmp_path / "log.jsonl")] == [None, 2, 4]  # the config; the windows done
    run(resume=True)
    records = read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in records if "scalars" in r] == [2, 4, 6, 8]
    assert sum("hparams" in r for r in records) == 1


@pytest.mark.parametrize("ragged", ["pad", "drop"])
def test_a_resume_that_starts_at_an_epochs_smaller_last_batch_trains_as_the_unbroken_run(tmp_path, ragged):
    """Stopped right before the epoch's last batch (4 of 100 rows at batch 16): the resumed process's
    first batch is the small one. The step is compiled for the run's batch size (in the checkpoint), not
    for that batch (which failed the next epoch: 16 rows, 'more than the first batch (4)')."""
    data = ArrayLoader(make_data(n=100), 16, seed=0, drop_remainder=False)

    def make(workdir, *extra):
        return Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=3, workdir=workdir,
                       ragged_batches=ragged, callbacks=[Checkpoint(every_n_epochs=1), *extra])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # drop: the dropped batch is warned about
        unbroken = make(tmp_path / "a")
        unbroken.fit(data)
        make(tmp_path / "b", StopAt(6)).fit(data)
        resumed = make(tmp_path / "b")
        resumed.fit(data, resume=True)
    assert resumed.step == unbroken.step == (21 if ragged == "pad" else 18)
    assert bitwise_equal(leaves_of(resumed), leaves_of(unbroken))


@pytest.mark.parametrize("killed_at", [9, 12])
def test_logs_of_a_run_killed_right_after_a_checkpoint_match_the_unbroken_runs(tmp_path, killed_at):
    """Killed right after the checkpoint of step 9 (inside the window 8-12) or 12 (a window's end): the
    window the logger had not written yet is written before the checkpoint, and the one it was adding
    up resumes with its steps before the checkpoint (in the checkpoint): the same records, bitwise."""
    class KilledAfterSave(Callback):
        def on_checkpoint_save(self, trainer, checkpoint):
            if trainer.step == killed_at:
                raise KeyboardInterrupt  # stands for SIGKILL: nothing after the commit runs

    def run(workdir, *extra, resume=False):
        Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=20, workdir=workdir,
                callbacks=[MetricsLogger([JsonlWriter(workdir / "log.jsonl")], log_every=4), *extra,
                           Checkpoint(every_n_steps=3, every_n_epochs=None, async_save=False)]
                ).fit(ArrayLoader(make_data(), 16, seed=1), resume=resume)
        return [(r["step"], r["scalars"]) for r in read_jsonl(workdir / "log.jsonl") if "scalars" in r]

    unbroken = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", KilledAfterSave())
    assert [s for s, _ in unbroken] == [4, 8, 12, 16, 20]
    assert run(tmp_path / "b", resume=True) == unbroken


def test_a_resume_with_smaller_batches_compiles_for_them(tmp_path):
    """The checkpoint's batch size stands in only for an epoch's smaller last batch: a resume whose
    batches are all smaller (a plain iterable of batches of 16 after 32) trains on them, not dropping each."""
    data = make_data(n=96)
    batches = lambda size: [{k: v[i:i + size] for k, v in data.items()} for i in range(0, 96, size)]  # noqa: E731
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=1, workdir=tmp_path,
            callbacks=[Checkpoint()]).fit(batches(32))
    resumed = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=3, workdir=tmp_path,
                      callbacks=[Checkpoint()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no batch dropped
        resumed.fit(batches(16), resume=True)
    assert resumed.step == 3 + 2 * 6 and resumed.compiled_batch_size == 16


def test_a_preemption_before_the_resumed_runs_first_step_keeps_its_checkpoint_whole(tmp_path, data):
    """SIGTERM in step 4's evaluation, twice: the second comes in the resumed run's redo of it, before its
    step is built. The preemption save does not write step 4 again without its running sums: resumed
    once more, the epoch's mean is the unbroken run's."""
    def run(workdir, *extra, resume=False):
        evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_steps=4, every_n_epochs=None)
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=6, workdir=workdir,
                          callbacks=[evaluator, *extra, Checkpoint(every_n_steps=6, every_n_epochs=None)])
        return trainer.fit(ArrayLoader(data, 16, seed=0), resume=resume)

    unbroken = run(tmp_path / "a")
    for _ in range(2):
        with pytest.raises(SystemExit):
            run(tmp_path / "b", TermInEvaluation(4), resume=True)
    resumed = run(tmp_path / "b", resume=True)
    assert resumed[-1]["loss"] == unbroken[-1]["loss"]


def test_a_stop_asked_for_in_on_epoch_start_trains_no_step(data):
    class StopAtStart(Callback):
        def on_epoch_start(self, trainer, epoch):
            trainer.request_stop("not today")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, callbacks=[StopAtStart()])
    trainer.fit(ArrayLoader(data, 16))
    assert trainer.step == 0 and trainer.stop_reason == "not today"


@pytest.mark.parametrize("logger_first", [True, False])
def test_a_window_a_fit_ends_inside_is_an_interim_record_and_its_own_record_counts_all_its_steps(tmp_path, data,
                                                                                                 logger_first):
    """Finished at step 10 (log every 4) and resumed to 16: the record at 10 is interim (steps 9-10), the
    one at 12 the unbroken run's (steps 9-12), whichever of logger and checkpoint ends first."""
    def run(workdir, max_steps, resume=False):
        logger = MetricsLogger([JsonlWriter(workdir / "log.jsonl")], log_every=4)
        checkpoint = Checkpoint(every_n_steps=None, every_n_epochs=None)
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=max_steps, workdir=workdir,
                callbacks=[logger, checkpoint] if logger_first else [checkpoint, logger]
                ).fit(ArrayLoader(data, 16, seed=0), resume=resume)
        return {r["step"]: r["scalars"] for r in read_jsonl(workdir / "log.jsonl") if "scalars" in r}

    unbroken = run(tmp_path / "a", 16)
    run(tmp_path / "b", 10)
    resumed = run(tmp_path / "b", 16, resume=True)
    assert sorted(resumed) == [4, 8, 10, 12, 16]
    assert {s: resumed[s] for s in unbroken} == unbroken


def test_the_evaluation_redone_after_a_resume_is_not_redone_by_a_rollback_to_the_same_checkpoint(tmp_path):
    """Step 8's evaluation, cut short by a preemption, is redone by the resumed run; a NaN rollback to step
    8 later does not evaluate (and log) step 8 a third time."""
    data = make_data()
    data["x"][9 * 8] = np.nan  # step 10 goes bad

    def run(*extra, resume=False):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=12, workdir=tmp_path,
                callbacks=[NaNDetector(policy="rollback", check_every=1),
                           Evaluator(ArrayLoader(make_data(), 48), every_n_steps=4, every_n_epochs=None),
                           MetricsLogger([JsonlWriter(tmp_path / "log.jsonl")], log_every=4), *extra,
                           Checkpoint(every_n_steps=4, every_n_epochs=None)]).fit(
            ArrayLoader(data, 8, shuffle=False), resume=resume)

    with pytest.raises(SystemExit):
        run(TermInEvaluation(8))
    with pytest.warns(RuntimeWarning, match="rolling back"):
        run(resume=True)
    evaluated = [r["step"] for r in read_jsonl(tmp_path / "log.jsonl") if "eval/loss" in r.get("scalars", {})]
    assert evaluated == [4, 8, 12]


def test_two_evaluators_keep_their_own_state_when_the_first_is_left_out_on_resume(tmp_path, data):
    """States are keyed by ``state_key`` (an Evaluator's prefix): the test evaluator's state reaches the
    test evaluator even when the validation one before it is gone (by class alone it took the other's)."""
    val, test = make_data(32, seed=1), make_data(32, seed=2)
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4,
            callbacks=[Evaluator(ArrayLoader(val, 16, shuffle=False), every_n_steps=2, every_n_epochs=None),
                       Evaluator(ArrayLoader(test, 16, shuffle=False), every_n_steps=4, every_n_epochs=None,
                                 prefix="test/"),
                       Checkpoint(tmp_path, every_n_steps=4)]).fit(ArrayLoader(data, 16))
    alone = Evaluator(ArrayLoader(test, 16, shuffle=False), every_n_steps=4, every_n_epochs=None, prefix="test/")
    with pytest.warns(RuntimeWarning, match=r"holds state for callbacks \['Evaluator\[eval/\]'\]"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4,
                callbacks=[alone, Checkpoint(tmp_path, every_n_steps=4)]).fit(ArrayLoader(data, 16), resume=True)
    assert alone.last_step == 4 and set(alone.last_metrics) == {"test/loss", "test/accuracy"}


def test_early_stopping_watching_another_metric_on_resume_starts_afresh(tmp_path, data):
    first = EarlyStopping(monitor="loss", patience=5)
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2,
            callbacks=[first, Checkpoint(tmp_path)]).fit(ArrayLoader(data, 16))
    assert first.best is not None
    same, other = EarlyStopping(monitor="loss", patience=5), EarlyStopping(monitor="accuracy", patience=5)
    for stopper in (same, other):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2,
                    callbacks=[stopper, Checkpoint(tmp_path)]).fit(ArrayLoader(data, 16), resume=True)
    assert same.best == first.best and other.best is None


def test_states_saved_by_class_still_reach_callbacks_that_name_their_state(tmp_path, data):
    """A checkpoint written before ``state_key`` keyed states by class (``Evaluator``, ``Evaluator#2``)."""
    from trainer.checkpoint import _load_callback_states

    val = ArrayLoader(make_data(32, seed=1), 16, shuffle=False)
    a, b = Evaluator(val), Evaluator(val, prefix="test/")
    holder = type("T", (), {"callbacks": type("L", (), {"callbacks": [a, b]})()})()
    _load_callback_states(holder, {"Evaluator": {"last_step": 3, "last_metrics": {"eval/loss": 1.0}},
                                   "Evaluator#2": {"last_step": 5, "last_metrics": {"test/loss": 2.0}}})
    assert (a.last_step, b.last_step) == (3, 5) and b.last_metrics == {"test/loss": 2.0}


def test_a_state_key_that_is_not_a_string_is_refused_by_name(tmp_path, data):
    class Keyed(Counter):
        state_key = 3

    with pytest.raises(TypeError, match=r"Keyed.state_key = 3 must be a non-empty string"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4,
                callbacks=[Keyed(), Checkpoint(tmp_path, every_n_steps=4)]).fit(ArrayLoader(data, 16))


def test_a_save_a_callback_makes_in_on_epoch_end_resumes_into_the_next_epoch(tmp_path, data):
    """Saved inside the epoch's end (Lightning's trainer.save_checkpoint in a hook), the checkpoint said
    "epoch 0, at its end": the resume ended epoch 0 again, a second row of NaN means in history."""
    class SaveAtEpochEnd(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 0:
                trainer.checkpoints[0].save(trainer, wait=True)

    class CrashAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 4:
                raise RuntimeError("crash")

    def run(workdir, *extra, resume=False):
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=3, workdir=workdir,
                          callbacks=[*extra, Checkpoint(every_n_epochs=None)])
        return trainer.fit(ArrayLoader(data, 32, shuffle=False), resume=resume)

    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "run", SaveAtEpochEnd(), CrashAt())
    resumed = run(tmp_path / "run", resume=True)
    unbroken = run(tmp_path / "ref")
    assert [(h["epoch"], h["loss"]) for h in resumed] == [(h["epoch"], h["loss"]) for h in unbroken]


def test_a_resume_trains_with_the_hyperparameters_it_was_built_with(tmp_path, data):
    """inject_hyperparams keeps b1, b2, weight decay in the optimizer state: a resume with changed
    values (the recipes' --b1, --weight-decay) trained on with the saved ones, silently, while the
    warning named the new ones and a changed learning rate (a schedule) did change."""
    from optax import tree_utils

    from trainer import make_optimizer

    def run(max_steps, resume=False, **settings):
        tx = make_optimizer("adamw", learning_rate=1e-2, **settings)
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=max_steps, workdir=tmp_path,
                          callbacks=[Checkpoint(every_n_epochs=None)])
        trainer.fit(ArrayLoader(data, 32), resume=resume)
        return trainer

    run(3, b1=0.9, weight_decay=0.1)
    resumed = run(6, resume=True, b1=0.5, b2=0.95, weight_decay=0.3)
    state = resumed.state.opt_state
    assert resumed.step == 6
    assert [float(tree_utils.tree_get(state, name)) for name in ("b1", "b2", "weight_decay")] == pytest.approx(
        [0.5, 0.95, 0.3], rel=1e-6)


@pytest.mark.parametrize("record_at, term_at", [(6, 7), (3, 5)])
def test_a_recorded_value_not_yet_logged_survives_a_preemption_into_its_window(tmp_path, data, record_at, term_at):
    """The preempted fit writes no interim record, and trainer.record's values live in memory: one recorded
    after the last window and before the signal was never logged by the resumed run; and one a window taken
    before the save writes must not be written again by the resumed run."""

    class RecordAt6(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == record_at:
                trainer.record("probe", 6.0)

    class TermAt7(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == term_at:
                jax.block_until_ready(metrics)
                os.kill(os.getpid(), signal.SIGTERM)

    def run(workdir, *extra, resume=False):
        callbacks = [RecordAt6(), MetricsLogger([JsonlWriter(workdir / "metrics.jsonl")], log_every=5),
                     Checkpoint(every_n_steps=3, every_n_epochs=None), *extra]
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=12, workdir=workdir,
                callbacks=callbacks).fit(ArrayLoader(data, 8, shuffle=False), resume=resume)

    run(tmp_path / "unbroken")
    with pytest.raises(SystemExit):
        run(tmp_path / "run", TermAt7())
    run(tmp_path / "run", resume=True)
    logged = [(tmp_path / name / "metrics.jsonl").read_text() for name in ("unbroken", "run")]
    assert logged[0] == logged[1] and logged[0].count('"probe": 6.0') == 1


class RecordAt(Callback):
    def __init__(self, *steps):
        self.steps = steps

    def on_step_end(self, trainer, step, metrics):
        if step in self.steps:
            trainer.record("probe", float(step))


def logged_lines(path):
    return Path(path).read_text().splitlines()


def test_a_resume_after_a_crash_or_a_finished_fit_logs_the_config_and_each_record_once(tmp_path, data):
    """A checkpoint saved before the logger wrote the config (a crash before the first window) or its last
    partial window (Checkpoint listed first) recorded neither: the resumed run wrote them again."""
    def run(workdir, callbacks, max_steps, resume=False):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=max_steps, workdir=workdir,
                callbacks=callbacks).fit(ArrayLoader(data, 8, shuffle=False), resume=resume)

    class CrashAt3(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 3:
                raise RuntimeError("crash")

    logger = lambda: MetricsLogger([JsonlWriter(tmp_path / "crash" / "m.jsonl")], log_every=5)  # noqa: E731
    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "crash", [logger(), Checkpoint(every_n_steps=2, every_n_epochs=None), CrashAt3()], 8)
    run(tmp_path / "crash", [logger(), Checkpoint(every_n_steps=2, every_n_epochs=None)], 8, resume=True)
    assert sum('"hparams"' in line for line in logged_lines(tmp_path / "crash" / "m.jsonl")) == 1

    for order in ("checkpoint first", "logger first"):
        workdir = tmp_path / order.replace(" ", "_")
        logger = MetricsLogger([JsonlWriter(workdir / "m.jsonl")], log_every=4)
        checkpoint = Checkpoint(every_n_steps=None, every_n_epochs=None)  # the save at fit's end only
        callbacks = [checkpoint, RecordAt(5), logger] if order == "checkpoint first" else [RecordAt(5), logger, checkpoint]
        run(workdir, callbacks, 6)
        run(workdir, callbacks, 12, resume=True)
        assert sum('"probe"' in line for line in logged_lines(workdir / "m.jsonl")) == 1, order


def test_a_value_recorded_at_a_checkpoint_step_after_the_logger_reaches_that_steps_window(tmp_path, data):
    """The logger wrote its window in its own on_step_end when a checkpoint was due, before later callbacks
    of that step recorded: their value went to the next window."""
    logger = MetricsLogger([JsonlWriter(tmp_path / "m.jsonl")], log_every=4)
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=12, workdir=tmp_path,
            callbacks=[logger, RecordAt(4, 8, 12), Checkpoint(every_n_steps=4, every_n_epochs=None)]).fit(
        ArrayLoader(data, 8, shuffle=False))
    assert [(step, s["probe"]) for step, s in logger.history if "probe" in s] == [(4, 4.0), (8, 8.0), (12, 12.0)]
