"""MetricsLogger windows, the no-sync property of the default callbacks, the LR monitor, throughput."""

from __future__ import annotations

import io
import re
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import (Callback, Checkpoint, EpochSummary, GradNormMonitor, LearningRateMonitor, MetricsLogger, MetricWriter,
                       NaNDetector, ProgressBar, Throughput)
from conftest import TinyMLP, make_data
from trainer import ArrayLoader, OptimConfig, Trainer


class Memory(MetricWriter):
    def __init__(self):
        self.scalars, self.hparams = [], None

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))

    def write_hparams(self, hparams):
        self.hparams = dict(hparams)


class StepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, trainer, step, metrics):
        self.losses.append(float(metrics["loss"]))


def test_windows_are_means_of_the_step_metrics(model, data):
    memory, spy = Memory(), StepLosses()
    logger = MetricsLogger([memory], log_every=4)
    trainer = Trainer(model, optax.adam(1e-2), max_steps=10, callbacks=[logger, spy], config={"lr": 0.01})
    trainer.fit(ArrayLoader(data, 16))  # 6 steps per epoch
    assert memory.hparams == {"lr": 0.01}
    steps = [s for s, _ in memory.scalars]
    assert steps == [4, 8, 10]  # the last, partial window is written at the end
    windows = [spy.losses[0:4], spy.losses[4:8], spy.losses[8:10]]
    for (_, scalars), window in zip(memory.scalars, windows):
        assert scalars["loss"] == pytest.approx(np.mean(window), rel=1e-5)


def test_a_second_fit_writes_the_config_again_only_when_it_changed(model, data, tmp_path):
    from callbacks import JsonlWriter, read_jsonl

    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(JsonlWriter(path), log_every=4)
    trainer = Trainer(model, optax.adam(1e-2), max_steps=4, callbacks=[logger],
                      config={"lr": 0.01, "mean": np.zeros(3)})  # an array compares as written, not elementwise
    trainer.fit(ArrayLoader(data, 16))
    trainer.max_steps = 8
    trainer.fit(ArrayLoader(data, 16))
    trainer.config["note"] = "changed"
    trainer.max_steps = 12
    trainer.fit(ArrayLoader(data, 16))
    hparams = [r["hparams"] for r in read_jsonl(path) if "hparams" in r]
    assert hparams == [{"lr": 0.01, "mean": "[0. 0. 0.]"}, {"lr": 0.01, "mean": "[0. 0. 0.]", "note": "changed"}]
    assert [r["step"] for r in read_jsonl(path) if "scalars" in r] == [4, 8, 12]



def test_a_fresh_run_starts_the_files_of_an_earlier_run_again_and_says_so(data, tmp_path):
    """Run twice (the README's example, say): each file holds one run, as Keras's CSVLogger's does, not
    the first run's records and config followed by the second's; the warning names the files."""
    from callbacks import CsvWriter, JsonlWriter, TensorBoardWriter, read_jsonl
    from test_callbacks_writers import tensorboard_scalars

    def run(seed):
        logger = MetricsLogger([JsonlWriter(tmp_path / "m.jsonl"), CsvWriter(tmp_path / "m.csv"),
                                TensorBoardWriter(tmp_path / "tb")], log_every=4)
        Trainer(TinyMLP(rngs=nnx.Rngs(seed)), optax.adam(1e-2), max_steps=8, callbacks=[logger],
                config={"seed": seed}).fit(ArrayLoader(data, 16))
        return logger.history

    run(0)
    with pytest.warns(UserWarning, match=r"m\.jsonl, .*m\.csv, .*tb held an earlier run's log; this fresh run"):
        second = run(1)
    records = read_jsonl(tmp_path / "m.jsonl")
    assert [r.get("step") for r in records] == [None, 4, 8] and records[0]["hparams"] == {"seed": 1}
    with open(tmp_path / "m.csv") as f:
        assert [row.split(",")[0] for row in f.read().splitlines()] == ["step", "4", "8"]
    assert tensorboard_scalars(tmp_path / "tb", "loss") == [(s, pytest.approx(v["loss"])) for s, v in second]


