"""Gradient-norm probe, NaN detection (raise / skip), early stopping, evaluator cadence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import (Callback, Checkpoint, EarlyStopping, Evaluator, GradNormMonitor, GradNormWarning, NaNDetector,
                       NonFiniteError)
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, Trainer


def params_of(trainer):
    return [np.array(x) for x in jax.tree.leaves(trainer.state.params)]


class Snapshots(Callback):
    """Copies the parameters after every step (a test may sync; the library may not)."""

    def __init__(self):
        self.after = {}

    def on_step_end(self, trainer, step, metrics):
        self.after[step] = params_of(trainer)


class FirstMetrics(Callback):
    def __init__(self):
        self.metrics = None

    def on_step_end(self, trainer, step, metrics):
        if step == 1:
            self.metrics = jax.device_get(metrics)


def test_grad_norm_probe_equals_optax_global_norm_of_hand_gradients(data):
    batch = next(iter(ArrayLoader(data, 32, shuffle=False)))
    model = TinyMLP(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_of(p):
        logits = nnx.merge(graphdef, p, rest)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    grads = jax.grad(loss_of)(params)
    spy = FirstMetrics()
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[GradNormMonitor(per_layer=True), spy])
    trainer.fit(ArrayLoader(data, 32, shuffle=False))
    assert spy.metrics["grad_norm"] == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    assert spy.metrics["grad_norm/l1"] == pytest.approx(float(optax.tree.norm(grads["l1"])), rel=1e-5)
    assert set(spy.metrics) >= {"grad_norm/l1", "grad_norm/l2"}


def test_grad_norm_out_of_range_warns_with_step_and_norm_once_per_excursion(model, data):
    """Warned when the norm leaves the range, not at every later check outside it (a converged model's
    small norm warned at every check); every check outside is kept in ``warnings``."""
    monitor = GradNormMonitor(every=2, warn_below=None, warn_above=1e-6)
    with pytest.warns(GradNormWarning, match=r"gradient norm [\d.e+-]+ at step 2 .*exploding") as caught:
        Trainer(model, optax.sgd(0.1), max_steps=7, callbacks=[monitor]).fit(ArrayLoader(data, 32))
    assert [s for s, _ in monitor.warnings] == [2, 4, 6]
    assert len([w for w in caught if issubclass(w.category, GradNormWarning)]) == 1


def test_grad_norm_per_layer_names_each_layer_of_a_sequential(data):
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 3, rngs=nnx.Rngs(1)))
    spy = FirstMetrics()
    Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[GradNormMonitor(per_layer=True), spy]).fit(
        ArrayLoader(data, 32, shuffle=False))
    assert {k for k in spy.metrics if k.startswith("grad_norm/")} == {"grad_norm/layers/0", "grad_norm/layers/2"}
    parts = np.hypot(spy.metrics["grad_norm/layers/0"], spy.metrics["grad_norm/layers/2"])
    assert parts == pytest.approx(float(spy.metrics["grad_norm"]), rel=1e-5)


def nan_at(step, data, batch=16):
    """The data with NaN inputs in the batch of the given 1-based step (no shuffling)."""
    x = data["x"].copy()
    x[(step - 1) * batch] = np.nan
    return ArrayLoader({"x": x, "label": data["label"]}, batch, shuffle=False)


@pytest.mark.parametrize("check_every", [1, 10])
def test_nan_raise_names_the_step_and_keeps_previous_parameters(model, data, check_every):
    snaps = Snapshots()
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=2, callbacks=[snaps, NaNDetector(check_every=check_every)])
    with pytest.raises(NonFiniteError, match=r"non-finite loss and gradients at step 3 \(learning rate unknown"):
        trainer.fit(nan_at(3, data))
    assert all(np.array_equal(a, b) for a, b in zip(params_of(trainer), snaps.after[2]))
    assert all(np.isfinite(p).all() for p in params_of(trainer))
    model_params = [np.array(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert all(np.array_equal(a, b) for a, b in zip(model_params, snaps.after[2]))


def test_after_a_nan_raise_the_step_counts_the_updates_and_a_refit_says_how_to_go_on(tmp_path, data):
    """The no-op steps dispatched after the halt advanced trainer.step (5 for 2 updates), and a second
    fit raised the old NonFiniteError straight away; fit(resume=True) from a checkpoint trains on."""
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, workdir=tmp_path,
                      callbacks=[NaNDetector(check_every=5), Checkpoint(every_n_steps=1, every_n_epochs=None)])
    with pytest.raises(NonFiniteError, match="at step 3"):
        trainer.fit(nan_at(3, data, batch=16))  # checked at step 5: steps 4 and 5 ran halted
    counts = [int(x) for x in jax.tree.leaves(trainer.state.opt_state) if np.ndim(x) == 0]
    assert trainer.step == int(trainer.state.step) == 2 and counts == [2]
    with pytest.raises(RuntimeError, match=r"halted at step 3 .* those of step 2.*fit\(..., resume=True\)"):
        trainer.fit(nan_at(3, data, batch=16))
    clean = ArrayLoader(data, 16, shuffle=False)
    trainer.fit(clean, resume=True)  # from checkpoint step 2, on the mended data
    assert trainer.step == 12


def test_nan_raise_reports_the_learning_rate_when_injected(model, data):
    from trainer import make_optimizer
    tx = make_optimizer("adam", learning_rate=0.0125)
    with pytest.raises(NonFiniteError, match=r"at step 2 \(learning rate 0.0125\)"):
        Trainer(model, tx, max_steps=6, callbacks=[NaNDetector()]).fit(nan_at(2, data))

    schedule = lambda count: jnp.where(count < 1, 0.1, jnp.inf) * 0.0  # noqa: E731  (NaN from step 2, whose
    # finite gradients are applied: step 3's loss is the first non-finite)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    with pytest.raises(NonFiniteError, match=r"at step 3 \(learning rate nan: the schedule itself is not finite\)\. "
                                              r"The parameters are not finite already: an update before this step"):
        Trainer(model, tx, max_steps=6, callbacks=[NaNDetector()]).fit(ArrayLoader(data, 16))
    rsqrt = optax.inject_hyperparams(optax.sgd)(learning_rate=lambda count: 0.1 / jnp.sqrt(count.astype(jnp.float32)))
    with pytest.raises(NonFiniteError, match=r"at step 2 \(learning rate 0.1\)\. The parameters are not finite "
                                              r"already"):  # infinite at step 1 only: it said nothing was written
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), rsqrt, max_steps=6, callbacks=[NaNDetector()]).fit(ArrayLoader(data, 16))


def test_nan_skip_leaves_state_bitwise_unchanged_and_training_continues(model, data):
    snaps = Snapshots()
    opt_states = {}

    class OptSnap(Callback):
        def on_step_end(self, trainer, step, metrics):
            opt_states[step] = [np.array(x) for x in jax.tree.leaves(trainer.state.opt_state)]

    detector = NaNDetector(policy="skip", check_every=1)
    trainer = Trainer(model, optax.adam(1e-2), max_steps=6, callbacks=[snaps, OptSnap(), detector])
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        history = trainer.fit(nan_at(3, data))
    assert all(np.array_equal(a, b) for a, b in zip(snaps.after[3], snaps.after[2]))
    assert all(np.array_equal(a, b) for a, b in zip(opt_states[3], opt_states[2]))
    assert not all(np.array_equal(a, b) for a, b in zip(snaps.after[4], snaps.after[3]))
    assert trainer.step == 6 and detector.skipped == 1
    assert history[0]["nonfinite_total"] == 1 and np.isfinite(history[0]["loss"])


class BatchNormNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden, self.norm = nnx.Linear(8, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
        self.drop, self.out = nnx.Dropout(0.2, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(nnx.relu(self.norm(self.hidden(x)))))


def host_leaves(tree):
    """Every leaf on the host (RNG keys as their key data)."""
    return [np.array(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("k", [1, 4])
def test_nan_skip_keeps_batch_statistics_and_rng_counters_of_a_skipped_step(data, k):
    """A skipped step changes no model state: BatchNorm's running statistics do not take in the bad
    batch (they would be NaN for good) and dropout's counters do not advance, single step or fused."""
    states = {}

    class ModelState(Callback):
        def on_step_end(self, trainer, step, metrics):
            states[step] = host_leaves(trainer.state.model_state)

    trainer = Trainer(BatchNormNet(nnx.Rngs(0)), optax.adam(1e-2), max_steps=8, steps_per_execution=k,
                      callbacks=[ModelState(), NaNDetector(policy="skip", check_every=4)])
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        trainer.fit(nan_at(5, data))
    final = host_leaves(trainer.state.model_state)
    assert all(np.isfinite(x).all() for x in final)
    if k == 1:  # the step before the bad one and the bad one leave the same statistics and RNG counters
        assert len(states[5]) >= 4 and all(np.array_equal(a, b) for a, b in zip(states[5], states[4]))
        assert not all(np.array_equal(a, b) for a, b in zip(states[6], states[5]))


