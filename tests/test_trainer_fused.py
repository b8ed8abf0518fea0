"""steps_per_execution: K steps in one compiled scan, bitwise the same as K single steps."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import Callback, GradNormMonitor, MetricsLogger, MetricWriter, NaNDetector
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, Checkpoint, Trainer, last_value
from trainer.jaxprs import use_chunk_guard


class Executions(Callback):
    """Records what every on_step_start / on_step_end saw."""

    def __init__(self):
        self.starts, self.ends, self.losses = [], [], []

    def on_step_start(self, trainer, step):
        self.starts.append(step)

    def on_step_end(self, trainer, step, metrics):
        self.ends.append((step, trainer.execution_steps))
        self.losses.append(np.asarray(jax.device_get(metrics["loss"])))


class Memory(MetricWriter):
    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))


def leaves(trainer):
    """Every array of the train state (params, optimizer, model state with its RNG keys) on the host."""
    tree = (trainer.state.params, trainer.state.opt_state, trainer.state.model_state)
    raw = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
           for x in jax.tree.leaves(tree)]
    return jax.device_get(raw)


def train(k, data, *, steps=14, batch=16, callbacks=(), dropout=0.3, **kwargs):
    trainer = Trainer(TinyMLP(dropout=dropout, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=steps,
                      steps_per_execution=k, callbacks=list(callbacks), **kwargs)
    trainer.fit(ArrayLoader(data, batch, seed=1))
    return trainer


def test_fused_chunks_are_bitwise_single_steps_with_aligned_boundaries(data):
    """6 batches per epoch, K=4, 14 steps: chunks only start at multiples of 4, leftovers run alone."""
    single, fused = Executions(), Executions()
    a = train(1, data, callbacks=[single])
    b = train(4, data, callbacks=[fused])
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)  # dropout included: the RNG counters advance alike
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    # epoch 0: 1-4 fused, 5, 6 alone; epoch 1: 7, 8 alone (to realign), 9-12 fused; then 13, 14
    assert fused.ends == [(4, 4), (5, 1), (6, 1), (7, 1), (8, 1), (12, 4), (13, 1), (14, 1)]
    assert fused.starts == [1, 5, 6, 7, 8, 9, 13, 14]
    # per-step metrics of a chunk arrive stacked, one value per step, equal to the single steps'
    per_step = np.concatenate([np.reshape(x, -1) for x in fused.losses])
    np.testing.assert_array_equal(per_step, np.array([float(x) for x in single.losses], np.float32))
    assert [x.shape for x in fused.losses][:2] == [(4,), (1,)]
    assert last_value(fused.losses[0]) == fused.losses[0][-1]


def test_logged_windows_include_every_step_of_a_chunk(data):
    mem1, mem5 = Memory(), Memory()
    train(1, data, steps=20, callbacks=[MetricsLogger([mem1], log_every=10)])
    train(5, data, steps=20, callbacks=[MetricsLogger([mem5], log_every=10)])
    assert [s for s, _ in mem5.scalars] == [10, 20]
    assert mem1.scalars == mem5.scalars


def test_the_fused_program_compiles_once_over_epochs(data):
    trainer = train(3, make_data(n=96), steps=30, batch=16)  # 6 batches: two chunks per epoch
    assert trainer._train_steps.fused._cache_size() == 1
    assert trainer._train_steps.single._cache_size() == 0  # never needed
    assert trainer.compile_seconds > 0


@pytest.mark.parametrize("make", [
    lambda: MetricsLogger([], log_every=10),
    lambda: GradNormMonitor(every=6),
    lambda: NaNDetector(check_every=10),
    lambda: Checkpoint("unused", every_n_steps=6),
])
def test_intervals_that_are_not_multiples_of_k_are_refused(make):
    callback = make()
    name = type(callback).__name__
    with pytest.raises(ValueError, match=rf"{name}\(\w+=\d+\) is not a multiple of steps_per_execution=4.*Use \w+=\d+"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, steps_per_execution=4, callbacks=[callback])


def test_a_custom_callback_declares_its_intervals():
    class EveryN(Callback):
        step_interval_attributes = ("every",)

        def __init__(self, every):
            self.every = every

    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, steps_per_execution=4, callbacks=[EveryN(8)])
    with pytest.raises(ValueError, match=r"EveryN\(every=6\)"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, steps_per_execution=4, callbacks=[EveryN(6)])
    for bad in ("4", 0, -4, 4.0, True):  # refused by name whatever K (0 and -4 are multiples of 4)
        for k in (1, 4):
            with pytest.raises(ValueError, match=rf"EveryN\(every={bad!r}\) must be a positive whole number of steps"):
                Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, steps_per_execution=k,
                        callbacks=[EveryN(bad)])


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_steps_per_execution(value):
    with pytest.raises(ValueError, match="steps_per_execution"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, steps_per_execution=value)


def assert_same_runs(single, fused):
    for x, y in zip(leaves(single), leaves(fused)):
        np.testing.assert_array_equal(x, y)
    assert [h["loss"] for h in single.history] == [h["loss"] for h in fused.history]
    for name, value in jax.device_get(single.state.guard).items():
        np.testing.assert_array_equal(value, jax.device_get(fused.state.guard)[name], err_msg=name)


def test_non_finite_steps_inside_a_chunk_are_skipped_as_single_steps_would_be():
    data = make_data(n=96)
    data["x"][40] = np.nan  # the third batch of 16 (no shuffling would be simpler; seed 1 is fixed)
    runs = [train(k, data, steps=12, callbacks=[NaNDetector(policy="skip", check_every=4)]) for k in (1, 4)]
    assert_same_runs(*runs)
    assert int(runs[1].state.guard["nonfinite_total"]) == int(runs[0].state.guard["nonfinite_total"]) >= 1


def test_a_guarded_chunk_is_checked_once_and_matches_guarded_single_steps(data):
    """On CPU a rolled chunk runs without the per-step conditional and reruns guarded only on a bad step."""
    assert use_chunk_guard(1, 1_000)  # a small model's rolled scan on CPU: checked once a chunk
    assert not use_chunk_guard(True, 1_000) and not use_chunk_guard(1, 10**6)
    runs = [train(k, data, steps=12, callbacks=[NaNDetector(policy="skip", check_every=4)]) for k in (1, 4)]
    assert_same_runs(*runs)
    assert int(runs[1].state.guard["nonfinite_total"]) == 0


def test_a_good_chunk_after_a_bad_one_resets_the_count_of_bad_steps_in_a_row():
    """Bad steps 4 and 9 lie in chunks 1 and 3 (K=4) with a good chunk between: with
    max_consecutive_skips=2 nothing halts, as with single steps."""
    data = make_data(n=192)
    batches = [{k: v[i * 16:(i + 1) * 16].copy() for k, v in data.items()} for i in range(12)]
    for step in (4, 9):
        batches[step - 1]["x"][0, 0] = np.nan
    runs = []
    for k in (1, 4):
        trainer = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=12, steps_per_execution=k,
                          callbacks=[NaNDetector(policy="skip", max_consecutive_skips=2, check_every=4)])
        trainer.fit(batches)
        runs.append(trainer)
    assert_same_runs(*runs)
    guard = jax.device_get(runs[1].state.guard)
    assert int(guard["nonfinite_total"]) == 2 and not bool(guard["halted"]) and int(guard["consecutive"]) == 0


class UpdateProbe(Callback):
    """A probe of what the guard shows a step: its updates and parameters (zero / kept on a skipped step)."""

    def on_fit_start(self, trainer):
        trainer.probes.append(self.probe)

    def probe(self, info):
        return {"update_abs": sum(jax.numpy.abs(u).sum() for u in jax.tree.leaves(info.updates)),
                "param_abs": sum(jax.numpy.abs(p).sum() for p in jax.tree.leaves(info.params))}


def test_a_chunk_that_halts_the_guard_matches_guarded_single_steps_step_by_step():
    """Bad steps 6 and 7 (K=4: the second chunk) with max_consecutive_skips=2: the guard halts at
    step 7 and step 8 changes nothing. Every step's loss and the guard match single steps."""
    data = make_data(n=192)
    batches = [{k: v[i * 16:(i + 1) * 16].copy() for k, v in data.items()} for i in range(12)]
    for step in (6, 7):
        batches[step - 1]["x"][0, 0] = np.nan
    runs, seen = [], []
    for k in (1, 4):
        record = Executions()
        trainer = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=12, steps_per_execution=k,
                          callbacks=[record, NaNDetector(policy="skip", max_consecutive_skips=2, check_every=4)])
        with pytest.raises(FloatingPointError, match="step 7"):
            trainer.fit(batches)
        runs.append(trainer)
        seen.append(record)
    assert_same_runs(*runs)
    guard = jax.device_get(runs[1].state.guard)
    assert bool(guard["halted"]) and int(guard["halt_step"]) == 7 and int(guard["nonfinite_total"]) == 2
    # the host notices the halt a few steps late (a lagged read): the first 8 steps are compared
    single, fused = (np.concatenate([np.ravel(x) for x in r.losses])[:8] for r in seen)
    np.testing.assert_array_equal(single, fused)  # NaN at steps 6 and 7, the halted step 8's own loss
    assert len(fused) == 8 and np.isnan(fused[5:7]).all() and np.isfinite(fused[7])