def test_a_logger_reused_by_a_new_trainer_starts_its_files_again_and_keeps_a_baseline_evaluation(data, tmp_path):
    """A logger whose file is still open from the last run starts it again for a new trainer's fresh run
    (it appended: steps 4, 8 twice). An evaluation the new trainer logged before its fit (a baseline at
    step 0) is this run's: kept, and not taken for an earlier run's log (no warning) when it was all."""
    from callbacks import JsonlWriter, read_jsonl

    def fresh(seed, logger, baseline=False):
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(seed)), optax.adam(1e-2), max_steps=8, callbacks=[logger],
                          config={"seed": seed})
        if baseline:
            trainer.evaluate(ArrayLoader(data, 32, shuffle=False), prefix="baseline/")
        trainer.fit(ArrayLoader(data, 16))

    logger = MetricsLogger(JsonlWriter(tmp_path / "m.jsonl"), log_every=4)
    fresh(0, logger)
    with pytest.warns(UserWarning, match="held an earlier run's log"):
        fresh(1, logger)
    assert [r.get("step", r.get("hparams")) for r in read_jsonl(tmp_path / "m.jsonl")] == [{"seed": 1}, 4, 8]
    assert [s for s, _ in logger.history] == [4, 8]
    first = MetricsLogger(JsonlWriter(tmp_path / "b.jsonl"), log_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the baseline is no earlier run's log
        fresh(0, first, baseline=True)
    records = read_jsonl(tmp_path / "b.jsonl")
    assert [r["step"] for r in records if "scalars" in r] == [0, 4, 8] and "baseline/loss" in records[0]["scalars"]
    assert [s for s, _ in first.history] == [0, 4, 8]


def test_two_writers_of_one_file_or_folder_are_refused_when_fit_starts(data, tmp_path):
    """One's rewind replaced the file the other wrote into, and TensorBoard's purge by one hid the other's
    curves: refused, naming the target, before anything is written."""
    from callbacks import TensorBoardWriter

    loggers = [MetricsLogger(TensorBoardWriter(tmp_path / "tb"), log_every=n) for n in (2, 4)]
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=4, callbacks=loggers)
    with pytest.raises(ValueError, match=r"TensorBoardWriter and TensorBoardWriter both write to .*tb: each rewind"):
        trainer.fit(ArrayLoader(data, 16))
    assert trainer.step == 0 and not (tmp_path / "tb").exists()


def test_a_resume_with_another_log_every_keeps_the_loggers_state_and_a_rollback_to_0_its_config(data, tmp_path):
    """A resume that changes log_every (or steps_per_execution, which rounds it) keeps the logger's state
    (one config record). A rollback to step 0 writes the config again (the rewind dropped it)."""
    from callbacks import JsonlWriter, TensorBoardWriter, read_jsonl

    def run(log_every, max_steps):
        logger = MetricsLogger(JsonlWriter(tmp_path / "a" / "m.jsonl"), log_every=log_every)
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=max_steps, workdir=tmp_path / "a",
                config={"a": 1}, callbacks=[logger, Checkpoint(every_n_steps=3, every_n_epochs=None)]
                ).fit(ArrayLoader(data, 16), resume=True)

    run(2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run(3, 6)
    assert sum("hparams" in r for r in read_jsonl(tmp_path / "a" / "m.jsonl")) == 1
    x = data["x"].copy()
    x[4 * 16] = np.nan  # step 5 goes bad, before the first checkpoint (10): back to the one at step 0
    logger = MetricsLogger([JsonlWriter(tmp_path / "b" / "m.jsonl"), TensorBoardWriter(tmp_path / "b" / "tb")],
                           log_every=2)
    with pytest.warns(RuntimeWarning, match="rolling back"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=8, workdir=tmp_path / "b", config={"lr": 1},
                callbacks=[logger, NaNDetector(policy="rollback", check_every=1), Checkpoint(every_n_steps=10)]
                ).fit(ArrayLoader({"x": x, "label": data["label"]}, 16, shuffle=False))
    logger.close()
    assert [r["hparams"] for r in read_jsonl(tmp_path / "b" / "m.jsonl") if "hparams" in r] == [{"lr": 1}]
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    served = EventAccumulator(str(tmp_path / "b" / "tb"), size_guidance={"tensors": 0})
    served.Reload()
    assert len(served.Tensors("config/text_summary")) == 1

def test_eval_metrics_are_written_at_their_step(model, data):
    memory = Memory()
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=2, callbacks=[MetricsLogger([memory], log_every=100)])
    trainer.fit(ArrayLoader(data, 32), eval_data=ArrayLoader(data, 32, shuffle=False))
    evals = [(s, v["eval/loss"]) for s, v in memory.scalars if "eval/loss" in v]
    assert [s for s, _ in evals] == [3, 6]
    assert evals[-1][1] == pytest.approx(trainer.eval_metrics["eval/loss"])


