"""The event contract: order of hooks, stopping from a callback, errors reaching on_exception."""

from __future__ import annotations

import optax
import pytest

from callbacks import Callback
from conftest import TinyMLP
from flax import nnx
from trainer import ArrayLoader, Trainer
from trainer.events import EVENTS


class Recorder(Callback):
    """Records every hook call as (event, first argument after the trainer)."""

    def __init__(self):
        self.calls: list[tuple] = []
        for event in EVENTS:
            setattr(self, event, self._recorder(event))

    def _recorder(self, event):
        def record(trainer, *args):
            self.calls.append((event, args[0]) if args and isinstance(args[0], int) else (event,))
        return record


def loaders(data, batch=32):
    return ArrayLoader(data, batch, seed=0), ArrayLoader(data, batch, shuffle=False, drop_remainder=False)


def test_hook_order_for_two_epochs_with_eval(model, data):
    rec = Recorder()
    train, evald = loaders(data)  # 96 examples / 32 = 3 steps per epoch
    Trainer(model, optax.sgd(0.1), max_epochs=2, callbacks=[rec]).fit(train, eval_data=evald)
    expected = [("on_fit_start",)]
    step = 0
    for epoch in range(2):
        expected.append(("on_epoch_start", epoch))
        for _ in range(3):
            step += 1
            expected += [("on_step_start", step), ("on_step_end", step)]
        expected += [("on_eval_start",), ("on_eval_end",), ("on_epoch_end", epoch)]
    expected.append(("on_fit_end",))
    assert rec.calls == expected


def test_callbacks_run_in_list_order(model, data):
    seen = []

    class Named(Callback):
        def __init__(self, name):
            self.name = name

        def on_step_end(self, trainer, step, metrics):
            seen.append((step, self.name))

    train, _ = loaders(data)
    Trainer(model, optax.sgd(0.1), max_steps=2, callbacks=[Named("b"), Named("a")]).fit(train)
    assert seen == [(1, "b"), (1, "a"), (2, "b"), (2, "a")]


def test_only_callbacks_that_define_an_event_are_called_and_a_later_added_one_is_seen(model, data):
    seen = []

    class StepEnd(Callback):
        def on_step_end(self, trainer, step, metrics):
            seen.append(("class", step))

    class EpochOnly(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            seen.append(("epoch", epoch))

    by_instance = Callback()
    by_instance.on_step_end = lambda trainer, step, metrics: seen.append(("instance", step))
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[EpochOnly(), StepEnd(), by_instance])
    assert trainer.callbacks.listeners("on_step_end") == trainer.callbacks.callbacks[1:]
    assert trainer.callbacks.listeners("on_step_start") == []
    train, _ = loaders(data)
    trainer.fit(train)
    late = StepEnd()
    trainer.callbacks.callbacks.append(late)  # after the listeners were worked out: seen all the same
    trainer.max_steps = 2
    trainer.fit(train)
    assert seen == [("class", 1), ("instance", 1), ("class", 2), ("instance", 2), ("class", 2)]
    assert trainer.callbacks.listeners("on_step_end")[-1] is late


def test_a_callback_replaced_by_an_equal_one_is_the_one_called(model, data):
    import dataclasses

    @dataclasses.dataclass
    class Tagged(Callback):  # dataclasses compare by fields: two of them are == yet different objects
        tag: str = "x"

        def __post_init__(self):
            self.steps = []

        def on_step_end(self, trainer, step, metrics):
            self.steps.append(step)

    first, second = Tagged(), Tagged()
    assert first == second and first is not second
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[first])
    train, _ = loaders(data)
    trainer.fit(train)
    trainer.callbacks.callbacks[0] = second
    trainer.max_steps = 2
    trainer.fit(train)
    assert first.steps == [1] and second.steps == [2]


def test_on_epoch_end_sees_that_epochs_eval_metrics(model, data):
    logs_seen = []

    class Watch(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            logs_seen.append(dict(logs))
            assert trainer.eval_metrics == {k: v for k, v in logs.items() if k.startswith("eval/")}

    train, evald = loaders(data)
    Trainer(model, optax.sgd(0.1), max_epochs=2, callbacks=[Watch()]).fit(train, eval_data=evald)
    assert [set(l) for l in logs_seen] == [{"loss", "accuracy", "eval/loss", "eval/accuracy"}] * 2


def test_should_stop_ends_fit_after_that_step_and_fires_fit_end(model, data):
    rec = Recorder()

    class StopAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 4:
                trainer.should_stop = True

    train, _ = loaders(data)
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=10, callbacks=[StopAt(), rec])
    trainer.fit(train)
    assert trainer.step == 4
    assert rec.calls[-2:] == [("on_step_end", 4), ("on_fit_end",)]
    assert ("on_step_start", 5) not in rec.calls