def test_probes_see_a_skipped_step_as_the_per_step_guard_shows_it():
    """On a skipped step a probe sees zero updates and the kept parameters, fused or not."""
    data = make_data(n=96)
    data["x"][40] = np.nan
    values = []
    for k in (1, 4):
        class Keep(Callback):
            def __init__(self):
                self.rows = []

            def on_step_end(self, trainer, step, metrics):
                self.rows.append(jax.device_get({n: metrics[n] for n in ("update_abs", "param_abs", "loss")}))

        keep = Keep()
        train(k, data, steps=8, callbacks=[UpdateProbe(), keep, NaNDetector(policy="skip", check_every=4)])
        values.append({n: np.concatenate([np.ravel(r[n]) for r in keep.rows]) for n in ("update_abs", "param_abs", "loss")})
    for name in values[0]:
        np.testing.assert_array_equal(values[0][name], values[1][name], err_msg=name)
    bad = np.flatnonzero(np.isnan(values[1]["loss"]))
    assert len(bad) == 1 and bad[0] > 0 and values[1]["update_abs"][bad[0]] == 0.0
    assert values[1]["param_abs"][bad[0]] == values[1]["param_abs"][bad[0] - 1]  # kept, not updated


def test_resume_from_a_chunk_boundary_checkpoint_matches_an_unbroken_run(tmp_path, data):
    straight = train(4, data, steps=20)
    first = train(4, data, steps=12, callbacks=[Checkpoint(tmp_path, every_n_steps=4)])
    assert first.step == 12
    resumed = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=20, steps_per_execution=4,
                      callbacks=[Checkpoint(tmp_path, every_n_steps=4)])
    resumed.fit(ArrayLoader(data, 16, seed=1), resume=True)
    for x, y in zip(leaves(straight), leaves(resumed)):
        np.testing.assert_array_equal(x, y)