def test_nan_skip_raises_after_too_many_in_a_row(model, data):
    x = data["x"].copy()
    x[32:] = np.nan  # every step from the third on is bad
    loader = ArrayLoader({"x": x, "label": data["label"]}, 16, shuffle=False)
    snaps = Snapshots()
    trainer = Trainer(model, optax.adam(1e-2), max_steps=20,
                      callbacks=[snaps, NaNDetector(policy="skip", max_consecutive_skips=3, check_every=5)])
    with pytest.raises(NonFiniteError, match="3 steps in a row had non-finite values, the last at step 5"):
        trainer.fit(loader)
    assert all(np.array_equal(a, b) for a, b in zip(params_of(trainer), snaps.after[2]))


def test_bad_nan_policy_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        NaNDetector(policy="ignore")


class Scripted(Callback):
    """Puts a scripted score into each epoch's logs (runs before EarlyStopping)."""

    def __init__(self, scores):
        self.scores = scores

    def on_epoch_end(self, trainer, epoch, logs):
        logs["score"] = self.scores[epoch]


class EpochParams(Callback):
    def __init__(self):
        self.at = {}

    def on_epoch_end(self, trainer, epoch, logs):
        self.at[epoch] = params_of(trainer)


def test_early_stopping_stops_at_expected_epoch_and_restores_best(model, data):
    snaps = EpochParams()
    stopper = EarlyStopping(monitor="score", mode="max", patience=2)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=10,
                      callbacks=[snaps, Scripted([0.5, 0.6, 0.55, 0.58, 0.9, 0.9]), stopper])
    trainer.fit(ArrayLoader(data, 32))
    assert trainer.epoch == 4 and stopper.stopped_epoch == 3  # epochs 2 and 3 did not beat epoch 1
    assert "score did not improve for 2 checks" in trainer.stop_reason
    assert stopper.best == 0.6 and stopper.best_epoch == 1
    assert all(np.array_equal(a, b) for a, b in zip(params_of(trainer), snaps.at[1]))
    assert stopper.state_dict()["wait"] == 2