def test_an_evaluation_after_fit_is_logged_only_under_a_prefix_and_early_stopping_ignores_it(model, data):
    from callbacks import EarlyStopping

    memory = Memory()
    stopper = EarlyStopping(monitor="loss", patience=1)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=2, callbacks=[MetricsLogger(memory, log_every=3), stopper])
    trainer.fit(ArrayLoader(data, 32))
    written, checks = list(memory.scalars), (stopper.best, stopper.best_step, stopper.wait)
    assert not trainer.fitting and [s for s, _ in written] == [3, 6]
    bare = trainer.evaluate(ArrayLoader(data, 32, shuffle=False))  # named like the train metrics: not logged
    assert memory.scalars == written and trainer.eval_prefix == ""
    assert (stopper.best, stopper.best_step, stopper.wait) == checks  # and not an EarlyStopping check
    trainer.evaluate(ArrayLoader(data, 32, shuffle=False), prefix="test/")
    assert memory.scalars[-1] == (6, {"test/loss": pytest.approx(bare["loss"]),
                                      "test/accuracy": pytest.approx(bare["accuracy"])})


def test_an_evaluator_without_a_prefix_inside_fit_is_logged(model, data):
    from callbacks import Evaluator

    memory = Memory()
    evaluator = Evaluator(ArrayLoader(data, 32, shuffle=False), every_n_steps=3, every_n_epochs=None, prefix="")
    Trainer(model, optax.adam(1e-2), max_steps=3, callbacks=[evaluator, MetricsLogger(memory, log_every=100)]).fit(
        ArrayLoader(data, 32))
    assert (3, evaluator.last_metrics) in memory.scalars


def test_hundred_step_fit_with_default_callbacks_makes_two_logging_transfers(monkeypatch):
    """No per-step host sync: logging reads the device twice in 100 steps with log_every=50."""
    data = make_data(n=1600)
    calls = []
    real_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real_get(x))
    logger = MetricsLogger([Memory()], log_every=50)
    callbacks = [ProgressBar(refresh_every=50, plain=True, stream=io.StringIO()), logger,
                 GradNormMonitor(every=50), NaNDetector(check_every=50), LearningRateMonitor(),
                 Throughput(every=50)]
    tx = OptimConfig(learning_rate=1e-2).build(total_steps=100)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=100, callbacks=callbacks)
    trainer.fit(ArrayLoader(data, 16))
    assert trainer.step == 100
    assert logger.fetches == 2
    # every other read in the loop is periodic too: nowhere near one per step
    assert len(calls) <= 12, len(calls)