class TinyConv(nnx.Module):
    def __init__(self, *, rngs):
        self.conv = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.dense = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv(x)), window_shape=(2, 2), strides=(2, 2))
        return self.dense(x.reshape(x.shape[0], -1))


def test_a_convolutional_step_is_unrolled_and_still_bitwise():
    """Bitwise with SGD + momentum. With Adam, on AVX-512 CPUs XLA groups the unrolled chunk's Adam
    arithmetic into other kernels than the single step's and its fused multiply-adds round the last
    bit differently (measured: <= 3 ulp after 4 steps, 6e-7 relative after 8; bitwise with
    ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` or on the AMD machine): close, not bitwise, is asserted."""
    rng = np.random.default_rng(0)
    images = {"image": rng.random((64, 8, 8, 1), np.float32), "label": rng.integers(0, 3, 64).astype(np.int32)}
    for tx, exact in ((optax.sgd(1e-2, momentum=0.9), True), (optax.adam(1e-2), False)):
        runs = []
        for k in (1, 4):
            trainer = Trainer(TinyConv(rngs=nnx.Rngs(0)), tx, max_steps=8, steps_per_execution=k)
            trainer.fit(ArrayLoader(images, 8, seed=0))
            runs.append(trainer)
        for x, y in zip(leaves(runs[0]), leaves(runs[1])):
            if exact:
                np.testing.assert_array_equal(x, y)
            else:
                np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-9)