def test_early_stopping_after_a_resume_restores_the_best_from_its_checkpoint_or_says_it_cannot(data, tmp_path):
    """The best parameters are held in memory, not in the checkpoint's JSON: after a resume past the
    best epoch they come from that epoch's checkpoint ("restored from checkpoint step 6"), as in the
    unbroken run; with that checkpoint pruned the stop says it kept the last parameters."""
    scores = [0.5, 0.6, 0.55, 0.58, 0.9, 0.9]

    def run(workdir, *extra, resume=False, keep=5):
        snaps, stopper = EpochParams(), EarlyStopping(monitor="score", mode="max", patience=2)
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=10, workdir=workdir,
                          callbacks=[snaps, Scripted(scores), stopper, Checkpoint(max_to_keep=keep), *extra])
        trainer.fit(ArrayLoader(data, 32), resume=resume)
        return trainer, snaps

    class StopAfter(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 2:
                trainer.request_stop("preempted")

    unbroken, snaps = run(tmp_path / "a")
    run(tmp_path / "b", StopAfter())
    resumed, _ = run(tmp_path / "b", resume=True)
    assert resumed.stop_reason.endswith("best 0.6 at step 6 (restored from checkpoint step 6)")
    assert all(np.array_equal(a, b) for a, b in zip(params_of(resumed), params_of(unbroken)))
    assert all(np.array_equal(a, b) for a, b in zip(params_of(resumed), snaps.at[1]))
    run(tmp_path / "c", StopAfter(), keep=1)
    with pytest.warns(RuntimeWarning, match=r"best parameters \(step 6\) are not kept across a resume"):
        pruned, snaps = run(tmp_path / "c", resume=True, keep=1)
    assert pruned.stop_reason.endswith("(not restored: no checkpoint of that step remains)")
    assert all(np.array_equal(a, b) for a, b in zip(params_of(pruned), snaps.at[3]))


def test_early_stopping_skips_the_first_epochs_and_needs_to_beat_a_baseline(model, data):
    """Keras's start_from_epoch and baseline (their hints pointed to subclasses, and the one for
    start_from_epoch did not work for an eval/ monitor, checked at on_eval_end)."""
    snaps = EpochParams()
    late = EarlyStopping(monitor="score", mode="max", patience=2, start_from_epoch=3)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=10,
                      callbacks=[snaps, Scripted([0.9, 0.1, 0.1, 0.5, 0.4, 0.3, 0.2]), late])
    trainer.fit(ArrayLoader(data, 32))  # epochs 0-2 are not checked: epoch 0's 0.9 is no best to beat
    assert late.best == 0.5 and late.best_epoch == 3 and late.stopped_epoch == 5
    assert all(np.array_equal(a, b) for a, b in zip(params_of(trainer), snaps.at[3]))
    # Keras 3's baseline: a check that improves never stops the run, but the patience restarts only once a check
    # beats the baseline; the best check is the one restored, baseline or not (the review's comparison with Keras)
    for scores, stop_epoch, best_epoch in (([0.5, 0.6, 0.55, 0.58, 0.9], 2, 1), ([0.6, 0.5, 0.4], 1, 0),
                                           ([0.5, 0.6, 0.65, 0.68, 0.69, 0.8, 0.7, 0.7, 0.7], 7, 5)):
        snaps = EpochParams()
        below = EarlyStopping(monitor="score", mode="max", patience=2, baseline=np.float32(0.7))
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=10,
                          callbacks=[snaps, Scripted(scores), below])
        trainer.fit(ArrayLoader(data, 32))
        assert below.stopped_epoch == stop_epoch and below.best_epoch == best_epoch, scores
        assert all(np.array_equal(a, b) for a, b in zip(params_of(trainer), snaps.at[best_epoch]))
        assert trainer.stop_reason.endswith("none beat the baseline 0.7") == (max(scores[:stop_epoch + 1]) < 0.7)
    with pytest.raises(ValueError, match=r"start_from_epoch=-1 must be an integer >= 0"):
        EarlyStopping(start_from_epoch=-1)