def test_learning_rate_monitor_logs_the_schedule_value(data):
    config = OptimConfig(learning_rate=0.1, schedule="warmup_cosine", warmup_steps=3)
    schedule = config.make_schedule(total_steps=12)
    memory = Memory()
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), config.build(12), max_steps=12,
                      callbacks=[LearningRateMonitor(), MetricsLogger([memory], log_every=4)])
    trainer.fit(ArrayLoader(data, 32))
    logged = [(s, v["learning_rate"]) for s, v in memory.scalars]
    assert [s for s, _ in logged] == [4, 8, 12]
    for step, value in logged:  # the last step of the window used schedule(step - 1)
        assert value == pytest.approx(float(schedule(step - 1)), rel=1e-6)


def test_learning_rate_monitor_needs_an_injected_learning_rate(model, data):
    trainer = Trainer(model, optax.adam(1e-3), max_steps=2, callbacks=[LearningRateMonitor()])
    with pytest.raises(ValueError, match="inject_hyperparams"):
        trainer.fit(ArrayLoader(data, 32))


def test_learning_rate_monitor_reads_a_rate_of_another_name(data):
    """An optimizer of one's own whose rate is ``step_size``: ``name`` only renamed the logged key, and
    the monitor refused the optimizer."""
    def my_sgd(step_size):
        return optax.sgd(step_size)

    schedule = optax.linear_schedule(0.1, 0.0, 8)
    memory = Memory()
    tx = optax.inject_hyperparams(my_sgd)(step_size=schedule)
    monitor = LearningRateMonitor(name="lr", hyperparam="step_size")
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=8,
            callbacks=[monitor, MetricsLogger([memory], log_every=4)]).fit(ArrayLoader(data, 32))
    assert [(s, round(v["lr"], 6)) for s, v in memory.scalars] == [(4, round(float(schedule(3)), 6)),
                                                                   (8, round(float(schedule(7)), 6))]
    with pytest.raises(ValueError, match=r"cannot find 'learning_rate'.*hyperparam='step_size'"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=8, callbacks=[LearningRateMonitor()]).fit(ArrayLoader(data, 32))


def test_throughput_arithmetic_with_an_injected_clock(model, data):
    ticks = iter(range(100))
    throughput = Throughput(every=5, min_seconds=0, clock=lambda: float(next(ticks)))
    memory = Memory()
    trainer = Trainer(model, optax.sgd(0.1), max_steps=10,
                      callbacks=[throughput, MetricsLogger([memory], log_every=5)])
    trainer.fit(ArrayLoader(make_data(n=160), 16))  # 10 steps per epoch
    # clock: 0 after step 1 finished, 1 after step 4, 2 after step 9: 3 steps, then 5 steps, a second each
    recorded = [v for _, v in memory.scalars]
    assert recorded[0]["throughput/steps_per_sec"] == pytest.approx(3.0)
    assert recorded[0]["throughput/examples_per_sec"] == pytest.approx(48.0)
    assert recorded[1]["throughput/steps_per_sec"] == pytest.approx(5.0)
    assert 0.0 <= recorded[1]["throughput/data_share"] <= 1.0


def test_throughput_without_a_metrics_logger_says_its_values_go_nowhere(model, data):
    throughput = Throughput(every=2, min_seconds=0)
    trainer = Trainer(model, optax.sgd(0.1), max_steps=6, callbacks=[throughput])
    with pytest.warns(UserWarning, match="Throughput hands its values to the loggers .* no MetricsLogger"):
        trainer.fit(ArrayLoader(data, 16))
    assert throughput.last["throughput/steps_per_sec"] > 0


def test_throughput_waits_for_min_seconds_before_measuring(model, data):
    ticks = iter(range(100))  # one second per clock reading
    memory = Memory()
    trainer = Trainer(model, optax.sgd(0.1), max_steps=10, callbacks=[
        Throughput(every=2, min_seconds=3, clock=lambda: float(next(ticks))), MetricsLogger([memory], log_every=2)])
    trainer.fit(ArrayLoader(make_data(n=160), 16))
    measured = [(step, v) for step, v in memory.scalars if "throughput/steps_per_sec" in v]
    # at step 2 the window starts (step 1 done): 0; steps 4 and 6 read 1 and 2 (< 3 s: no wait);
    # step 8 reads 3, waits for step 7 and reads 4: steps 2-7 in 4 s
    assert [step for step, _ in measured] == [8]
    assert measured[0][1]["throughput/steps_per_sec"] == pytest.approx(6 / 4)