def test_a_chunks_steps_merge_into_the_running_sums_as_one_step_after_another():
    """The packed merge of a chunk's stacked step sums is bitwise the step-by-step ``merge_sums``."""
    from trainer.sums import empty_sums, merge_steps_packed, merge_sums, to_sums

    rng = np.random.default_rng(0)
    k = 7
    metrics = {"loss": rng.normal(size=k).astype(np.float32) * 1e3,  # magnitudes where the order of adds shows
               "accuracy": rng.uniform(size=k).astype(np.float32),
               "nonfinite_total": np.cumsum(rng.integers(0, 2, size=k)).astype(np.float32),
               "_valid": np.array([True, True, False, True, False, True, True])}
    reductions = {"accuracy": "mean"}
    start = empty_sums(metrics, reductions)
    sums = {"epoch": jax.tree.map(lambda x: x + 3, start), "window": start}
    per_step = jax.vmap(lambda m: to_sums(m, reductions))(metrics)

    expected = sums
    for i in range(k):
        one = jax.tree.map(lambda x: x[i], per_step)
        expected = {name: merge_sums(acc, one) for name, acc in expected.items()}
    merged = jax.jit(merge_steps_packed)(sums, per_step)

    assert jax.tree.structure(merged) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert float(merged["window"]["nonfinite_total"].total) == metrics["nonfinite_total"][-1]  # last, not summed
    assert int(merged["window"]["loss"].count) == 5  # the two invalid steps are not counted


class SpyList(list):
    kernel_grads: list


@pytest.fixture
def built_settings(monkeypatch):
    """The ``unroll`` and ``chunk_guard`` each train step was built with (a spy on the builder;
    ``.kernel_grads``: its ``matmul_kernel_grads``)."""
    from trainer import build

    seen, real = SpyList(), build.make_train_step

    def spy(*args, **kwargs):
        seen.append((kwargs.get("unroll", 1), kwargs.get("chunk_guard", False)))
        kernel_grads.append(kwargs.get("matmul_kernel_grads", False))
        return real(*args, **kwargs)

    kernel_grads = []
    seen.kernel_grads = kernel_grads

    monkeypatch.setattr(build, "make_train_step", spy)
    return seen


def test_cpu_tuning_unrolls_a_convolutional_chunk_says_so_once_and_turns_off(built_settings, capsys):
    rng = np.random.default_rng(0)
    images = {"image": rng.random((64, 8, 8, 1), np.float32), "label": rng.integers(0, 3, 64).astype(np.int32)}
    runs = {}
    for tuning in (True, False):
        trainer = Trainer(TinyConv(rngs=nnx.Rngs(0)), optax.sgd(1e-2, momentum=0.9), max_steps=4,
                          steps_per_execution=2, cpu_tuning=tuning)
        trainer.fit(ArrayLoader(images, 8, seed=0))
        trainer.max_steps = 8
        trainer.metric_reductions["loss"] = "mean"  # a new step signature: the step is built again,
        trainer.fit(ArrayLoader(images, 8, seed=0))  # and says nothing new
        err = capsys.readouterr().err
        runs[tuning] = trainer
        if tuning:
            assert built_settings.count((True, False)) >= 2  # built again after the change
            assert len(trainer.cpu_settings) == 2 and "unrolled" in trainer.cpu_settings[1]
            assert "kernel gradients as matrix products" in trainer.cpu_settings[0]  # trainer.conv_grads
            assert err.count("CPU tuning") == 2 and err.count("unrolled") == 1 and "cpu_tuning=False" in err
            assert built_settings.kernel_grads[-1] is True
        else:
            assert built_settings[-1] == (1, False) and built_settings.kernel_grads[-1] is False
            assert trainer.cpu_settings == [] and "CPU tuning" not in err
    for x, y in zip(leaves(runs[True]), leaves(runs[False])):
        # within float rounding (the rolled loop's convolutions and XLA's own kernel gradients round differently)
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)


def test_cpu_tuning_checks_a_small_models_chunk_once_and_off_guards_each_step_alike(built_settings):
    data = make_data(n=96)
    data["x"][40] = np.nan
    runs = {}
    for tuning in (True, False):
        runs[tuning] = train(4, data, steps=12, callbacks=[NaNDetector(policy="skip", check_every=4)],
                             cpu_tuning=tuning)
        assert built_settings[-1] == (1, tuning)
    assert len(runs[True].cpu_settings) == 1 and "non-finite" in runs[True].cpu_settings[0]
    assert runs[False].cpu_settings == [] and train(4, data, steps=4).cpu_settings == []  # no guard, nothing to say
    assert_same_runs(runs[True], runs[False])
    assert int(runs[True].state.guard["nonfinite_total"]) >= 1
    with pytest.raises(ValueError, match="cpu_tuning='yes' must be True or False"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1, cpu_tuning="yes")