def test_early_stopping_when_every_check_was_nan_stops_and_says_so(data):
    stopper = EarlyStopping(monitor="score", mode="min", patience=2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=10,
                      callbacks=[Scripted([float("nan")] * 10), stopper])
    trainer.fit(ArrayLoader(data, 32))
    assert trainer.epoch == 2 and stopper.best is None
    assert trainer.stop_reason.endswith("no check gave a number (every one was NaN)")


def test_early_stopping_on_eval_loss_with_min_delta(data):
    stopper = EarlyStopping(monitor="eval/loss", patience=1, min_delta=10.0, restore_best=False)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=10, callbacks=[stopper])
    trainer.fit(ArrayLoader(data, 32), eval_data=ArrayLoader(data, 32, shuffle=False))
    assert trainer.epoch == 2  # no improvement can beat a min_delta of 10


def test_early_stopping_unknown_monitor_lists_available_after_the_epoch_checkpoint(model, data, tmp_path):
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=3, workdir=tmp_path,
                      callbacks=[EarlyStopping("los", mode="min"), Checkpoint(async_save=False)])
    with pytest.raises(KeyError, match=r"monitors 'los'.*available: \['accuracy', 'loss'\]"):
        trainer.fit(ArrayLoader(data, 32))
    assert trainer.epoch == 1  # stopped after the first epoch, whose checkpoint was written
    steps = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == [trainer.step] and trainer.step == len(ArrayLoader(data, 32))