class Finished(Callback):
    """Waits for each step on the device, so that a lagged read after it always finds its value."""

    def on_step_end(self, trainer, step, metrics):
        jax.block_until_ready(metrics)


def test_progress_bar_plain_lines_and_terminal_bar(model, data):
    out = io.StringIO()
    bar = ProgressBar(refresh_every=2, plain=True, stream=out, min_seconds=0)
    losses = {}

    class Losses(Callback):
        def on_step_end(self, trainer, step, metrics):
            losses[step] = float(metrics["loss"])

    trainer = Trainer(model, optax.sgd(0.1), max_epochs=2, callbacks=[Finished(), bar, Losses()])  # the rate needs two finished reads
    trainer.fit(ArrayLoader(data, 16))  # 6 steps per epoch
    lines = out.getvalue().splitlines()
    # a line for every refresh, each showing the loss of the very step it names (once that step ran)
    shown = [re.match(r"epoch (\d)/2  batch (\d)/6  step (\d+)  loss (\d+\.\d{4})", line) for line in lines]
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in shown] == [
        (1, 2, 2), (1, 4, 4), (1, 6, 6), (2, 2, 8), (2, 4, 10), (2, 6, 12)], lines
    assert all(abs(float(m[4]) - losses[int(m[3])]) <= 5e-5 for m in shown), (lines, losses)
    assert "steps/s" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1,
            callbacks=[ProgressBar(refresh_every=2, stream=tty, min_seconds=0)]).fit(ArrayLoader(data, 16))
    assert "epoch 1/1" in tty.getvalue() and "6/6" in tty.getvalue() and "loss=" in tty.getvalue()
    tty = Tty()  # four batches, the last of 5 rows dropped: the epoch ends full at 3 steps, not at 3/4
    ragged = [{k: v[i:i + 16] for k, v in data.items()} for i in (0, 16, 32, 91)]
    with pytest.warns(UserWarning, match="dropped a batch of 5 rows"):
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1,
                callbacks=[ProgressBar(stream=tty, min_seconds=0)]).fit(ragged)
    assert "3/3" in tty.getvalue() and "3/4" not in tty.getvalue().split("\r")[-1]


def test_writer_and_progress_bar_settings_that_cannot_work_are_refused_when_built():
    from callbacks import ConsoleWriter

    with pytest.raises(ValueError, match="precision=-2 must be a positive integer"):
        ConsoleWriter(precision=-2)
    for make in (lambda: ConsoleWriter(stream="out.txt"), lambda: ProgressBar(stream="out.txt")):
        with pytest.raises(TypeError, match="stream must be a text stream with write"):
            make()


def test_progress_bar_drops_the_lines_of_steps_a_rollback_undid():
    """Steps fetched before a restore are trained again afterwards: their old lines are not printed."""
    import types

    out = io.StringIO()
    bar = ProgressBar(refresh_every=1, plain=True, stream=out, min_seconds=0)
    trainer = types.SimpleNamespace(epoch_length=100, position=0, execution_steps=1, max_epochs=1)
    bar.on_epoch_start(trainer, 0)
    double = jax.jit(lambda x: x * 2)
    for step in (1, 2, 3):
        trainer.position = step
        bar.on_step_end(trainer, step, {"loss": double(jax.numpy.float32(step))})
    printed = len(out.getvalue().splitlines())
    bar.on_checkpoint_restore(trainer, {})
    bar.on_epoch_start(trainer, 0)
    bar.on_epoch_end(trainer, 0, {})  # would print every fetch still pending
    assert len(out.getvalue().splitlines()) == printed