def test_request_stop_records_reason_and_says_it_once(model, data, capsys):
    class Stop(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            trainer.request_stop("enough")

    trainer = Trainer(model, optax.sgd(0.1), max_epochs=5, callbacks=[Stop()])
    trainer.fit(loaders(data)[0])
    assert (trainer.epoch, trainer.stop_reason) == (1, "enough")
    assert capsys.readouterr().err.splitlines() == [f"fit stopped at step {trainer.step}: enough"]
    Trainer(model, optax.sgd(0.1), max_epochs=1).fit(loaders(data)[0])  # a fit that reaches its limits: silent
    assert capsys.readouterr().err == ""


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["callback", "data"])
def test_exception_fires_on_exception_and_propagates_unchanged(model, data, where):
    seen = []
    error = Boom("bad thing")

    class Raiser(Callback):
        def on_step_end(self, trainer, step, metrics):
            if where == "callback" and step == 2:
                raise error

    class Catch(Callback):
        def on_exception(self, trainer, exception):
            seen.append(exception)

        def on_fit_end(self, trainer):
            seen.append("fit_end")

    def batches():
        for i, batch in enumerate(ArrayLoader(data, 32)):
            if where == "data" and i == 2:
                raise error
            yield batch

    trainer = Trainer(model, optax.sgd(0.1), max_steps=5, callbacks=[Raiser(), Catch(), Catch()])
    with pytest.raises(Boom) as info:
        trainer.fit(batches())
    assert info.value is error
    assert seen == [error, error]


def test_second_fit_continues_stopped_epoch_at_next_batch(model, data):
    """A stop mid-epoch, then fit again: the same trainer finishes that epoch from the next batch."""
    train = ArrayLoader(data, 16, seed=3)  # 6 batches per epoch
    seen = []

    class Spy(Callback):
        def on_step_start(self, trainer, step):
            seen.append((trainer.epoch, trainer.position))

        def on_step_end(self, trainer, step, metrics):
            if step == 2 and len(seen) == 2:
                trainer.should_stop = True

    trainer = Trainer(model, optax.sgd(0.1), max_epochs=1, callbacks=[Spy()])
    trainer.fit(train)
    assert trainer.step == 2 and trainer.epoch == 0
    trainer.fit(train)
    # at on_step_start, trainer.position is the number of batches already trained on
    assert seen == [(0, k) for k in range(6)]
    assert trainer.epoch == 1