def test_mode_auto_reads_the_direction_from_the_name_or_asks_for_it():
    assert [EarlyStopping(name).mode for name in ("eval/loss", "eval/accuracy", "top1_error", "eval/bpc", "acc")] == [
        "min", "max", "min", "min", "max"]
    assert Checkpoint(monitor="eval/accuracy", keep_best=1).mode == "max"
    assert EarlyStopping("score", mode="max").mode == "max"
    with pytest.raises(ValueError, match=r"EarlyStopping\(monitor='score'\) cannot tell from the name.*mode='max'"):
        EarlyStopping("score")
    with pytest.raises(ValueError, match=r"Checkpoint\(monitor='score'\) cannot tell"):
        Checkpoint(monitor="score", keep_best=1)
    with pytest.raises(ValueError, match="mode='best' is not known"):
        EarlyStopping("loss", mode="best")
    for unclear in ("eval/previous_best", "eval/terrain_score", "loss_over_accuracy"):  # no word, or both ways
        with pytest.raises(ValueError, match="cannot tell from the name"):
            EarlyStopping(unclear)
    assert [EarlyStopping(name).mode for name in ("val_loss", "eval/top1_acc", "error_rate")] == ["min", "max", "min"]
    assert [EarlyStopping(name).mode for name in ("eval/loss2", "eval/valLoss", "eval/mIoU", "eval/f1score",
                                                  "eval/top5acc")] == ["min", "min", "max", "max", "max"]


def test_early_stopping_on_an_eval_metric_without_evaluation_warns_then_stops_after_one_epoch(model, data):
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=3, callbacks=[EarlyStopping("eval/loss")])
    with pytest.warns(UserWarning, match="monitors 'eval/loss', but this fit has no Evaluator or eval_data"), \
            pytest.raises(KeyError, match="which no evaluation or epoch reported"):
        trainer.fit(ArrayLoader(data, 32))
    assert trainer.epoch == 1


def test_early_stopping_on_an_epoch_whose_every_step_was_skipped_names_the_skips(model, data):
    x = np.full_like(data["x"], np.nan)  # every batch non-finite: the epoch has no train metrics
    detector = NaNDetector(policy="skip", max_consecutive_skips=100)
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=3, callbacks=[detector, EarlyStopping("loss")])
    with pytest.warns(RuntimeWarning, match="skipped 6 step"), \
            pytest.raises(KeyError, match=r"epoch 0 did not report: every step of it was skipped as non-finite "
                                          r"\(nonfinite_total=6\)"):
        trainer.fit(ArrayLoader({"x": x, "label": data["label"]}, 16, shuffle=False))
    assert trainer.epoch == 1

    class CleanThenBad:  # after a clean epoch (the monitor seen), every step of the next skipped
        def __init__(self):
            self.passes = 0

        def __len__(self):
            return 6

        def __iter__(self):
            self.passes += 1
            return iter(ArrayLoader(data if self.passes == 1 else {"x": x, "label": data["label"]}, 16, shuffle=False))

    detector = NaNDetector(policy="skip", max_consecutive_skips=100)
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=3, callbacks=[detector, EarlyStopping("loss")])
    with pytest.warns(RuntimeWarning, match="skipped .* step"), \
            pytest.raises(KeyError, match=r"epoch 1 did not report: every step of it was skipped"):
        trainer.fit(CleanThenBad())
    assert trainer.epoch == 2