class HalveParamsAt(Callback):
    """Replaces the state between chunks (as a user's callback or a restore may): params halved at ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            trainer.state = trainer.state.replace(params=jax.tree.map(lambda p: p / 2, trainer.state.params))


@pytest.mark.parametrize("per_epoch, bad, halve_at", [(12, (6,), 4), (6, (3,), None)],
                         ids=["state-replaced-between-chunks", "single-steps-between-chunks"])
def test_a_rerun_starts_from_the_state_the_chunk_started_from(per_epoch, bad, halve_at):
    """A guarded chunk reruns from a packed copy of its start that the previous chunk left; when the
    state changed hands in between (a callback replaced it, leftover single steps ran) the rerun
    must start from the state as it is, as single steps do."""
    data = make_data(n=16 * per_epoch)
    batches = [{k: v[i * 16:(i + 1) * 16].copy() for k, v in data.items()} for i in range(per_epoch)]
    for step in bad:
        batches[step - 1]["x"][0, 0] = np.nan
    runs = []
    for k in (1, 4):
        extra = [HalveParamsAt(halve_at)] if halve_at else []
        trainer = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=12, steps_per_execution=k,
                          callbacks=[*extra, NaNDetector(policy="skip", check_every=4)])
        trainer.fit(batches)
        runs.append(trainer)
    assert_same_runs(*runs)
    assert int(runs[1].state.guard["nonfinite_total"]) == len(bad) * 12 // per_epoch


class StepRows(Callback):
    """Every step's loss and ``UpdateProbe``'s values, as the host sees them at chunk ends."""

    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer, step, metrics):
        self.rows.append(jax.device_get({n: metrics[n] for n in ("loss", "update_abs", "param_abs")}))

    def columns(self, steps):
        return {n: np.concatenate([np.ravel(r[n]) for r in self.rows])[:steps] for n in self.rows[0]}


def test_the_select_guard_matches_the_conditional_bitwise_without_a_conditional(monkeypatch):
    """The per-step guard as a select (``guard_form="select"``, no conditional: XLA:GPU reads a
    conditional's predicate on the host) skips the same steps and halts at the same one as the
    Trainer's conditional, bitwise, single or fused."""
    import functools

    from trainer import build
    from trainer.jaxprs import any_equation

    data = make_data(n=192)
    batches = [{k: v[i * 16:(i + 1) * 16].copy() for k, v in data.items()} for i in range(12)]
    for step in (3, 6, 7):  # 3 skipped; 6 and 7 halt the guard (two in a row)
        batches[step - 1]["x"][0, 0] = np.nan
    real = build.make_train_step
    runs, steps, has_cond = {}, {}, {}
    for form in ("cond", "select"):
        monkeypatch.setattr(build, "make_train_step", functools.partial(real, guard_form=form))
        for k in (1, 4):  # cpu_tuning=False: the fused chunk guards each step in the same form
            record = StepRows()
            trainer = Trainer(TinyMLP(dropout=0.3, rngs=nnx.Rngs(0)), optax.adamw(1e-2), max_steps=12,
                              steps_per_execution=k, cpu_tuning=False, callbacks=[
                                  record, UpdateProbe(), NaNDetector(policy="skip", max_consecutive_skips=2,
                                                                     check_every=4)])
            with pytest.raises(FloatingPointError, match="step 7"):
                trainer.fit(batches)
            runs[form, k], steps[form, k] = trainer, record.columns(8)
        jaxpr = jax.make_jaxpr(trainer._train_steps.pure)(trainer.state, batches[0])
        has_cond[form] = any_equation(jaxpr, lambda eqn: eqn.primitive.name == "cond")
    assert has_cond == {"cond": True, "select": False}
    for key, run in runs.items():
        assert_same_runs(runs["cond", 1], run)  # parameters, optimizer and model state, the guard
        for name, column in steps[key].items():  # every step's loss (NaN where bad) and what a probe saw
            np.testing.assert_array_equal(steps["cond", 1][name], column, err_msg=f"{key} {name}")
    loss, update = steps["select", 4]["loss"], steps["select", 4]["update_abs"]
    assert np.isnan(loss[[2, 5, 6]]).all() and np.isfinite(loss[[0, 1, 3, 4, 7]]).all()
    assert (update[[2, 5, 6, 7]] == 0).all() and (update[[0, 1, 3, 4]] > 0).all()  # step 8: after the halt
    guard = jax.device_get(runs["select", 4].state.guard)
    assert int(guard["nonfinite_total"]) == 3 and int(guard["halt_step"]) == 7


def test_intervals_left_at_their_defaults_round_up_to_a_multiple_of_k(data, capsys):
    """steps_per_execution=4 works with the callbacks' defaults (10 and 50 steps round up to 12 and
    52, from the declared default whatever another trainer made of it, at construction and at each
    fit); an interval set by hand is still refused, at construction or, appended later, at fit."""
    import io

    from callbacks import ProgressBar

    memory = Memory()
    logger, bar, nan = MetricsLogger([memory]), ProgressBar(stream=io.StringIO()), NaNDetector()
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=104, steps_per_execution=4,
                      callbacks=[logger, bar, nan])
    assert (logger.log_every, bar.refresh_every, nan.check_every) == (52, 12, 12)
    err = capsys.readouterr().err
    assert "MetricsLogger(log_every=50, a default) runs every 52 steps" in err and err.count("a default)") == 3
    other = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, steps_per_execution=5,
                    callbacks=[logger, bar, nan])  # the same callbacks under another K: from the declared defaults
    assert (logger.log_every, bar.refresh_every, nan.check_every) == (50, 10, 10)
    assert "a default)" not in capsys.readouterr().err
    trainer.fit(ArrayLoader(data, 16, seed=1))  # fit rounds them for its own K again, a callback appended since too
    assert (logger.log_every, bar.refresh_every, nan.check_every) == (52, 12, 12)
    assert [step for step, _ in memory.scalars] == [52, 104]
    other.callbacks.callbacks.append(ProgressBar(refresh_every=7, stream=io.StringIO()))
    with pytest.raises(ValueError, match=r"ProgressBar\(refresh_every=7\) is not a multiple of steps_per_execution=5"):
        other.fit(ArrayLoader(data, 16, seed=1))
    with pytest.raises(ValueError, match=r"ProgressBar\(refresh_every=10\) is not a multiple of steps_per_execution=4"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, steps_per_execution=4,
                callbacks=[ProgressBar(refresh_every=10)])