def count_host_reads(monkeypatch) -> dict[str, int]:
    """Counts every read of a device array's value on the host (``float``, ``np.asarray``, ``device_get``)
    and every ``block_until_ready``. (A transfer guard cannot see these on CPU, where no copy is made.)"""
    from jax._src.array import ArrayImpl

    counts = {"reads": 0, "blocks": 0}
    value = ArrayImpl._value

    def counted(self):
        counts["reads"] += 1
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(counted))
    for name in ("asarray", "array"):  # on CPU these take the buffer protocol, not ``_value``
        def numpy_read(a, *args, real=getattr(np, name), **kwargs):
            if isinstance(a, ArrayImpl):
                counts["reads"] += 1
            return real(a, *args, **kwargs)

        monkeypatch.setattr(np, name, numpy_read)
    real_block = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready",
                        lambda x: counts.__setitem__("blocks", counts["blocks"] + 1) or real_block(x))
    return counts


@pytest.mark.parametrize("k", [1, 10])
def test_recipe_default_callbacks_read_the_device_only_at_their_intervals(monkeypatch, tmp_path, k):
    """The recipes' default callbacks over 100 steps: progress and NaN checks read every 10 steps,
    logging, grad norm and throughput every 50, so the host reads a few dozen values, not one per step."""
    from recipes.common import standard_callbacks

    callbacks = standard_callbacks(str(tmp_path), log_every=50, progress=True)
    tx = OptimConfig(learning_rate=1e-2).build(total_steps=100)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=100, callbacks=callbacks, workdir=tmp_path,
                      steps_per_execution=k)
    counts = count_host_reads(monkeypatch)
    trainer.fit(ArrayLoader(make_data(n=1600), 16))
    assert trainer.step == 100
    # progress (10 loss reads) + NaN checks (10 counters, 6 guard values at the end), 2 logger windows of
    # ~6 metrics each, 2 grad norms, the epoch's sums and the learning rate at the end
    assert counts["reads"] <= 60, counts
    assert counts["blocks"] <= 100 // 50 + 1, counts  # throughput's two windows and its start


@pytest.mark.parametrize("read", ["float", "np.asarray", "np.array"])
def test_a_per_step_read_is_counted(monkeypatch, model, data, read):
    """The counter sees a callback's read each step, however it is written (on CPU ``np.asarray`` skips ``_value``)."""
    class Reads(Callback):
        def on_step_end(self, trainer, step, metrics):
            if read == "float":
                float(metrics["loss"])
            elif read == "np.asarray":
                np.asarray(metrics["loss"])
            else:
                np.array(metrics["loss"])

    def reads_in_second_fit(callbacks):
        trainer = Trainer(model, optax.sgd(0.1), max_steps=12, callbacks=callbacks)
        trainer.fit(ArrayLoader(data, 16))  # compiled, the first epochs' reads made
        trainer.max_steps = 24
        with monkeypatch.context() as patch:
            counts = count_host_reads(patch)
            trainer.fit(ArrayLoader(data, 16))
        return counts["reads"]

    assert reads_in_second_fit([Reads()]) - reads_in_second_fit([]) >= 12


def test_epoch_summary_prints_one_line_per_epoch_with_the_epoch_logs_and_counts_as_integers():
    stream = io.StringIO()
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2,
                      callbacks=[EpochSummary(stream=stream), NaNDetector()])
    history = trainer.fit(ArrayLoader(make_data(), 16, seed=0))
    lines = stream.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", "1/2"], ["epoch", "2/2"]]
    for line, logs in zip(lines, history):
        assert f"loss {logs['loss']:.4f}" in line and "nonfinite_total 0 " in line and line.endswith("s")