def test_early_stopping_with_a_step_evaluator_checks_at_its_evaluations_only(model, data):
    evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_steps=2, every_n_epochs=None)
    stopper = EarlyStopping("eval/loss", patience=100)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=3, callbacks=[evaluator, stopper])
    trainer.fit(ArrayLoader(data, 32))  # 3 steps an epoch: the epochs' logs have no eval/loss
    assert trainer.epoch == 3 and trainer.step == 9 and stopper.best_step in (2, 4, 6, 8)


def test_early_stopping_on_a_train_metric_beside_an_evaluator_checks_each_epoch_without_a_warning(model, data):
    """It warned that it 'never saw' 'loss' (the evaluator reports eval/...), though it checked it every epoch."""
    import warnings

    stopper = EarlyStopping(monitor="loss", patience=100)
    evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False, drop_remainder=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        history = Trainer(model, optax.adam(1e-2), max_epochs=3, callbacks=[evaluator, stopper]).fit(ArrayLoader(data, 32))
    assert stopper.best == min(row["loss"] for row in history)


def test_early_stopping_waits_for_a_step_evaluator_longer_than_an_epoch_and_warns_of_a_name_never_seen(model, data):
    evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_steps=4, every_n_epochs=None)
    stopper = EarlyStopping("eval/loss", patience=100)  # 3 steps an epoch: epoch 0 ends before any evaluation
    Trainer(model, optax.adam(1e-2), max_epochs=3, callbacks=[evaluator, stopper]).fit(ArrayLoader(data, 32))
    assert stopper.best_step in (4, 8)
    misspelt = EarlyStopping("eval/los", mode="min")
    with pytest.warns(RuntimeWarning, match=r"never saw 'eval/los': the evaluations reported \['eval/accuracy', "
                                            r"'eval/loss'\]"):
        Trainer(model, optax.adam(1e-2), max_epochs=3,
                callbacks=[Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_steps=4, every_n_epochs=None),
                           misspelt]).fit(ArrayLoader(data, 32))


def test_a_step_evaluation_at_an_epochs_end_runs_once_and_counts_once(model, data):
    """Evaluator(every_n_steps=3) with its default every_n_epochs=1 on 3-step epochs evaluated twice
    at each epoch's end; EarlyStopping took the copy for no improvement and stopped at patience 1."""
    class Count(Callback):
        steps = []

        def on_eval_end(self, trainer, metrics):
            self.steps.append(trainer.step)

    evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_steps=3)
    stopper = EarlyStopping("eval/loss", patience=1)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=3, callbacks=[evaluator, Count(), stopper])
    trainer.fit(ArrayLoader(data, 32))  # an easy problem: eval/loss falls at every check
    assert Count.steps == [3, 6, 9] and trainer.step == 9 and stopper.wait == 0
    assert [h["eval/loss"] for h in trainer.history] == [m["eval/loss"] for _, m in evaluator.history]


def test_early_stopping_waits_for_an_evaluator_every_two_epochs(model, data):
    """Evaluator(every_n_epochs=2): epoch 0 has no eval/loss, and EarlyStopping stopped the run with a
    KeyError telling to add the evaluator it had."""
    evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_epochs=2)
    stopper = EarlyStopping("eval/loss", patience=2)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=4, callbacks=[evaluator, stopper])
    trainer.fit(ArrayLoader(data, 32))
    assert trainer.epoch == 4 and ["eval/loss" in h for h in trainer.history] == [False, True, False, True]
    assert stopper.best_step == 12


def test_a_misspelt_eval_monitor_with_eval_data_still_stops_with_the_names_there(model, data):
    """Waiting for an evaluator of the monitor's prefix (every N epochs) made a misspelt eval/acc silent:
    no check, no stop, no warning, for the whole run."""
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=5, callbacks=[EarlyStopping("eval/acc", mode="max")])
    with pytest.raises(KeyError, match=r"monitors 'eval/acc', which no evaluation or epoch reported; available: "
                                       r"\['accuracy', 'eval/accuracy', 'eval/loss', 'loss'\]"):
        trainer.fit(ArrayLoader(data, 32), eval_data=ArrayLoader(data, 32, shuffle=False))
    assert trainer.epoch == 1