class LossSpy(Callback):
    """Every step's loss, read on the host (a sync each step: fine in a test)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, trainer, step, metrics):
        self.losses.append(float(metrics["loss"]))


def test_max_steps_inside_an_epoch_leaves_a_partial_history_row(model, data):
    """A generator of unknown length cut by max_steps: the epoch's means so far and the final
    evaluation come back as a row marked partial_epoch, as Keras/Lightning report a cut epoch."""
    spy = LossSpy()
    _, test = loaders(data)
    trainer = Trainer(model, optax.sgd(0.1), max_steps=3, callbacks=[spy])
    history = trainer.fit((b for b in ArrayLoader(data, 16, seed=0)), eval_data=test)
    assert len(history) == 1 and history[0]["epoch"] == 0 and history[0]["partial_epoch"] is True
    assert history[0]["loss"] == pytest.approx(sum(spy.losses) / 3, rel=1e-6)
    assert history[0]["eval/loss"] == trainer.eval_metrics["eval/loss"]


def test_a_partial_row_is_replaced_by_the_whole_epoch_when_a_later_fit_finishes_it(model, data):
    spy = LossSpy()

    class StopAtTwo(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 2 and len(spy.losses) == 2:
                trainer.request_stop("test")

    trainer = Trainer(model, optax.sgd(0.1), max_epochs=1, callbacks=[spy, StopAtTwo()])
    train = ArrayLoader(data, 16, seed=3)  # 6 batches per epoch
    first = trainer.fit(train)
    assert [sorted(row) for row in first] == [["accuracy", "epoch", "loss", "partial_epoch"]]
    assert first[0]["loss"] == pytest.approx(sum(spy.losses) / 2, rel=1e-6)
    second = trainer.fit(train)
    assert len(second) == 1 and "partial_epoch" not in second[0]
    assert second[0]["loss"] == pytest.approx(sum(spy.losses) / 6, rel=1e-6)


def test_new_trainer_on_same_loader_starts_a_fresh_epoch(model, data):
    train = ArrayLoader(data, 16, seed=3)
    first_batches = []

    class Grab(Callback):
        def on_step_start(self, trainer, step):
            first_batches.append(trainer.position)

    Trainer(model, optax.sgd(0.1), max_steps=3).fit(train)
    from conftest import TinyMLP
    from flax import nnx
    Trainer(TinyMLP(rngs=nnx.Rngs(1)), optax.sgd(0.1), max_steps=2, callbacks=[Grab()]).fit(train)
    assert first_batches == [0, 1]


def test_fit_when_limits_already_reached_warns_and_does_nothing(model, data):
    trainer = Trainer(model, optax.sgd(0.1), max_steps=2)
    trainer.fit(loaders(data)[0])
    with pytest.warns(UserWarning, match="nothing to do"):
        trainer.fit(loaders(data)[0])
    assert trainer.step == 2


def test_assigning_a_state_moves_the_step_counter_with_it(model, data):
    """``trainer.state = other.state`` carries the other run's step: ``max_steps`` and the
    state's own counter then agree, as they would after a resume from a checkpoint."""
    from conftest import TinyMLP
    from flax import nnx
    first = Trainer(model, optax.sgd(0.1), max_steps=5)
    first.fit(ArrayLoader(data, 16, seed=3))
    second = Trainer(TinyMLP(rngs=nnx.Rngs(1)), optax.sgd(0.1), max_steps=8)
    second.state = first.state
    assert second.step == 5
    second.fit(ArrayLoader(data, 16, seed=3))
    assert second.step == 8 and int(second.state.step) == 8


def test_assigning_a_state_made_from_the_current_one_never_waits_for_the_device(data, monkeypatch):
    import jax
    from conftest import TinyMLP
    from flax import nnx

    def model():
        return TinyMLP(rngs=nnx.Rngs(0))

    reads = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(1) or real(x))

    class Swap(Callback):  # as an EMA swap or a weight projection would, every step
        def __init__(self, swap):
            self.swap = swap

        def on_step_end(self, trainer, step, metrics):
            if self.swap:
                trainer.state = trainer.state.replace(params=trainer.state.params)

    counts = {}
    for swap in (False, True):
        reads.clear()
        Trainer(model(), optax.sgd(0.1), max_steps=6, callbacks=[Swap(swap)]).fit(ArrayLoader(data, 16, seed=3))
        counts[swap] = len(reads)
    assert counts[True] == counts[False], counts  # the loop never waits on the device for such a swap


def test_a_hook_that_cannot_take_its_events_arguments_is_refused_when_the_trainer_is_built(model):
    class Forgot(Callback):
        def on_fit_end(self):  # no trainer
            pass

    class Extra(Callback):
        def on_step_end(self, trainer, step, metrics, more):
            pass

    class KerasStyle(Callback):  # Keras's signature: it bound, and epoch got the trainer, logs the epoch
        def on_epoch_start(self, epoch, logs=None):
            pass

    class Fine(Callback):
        def on_step_end(self, trainer, *args, **kwargs):
            pass

        def on_epoch_end(self, trainer, epoch, logs, extra=None):
            pass

    for callback, message in ((Forgot(), r"Forgot.on_fit_end\(\) cannot be called as on_fit_end\(trainer\)"),
                              (Extra(), r"Extra.on_step_end\(trainer, step, metrics, more\) cannot be called as "
                                        r"on_step_end\(trainer, step, metrics\)"),
                              (KerasStyle(), r"KerasStyle.on_epoch_start\(epoch, logs=None\) cannot be called as "
                                             r"on_epoch_start\(trainer, epoch\): its first argument 'epoch' would get "
                                             r"the trainer")):
        with pytest.raises(TypeError, match=message):
            Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[callback])
    Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[Fine(), Recorder()])