def test_epoch_summary_prints_the_epoch_a_fit_ended_inside_once_marked_partial(tmp_path):
    """max_steps=9 with 6 batches an epoch: epoch 1, then epoch 2 to step 9 marked partial; resuming
    the finished run prints nothing again (no epoch ran)."""
    def run(stream, resume=False):
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=9, workdir=tmp_path,
                          callbacks=[EpochSummary(stream=stream), Checkpoint(every_n_steps=3, every_n_epochs=None)])
        return trainer.fit(ArrayLoader(make_data(), 16, seed=0), resume=resume)

    stream = io.StringIO()
    history = run(stream)
    lines = stream.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", "1"], ["epoch", "2"]]
    assert "(partial, to step 9)" in lines[1] and f"loss {history[-1]['loss']:.4f}" in lines[1]
    assert "partial_epoch" not in lines[1] and "(partial" not in lines[0]
    again = io.StringIO()
    run(again, resume=True)
    assert again.getvalue() == ""


def test_epoch_summary_prints_no_stale_partial_row_after_a_preemption(tmp_path):
    """A first fit ends at step 3 inside epoch 1 (its partial row printed); the second is preempted at
    step 5, which writes no new row: nothing is printed for it (the old row, labelled step 5, was)."""
    import os
    import signal

    class TermAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    stream = io.StringIO()
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=3, workdir=tmp_path,
                      callbacks=[EpochSummary(stream=stream), TermAt(), Checkpoint(every_n_epochs=None)])
    trainer.fit(ArrayLoader(make_data(), 16, seed=0))
    trainer.max_steps = 9
    with pytest.raises(SystemExit):
        trainer.fit(ArrayLoader(make_data(), 16, seed=0))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "(partial, to step 3)" in lines[0]


def test_a_resumed_logger_reads_the_runs_history_back_and_plots_draw_only_what_is_new(tmp_path, data):
    """Resumed from step 4 of a run logged every 2 steps: the new logger's history holds steps 2 and 4
    from the file and 6, 8 of its own (Plots draws them all); resuming the finished run again draws
    and writes nothing (no second plot, no second config)."""
    from callbacks import Checkpoint, JsonlWriter, Plots, read_jsonl

    def run(max_steps, resume):
        logger = MetricsLogger(JsonlWriter(tmp_path / "metrics.jsonl"), log_every=2)
        plots = Plots(tmp_path / "plots")
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=max_steps, config={"lr": 0.01},
                          callbacks=[logger, plots, Checkpoint(tmp_path / "ckpt", every_n_steps=4, every_n_epochs=None)])
        trainer.fit(ArrayLoader(data, 16, seed=0), resume=resume)
        return logger, plots

    run(6, False)
    logger, plots = run(8, tmp_path / "ckpt" / "step_4")  # rewinds over step 6
    assert [s for s, _ in logger.history] == [2, 4, 6, 8]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "scalars" in r] == [2, 4, 6, 8]
    assert sum("hparams" in r for r in records) == 1 and plots.written
    logger, plots = run(8, True)  # the finished run resumed: its outputs stand
    assert read_jsonl(tmp_path / "metrics.jsonl") == records and plots.written == []