def test_a_second_fit_after_an_early_stop_with_restore_best_trains_on(model, data):
    from callbacks import Callback

    class Worse(Callback):  # a score that only falls: the best is the first check
        def on_epoch_end(self, trainer, epoch, logs):
            logs["score"] = -float(epoch)

    stopper = EarlyStopping("score", mode="max", patience=1)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=3, callbacks=[Worse(), stopper])
    trainer.fit(ArrayLoader(data, 32))
    assert stopper.stopped_epoch == 1 and "(restored)" in trainer.stop_reason
    trainer.max_epochs = 6
    trainer.fit(ArrayLoader(data, 32))  # the restored best is the trainer's own copy, not a used-up one
    assert trainer.epoch >= 3


def test_evaluator_counts_every_example_once_with_batch_128():
    data = make_data(n=1000, seed=3)
    model = TinyMLP(rngs=nnx.Rngs(0))
    evaluator = Evaluator(ArrayLoader(data, 128, shuffle=False, drop_remainder=False), every_n_steps=5, every_n_epochs=None)
    trainer = Trainer(model, optax.adam(1e-2), max_steps=10, callbacks=[evaluator])
    trainer.fit(ArrayLoader(data, 100))
    assert [s for s, _ in evaluator.history] == [5, 10]
    logits = np.asarray(trainer.model(data["x"]))
    assert evaluator.last_metrics["eval/accuracy"] == pytest.approx((logits.argmax(1) == data["label"]).mean(), abs=1e-7)
    assert trainer._eval_step._cache_size() == 1  # the padded last batch did not recompile


def test_bad_evaluator_cadence_is_refused(data):
    with pytest.raises(ValueError, match="every_n_steps or every_n_epochs"):
        Evaluator(data, every_n_steps=None, every_n_epochs=None)


def test_nan_epoch_end_check_reads_the_last_counter_without_rebuilding_the_state(model, data, monkeypatch):
    """At an epoch's end the detector reads the last step's counter, not ``trainer.state`` (whose
    rebuild and repack cost ~28 ms an epoch on the CNN), and a bad step between checks still raises there."""
    from trainer.carry import Carry

    rebuilds = []
    structure = Carry._structure_state

    def counted(self):
        rebuilds.append(self._state_flat is not None)
        structure(self)

    monkeypatch.setattr(Carry, "_structure_state", counted)
    clean = Trainer(model, optax.adam(1e-2), max_epochs=3, callbacks=[NaNDetector(check_every=1000)])
    clean.fit(ArrayLoader(data, 16, shuffle=False))
    assert clean.epoch == 3 and sum(rebuilds) == 1  # the fit's end hands the model its state; no epoch end
    with pytest.raises(NonFiniteError, match=r"non-finite loss and gradients at step 3 "):
        Trainer(TinyMLP(rngs=nnx.Rngs(1)), optax.adam(1e-2), max_epochs=2,
                callbacks=[NaNDetector(check_every=1000)]).fit(nan_at(3, data))


def test_a_skipped_step_leaves_the_means_finite_with_padded_batches(data):
    """With ragged_batches="pad" the steps are weighed by their real rows: a skipped step's NaN loss times
    its zero weight was NaN, and made the epoch's loss, the logged window and EarlyStopping's checks NaN."""
    x = data["x"].copy()
    x[20] = np.inf  # one row of the second batch (no shuffling)
    loader = ArrayLoader({"x": x, "label": data["label"]}, 16, shuffle=False, drop_remainder=False)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, ragged_batches="pad",
                      callbacks=[NaNDetector(policy="skip", check_every=1)])
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        history = trainer.fit(loader)
    assert [h["nonfinite_total"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["accuracy"]) for h in history)