def test_hooks_set_or_callbacks_appended_between_fits_are_called_and_checked(model, data):
    """The list's listeners were worked out once: a hook set on an instance after the first fit was
    never called, and an appended callback's wrong event method failed after an epoch of training."""
    import warnings

    class Plain(Callback):
        pass

    plain = Plain()
    trainer = Trainer(model, optax.sgd(0.1), max_steps=2, callbacks=[plain])
    trainer.fit(ArrayLoader(data, 32))
    calls = []
    plain.on_step_end = lambda trainer, step, metrics: calls.append(step)
    trainer.max_steps = 4
    trainer.fit(ArrayLoader(data, 32))
    assert calls == [3, 4]

    class BadEpochEnd(Callback):
        def on_epoch_end(self, trainer, logs):  # Keras's (epoch, logs) without the epoch
            pass

        def on_train_end(self, trainer):
            pass

    trainer.callbacks.callbacks.append(BadEpochEnd())
    trainer.max_steps = 6
    with warnings.catch_warnings(record=True) as seen, pytest.raises(
            TypeError, match=r"BadEpochEnd.on_epoch_end\(trainer, logs\) cannot be called as on_epoch_end\(trainer, epoch, logs\)"):
        warnings.simplefilter("always")
        trainer.fit(ArrayLoader(data, 32))
    assert trainer.step == 4  # refused before training
    assert any("on_train_end is not a trainer event" in str(w.message) for w in seen)


def test_the_workdir_exists_when_callbacks_start(model, data, tmp_path):
    class Notes(Callback):
        def on_fit_start(self, trainer):
            (trainer.workdir / "notes.txt").write_text("run notes")

    Trainer(model, optax.sgd(0.1), max_steps=1, workdir=tmp_path / "new" / "run", callbacks=[Notes()]).fit(
        ArrayLoader(data, 32))
    assert (tmp_path / "new" / "run" / "notes.txt").read_text() == "run notes"


def test_lambda_callback_hooks_are_functions_checked_as_methods_are(data):
    from callbacks import LambdaCallback

    seen = []
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2, callbacks=[
        LambdaCallback(on_epoch_end=lambda trainer, epoch, logs: seen.append((epoch, logs["loss"])),
                       on_fit_end=lambda trainer: seen.append(("end", trainer.step)))])
    history = trainer.fit(ArrayLoader(data, 32))
    assert seen == [(0, history[0]["loss"]), (1, history[1]["loss"]), ("end", trainer.step)]
    with pytest.raises(TypeError, match=r"on_train_batch_end=, which is no trainer event \(its event here is on_step_end\)"):
        LambdaCallback(on_train_batch_end=lambda trainer, step, metrics: None)
    with pytest.raises(TypeError, match=r"its first argument 'epoch' would get the trainer"):  # Keras's (epoch, logs)
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1,
                callbacks=[LambdaCallback(on_epoch_end=lambda epoch, logs: None)])


def test_a_function_set_on_an_instance_under_no_events_name_is_warned_about(data):
    """A hook set on a plain Callback instance under Keras's name was never called, in silence (a subclass's
    method of that name was warned about)."""
    from callbacks import Callback

    hook = Callback()
    hook.on_train_batch_end = lambda trainer, step, metrics: None
    with pytest.warns(UserWarning, match=r"this Callback.on_train_batch_end is not a trainer event, so it is never "
                                         r"called; its event here is on_step_end") as caught:
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1, callbacks=[hook]).fit(ArrayLoader(data, 32))
    assert len([w for w in caught if "on_train_batch_end" in str(w.message)]) == 1  # at build, not again at fit


def test_fit_returns_its_own_copy_of_the_history(data):
    """fit returned trainer.history itself, so a list an earlier fit returned grew (and had its partial row
    replaced) when a later fit went on; Keras's fit returns each call's own History."""
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=4)
    first = trainer.fit(ArrayLoader(data, 32))  # 3 batches an epoch: epoch 1 is partial at step 4
    kept = [dict(row) for row in first]
    trainer.max_steps = 9
    second = trainer.fit(ArrayLoader(data, 32))
    assert first == kept and first[-1]["partial_epoch"] and len(first) == 2
    assert second == trainer.history and second is not trainer.history and len(second) == 3
    assert "partial_epoch" not in second[1]
    second[0]["loss"] = -1.0  # the caller's copy: the trainer's own rows stay
    assert trainer.history[0]["loss"] == kept[0]["loss"]