def test_a_run_that_fails_before_its_first_record_still_records_its_config(tmp_path, data):
    from callbacks import JsonlWriter, read_jsonl

    class Boom(Callback):
        def on_step_end(self, trainer, step, metrics):
            raise RuntimeError("boom")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=8, config={"lr": 0.1},
                      callbacks=[MetricsLogger(JsonlWriter(tmp_path / "m.jsonl"), log_every=4), Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(ArrayLoader(data, 16))
    assert read_jsonl(tmp_path / "m.jsonl") == [{"hparams": {"lr": 0.1}}]


def test_a_run_refused_before_its_first_step_leaves_the_logs_as_they_were(tmp_path, data):
    """A resume refused (another model's checkpoint) writes no config of its own into the run's log,
    and a fresh run that fails before its first step does not start an earlier run's log again."""
    from callbacks import CheckpointError, JsonlWriter

    def make(width, max_steps=4):
        return Trainer(TinyMLP(hidden=width, rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=max_steps,
                       workdir=tmp_path, config={"width": width},
                       callbacks=[MetricsLogger(JsonlWriter(tmp_path / "m.jsonl"), log_every=2), Checkpoint()])

    make(8).fit(ArrayLoader(data, 16))
    written = (tmp_path / "m.jsonl").read_bytes()
    with pytest.raises(CheckpointError):
        make(16, max_steps=8).fit(ArrayLoader(data, 16), resume=True)
    assert (tmp_path / "m.jsonl").read_bytes() == written
    (tmp_path / "checkpoints").rename(tmp_path / "kept")
    with pytest.raises(ValueError, match="labels"):  # a fresh run whose data the model cannot take
        make(8).fit(ArrayLoader({"x": data["x"], "label": data["label"] + 100}, 16))
    assert (tmp_path / "m.jsonl").read_bytes() == written


def test_every_logger_writes_the_values_callbacks_record(model, data):
    """Two MetricsLoggers: the first to write a window took trainer.record's values (Throughput's,
    NaNDetector's rollbacks) from the second, whose file then had none."""
    from callbacks import ConsoleWriter

    class Recorder(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step % 2 == 0:
                trainer.record("probe", step)

    often = MetricsLogger([ConsoleWriter(stream=io.StringIO())], log_every=2)
    seldom = MetricsLogger([ConsoleWriter(stream=io.StringIO())], log_every=4)
    trainer = Trainer(model, optax.sgd(0.1), max_steps=12, callbacks=[Recorder(), often, seldom])
    trainer.fit(ArrayLoader(data, 8))
    for logger in (often, seldom):  # each value written once, in a window that ends at or after its step (a
        written = [(step, s["probe"]) for step, s in logger.history if "probe" in s]  # window written late
        assert all(value <= step for step, value in written)  # takes the newest then, a later one the rest)
        values = [value for _, value in written]
        assert values == sorted(set(values)) and values[-1] == 12
    assert len([s for _, s in seldom.history if "probe" in s]) >= 2  # it had none: the other logger took them
    assert trainer.pending_logs == {}  # dropped once every logger wrote it


@pytest.mark.parametrize("recorder_first", [True, False])
@pytest.mark.parametrize("k", [1, 2])
def test_a_value_recorded_every_step_reaches_every_window_with_its_steps_value(model, data, recorder_first, k):
    """A window is written a step or more after it ends: a callback listed before the logger had replaced its
    value by then with the next step's, so only the fit's last window got one (Throughput(every=1) too)."""

    class EveryStep(Callback):
        def on_step_end(self, trainer, step, metrics):
            trainer.record("probe", step)

    logger = MetricsLogger([Memory()], log_every=4)
    callbacks = [EveryStep(), logger] if recorder_first else [logger, EveryStep()]
    Trainer(model, optax.sgd(0.1), max_steps=32, steps_per_execution=k, callbacks=callbacks).fit(ArrayLoader(data, 8))
    assert [(step, s.get("probe")) for step, s in logger.history] == [(step, step) for step in range(4, 33, 4)]


def test_a_value_recorded_just_after_a_window_ended_is_not_dropped_with_the_windows_value(model, data):
    """The window is written a step late: taking its (older) value dropped the name, the newer value with it."""

    class At(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step in (3, 6, 13):
                trainer.record("probe", step)

    logger = MetricsLogger([Memory()], log_every=5)
    Trainer(model, optax.sgd(0.1), max_steps=15, callbacks=[At(), logger]).fit(ArrayLoader(data, 8))
    assert [(step, s["probe"]) for step, s in logger.history if "probe" in s] == [(5, 3), (10, 6), (15, 13)]


def test_epoch_summary_prints_counts_as_integers():
    from callbacks.epoch_summary import _format

    assert [_format(n, v) for n, v in (("nonfinite_total", 2.0), ("nan_rollbacks", 1.0), ("loss", 1.0))] == [
        "2", "1", "1.0000"]