def test_grad_norm_warns_about_non_finite_gradients(model, data):
    """A NaN norm compares false with both bounds: it passed as inside the range, unwarned."""
    poisoned = {k: np.array(v) for k, v in data.items()}
    poisoned["x"][40] = np.nan  # in the second batch of 32
    monitor = GradNormMonitor(every=1)
    with pytest.warns(GradNormWarning, match=r"gradient norm nan at step 2 .*non-finite gradients"):
        Trainer(model, optax.sgd(0.1), max_steps=3, callbacks=[monitor]).fit(ArrayLoader(poisoned, 32, shuffle=False))
    assert [s for s, n in monitor.warnings if np.isnan(n)] == [2, 3]  # the parameters are NaN after it


def test_two_evaluators_of_one_prefix_are_refused_when_fit_starts(model, data):
    """fit(eval_data=...) and an Evaluator of its own, both "eval/": the epoch's row kept the second's
    numbers under the first's names, and the logs had two eval/loss at one step."""
    loader = ArrayLoader(data, 32, shuffle=False)
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=1, callbacks=[Evaluator(loader)])
    with pytest.raises(ValueError, match=r"fit\(eval_data=...\) and Evaluator\(ArrayLoader\) both report under "
                                         r"prefix 'eval/'.*prefix='test/'"):
        trainer.fit(ArrayLoader(data, 32), eval_data=loader)
    assert trainer.step == 0
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=1, callbacks=[Evaluator(loader, prefix="test/")])
    trainer.fit(ArrayLoader(data, 32), eval_data=loader)
    assert {"eval/loss", "test/loss"} <= set(trainer.history[-1])


@pytest.mark.parametrize("resume", [False, True])  # True: a recipe's --resume that finds nothing starts fresh
def test_callbacks_reused_by_a_second_trainer_start_afresh(tmp_path, data, resume):
    """A sweep sharing one callbacks list: EarlyStopping put the first run's best parameters into the
    second model, an Evaluator gave the first run's result as the second's (same last step), and
    Checkpoint saved into the first run's workdir."""
    loader = ArrayLoader(data, 32, shuffle=False)
    stopper = EarlyStopping("eval/loss", patience=1)
    evaluator = Evaluator(loader)  # every epoch, and where max_steps cuts one short
    checkpoint = Checkpoint(every_n_epochs=None)
    results = []
    for run, lr in enumerate((3e-2, 0.0)):  # the second run's loss stays above the first's
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(lr), max_steps=4, workdir=tmp_path / f"run{run}",
                          callbacks=[evaluator, stopper, checkpoint])
        trainer.fit(ArrayLoader(data, 16), resume=resume)  # 4 steps of 6: an epoch cut short, evaluated at step 4
        results.append((trainer.history[-1]["eval/loss"], trainer.evaluate(loader)["loss"]))
        assert stopper.best_step == 4 and stopper.best == pytest.approx(results[-1][0], rel=1e-6)
        assert (tmp_path / f"run{run}" / "checkpoints" / "step_4").is_dir()
    for logged, now in results:
        assert logged == pytest.approx(now, rel=1e-6)
    assert results[0][0] != pytest.approx(results[1][0], rel=1e-3)


def test_a_grad_norm_monitor_reused_for_a_fresh_run_lists_only_that_runs_checks(model, data):
    monitor = GradNormMonitor(every=1, warn_below=None, warn_above=1e-9)  # every check is outside
    for _ in range(2):
        with pytest.warns(Warning, match="gradient norm"):
            Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=3, callbacks=[monitor]).fit(ArrayLoader(data, 32))
        assert [step for step, _ in monitor.warnings] == [1, 2, 3]


def test_a_checkpoint_keeps_the_history_as_it_was_when_saved():
    """Rows of numbers are copied as dicts (deepcopy took most of a save after thousands of epochs); a row a
    callback put a list into is copied deeply."""
    from trainer.checkpoint import _history_copy

    history = [{"loss": 0.5, "epoch": 1, "partial_epoch": True}, {"loss": 0.4, "sizes": [1, 2]}]
    saved = _history_copy(history)
    history[0]["loss"] = 9.0
    history[1]["sizes"].append(3)
    assert saved == [{"loss": 0.5, "epoch": 1, "partial_epoch": True}, {"loss": 0.4, "sizes": [1, 2]}]