def test_a_k_longer_than_the_epoch_is_warned_about(data):
    """K=8 over 6-batch epochs: no chunk ever fits, every step runs alone; fit says so and what to use."""
    sizes = []

    class Sizes(Callback):
        def on_step_end(self, trainer, step, metrics):
            sizes.append(trainer.execution_steps)

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2, steps_per_execution=8,
                      callbacks=[Sizes()])
    with pytest.warns(UserWarning, match=r"steps_per_execution=8 is more than the 6 batches of an epoch.*"
                                         r"Use steps_per_execution=6 or less"):
        trainer.fit(ArrayLoader(data, 16))
    assert sizes == [1] * 12


def test_interval_attributes_and_metric_reductions_are_checked_by_name(data):
    class Misnamed(Callback):
        step_interval_attributes = ("every_n_step",)

        def __init__(self):
            self.every_n_steps = 3

    class AString(Callback):
        step_interval_attributes = "every"
        every = 4

    for callback, message in ((Misnamed(), r"names \['every_n_step'\], which it does not have"),
                              (AString(), r"= 'every' must be a tuple of attribute names, e.g. \('every',\)")):
        with pytest.raises((AttributeError, TypeError), match=message):
            Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4, steps_per_execution=2, callbacks=[callback])
    for reductions, message in (({"loss": "sum"}, r"metric_reductions\['loss'\] = 'sum'.*'mean' .* or 'last'"),
                                ({"los": "last"}, r"names 'los', which the step does not report; its metrics are "
                                                  r"\['accuracy', 'loss'\]")):
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=2)
        trainer.metric_reductions.update(reductions)
        with pytest.raises(ValueError, match=message):
            trainer.fit(ArrayLoader(data, 16))
