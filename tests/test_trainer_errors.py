"""Bad input is stopped at the edge with a message naming what was wrong and what to do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from callbacks import Checkpoint
from conftest import TinyMLP
from trainer import ArrayLoader, Trainer


def test_neither_limit_given(model):
    with pytest.raises(ValueError, match="give max_epochs or max_steps"):
        Trainer(model, optax.sgd(0.1))


@pytest.mark.parametrize("kwargs", [{"max_epochs": 0}, {"max_steps": -3}])
def test_non_positive_limits(model, kwargs):
    with pytest.raises(ValueError, match="must be a positive integer"):
        Trainer(model, optax.sgd(0.1), **kwargs)


def test_wrong_model_or_optimizer_type(model):
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        Trainer(object(), optax.sgd(0.1), max_steps=1)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        Trainer(model, 0.1, max_steps=1)


def test_callback_class_instead_of_instance(model):
    from callbacks import Callback
    with pytest.raises(TypeError, match="not the class"):
        Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[Callback])


def test_batch_missing_the_key_the_loss_needs(model, data):
    loader = ArrayLoader({"features_wrong": data["x"], "label": data["label"]}, 32)
    with pytest.raises(ValueError, match=r"has keys \['features_wrong', 'label'\].*one of \['image'"):
        Trainer(model, optax.sgd(0.1), max_steps=1).fit(loader)


@pytest.mark.parametrize("bad", [-1, 3, 7])
@pytest.mark.parametrize("loss", ["default", "explicit"])
def test_labels_out_of_range_name_step_and_range(model, data, bad, loss):
    from trainer import losses

    labels = data["label"].copy()
    labels[40] = bad  # lands in the second batch of 32 without shuffling
    loader = ArrayLoader({"x": data["x"], "label": labels}, 32, shuffle=False)
    loss_fn = losses.supervised(losses.cross_entropy, l2=1e-4) if loss == "explicit" else None  # the same check
    trainer = Trainer(model, optax.sgd(0.1), max_steps=5, loss_fn=loss_fn)
    with pytest.raises(ValueError, match=r"labels at step 2 \(epoch 0, batch 1\) lie in .* must be in \[0, 3\)"):
        trainer.fit(loader)
    assert trainer.step == 1  # the bad batch never reached the device


def test_eval_labels_out_of_range(model, data):
    labels = data["label"].copy()
    labels[0] = 9
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    trainer.fit(ArrayLoader(data, 32))
    with pytest.raises(ValueError, match="labels at eval"):
        trainer.evaluate(ArrayLoader({"x": data["x"], "label": labels}, 32, shuffle=False))


def test_empty_train_data(model):
    with pytest.raises(ValueError, match="train_data is an empty list: give it at least one batch"):
        Trainer(model, optax.sgd(0.1), max_epochs=1).fit([])
    with pytest.raises(ValueError, match="yielded no batches in epoch 0"):
        Trainer(model, optax.sgd(0.1), max_epochs=1).fit(iter([]))


def test_a_one_pass_iterator_for_several_epochs_is_refused_before_training(model, data):
    batches = iter(list(ArrayLoader(data, 32)))
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=2)
    with pytest.raises(TypeError, match="one-pass list_iterator, but max_epochs=2 iterates it once an epoch"):
        trainer.fit(batches)
    assert trainer.step == 0


def test_a_data_source_that_runs_dry_after_one_epoch_ends_fit_saying_so(model, data, tmp_path):
    """As Keras's "input ran out of data": a warning, and fit ends as after a stop, on_fit_end (the final
    checkpoint) included; it raised, so the last steps were never saved. A generator shorter than
    max_steps ends the same way."""
    class Once:  # re-iterable in form, empty after its first pass
        def __init__(self):
            self.batches = list(ArrayLoader(data, 32))

        def __iter__(self):
            batches, self.batches = self.batches, []
            return iter(batches)

    trainer = Trainer(model, optax.sgd(0.1), max_epochs=2, workdir=tmp_path, callbacks=[Checkpoint()])
    with pytest.warns(RuntimeWarning, match="train_data yielded no batches in epoch 1: a generator or iterator"):
        trainer.fit(Once())
    assert trainer.epoch == 1 and trainer.stop_reason.startswith("train_data ran out of batches in epoch 1")
    assert trainer.checkpoints[0].last_saved_step == trainer.step == 3
    generator = (batch for batch in list(ArrayLoader(data, 32)))
    short = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=12)
    with pytest.warns(RuntimeWarning, match="yielded no batches in epoch 1"):
        short.fit(generator)
    assert short.step == 3


def test_loss_outputs_and_eval_data_of_the_wrong_form_are_refused_before_training(model, data):
    from trainer import Evaluator

    trainer = Trainer(model, optax.sgd(0.1), max_steps=2, loss_fn=lambda m, b: (jnp.float32(0.0), [1.0]))
    with pytest.raises(TypeError, match=r"returned a tuple of \(.*, list\); return the loss alone, or \(loss, metrics\)"):
        trainer.fit(ArrayLoader(data, 32))
    with pytest.raises(TypeError, match="Evaluator's data is a one-pass generator"):
        Evaluator(b for b in ArrayLoader(data, 32))


def test_generator_with_max_steps_is_fine(model, data):
    def forever():
        while True:
            yield from ArrayLoader(data, 32)
    trainer = Trainer(model, optax.sgd(0.1), max_steps=7)
    trainer.fit(forever())
    assert trainer.step == 7


def test_empty_eval_data(model, data):
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    with pytest.raises(ValueError, match="evaluation data yielded no batches"):
        trainer.evaluate([])


def test_tuple_batches_are_accepted(model, data):
    batches = [(data["x"][i:i + 32], data["label"][i:i + 32]) for i in range(0, 96, 32)]
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=2)
    history = trainer.fit(batches, eval_data=batches)
    assert trainer.step == 6 and "eval/accuracy" in history[-1]


@pytest.mark.parametrize("raw", ["dict", "tuple", "array"])
def test_raw_arrays_instead_of_batches_say_how_to_wrap_them(model, data, raw):
    source = {"dict": data, "tuple": (data["x"], data["label"]), "array": data["x"]}[raw]
    with pytest.raises(TypeError, match=r"iterable of batches, not raw arrays.*ArrayLoader\("):
        Trainer(model, optax.sgd(0.1), max_steps=1).fit(source)


@pytest.mark.parametrize("labels", [np.array([0, -1], np.int8), np.array([2, 3], np.uint8),
                                    np.array([1, -2], ">i4"), np.array([[0], [-9]], np.int64)[:, 0]])
def test_label_range_check_catches_every_integer_kind(labels):
    from trainer.losses import check_label_range

    with pytest.raises(ValueError, match=r"labels at here lie in \[-?\d+, \d+\] .* must be in \[0, 3\)"):
        check_label_range(labels, 3, "here")
    check_label_range(np.clip(labels, 0, 2).astype(labels.dtype), 3, "here")  # in range: no error


@pytest.mark.parametrize("kind", ["float", "column"])
def test_labels_of_the_wrong_dtype_or_shape_are_named_before_the_device(model, data, kind):
    labels = data["label"].astype(np.float32) if kind == "float" else data["label"][:, None]
    trainer = Trainer(model, optax.sgd(0.1), max_steps=2)
    expected = {"float": r"float32 \(32,\), but this loss .* takes integer labels.*cross_entropy_onehot",
                "column": r"shape \(32, 1\), but the model's outputs \(32, 3\) need one class id per output row"}[kind]
    with pytest.raises(ValueError, match=expected):
        trainer.fit(ArrayLoader({"x": data["x"], "label": labels}, 32, shuffle=False))
    assert trainer.step == 0


def _batches(data, feature_counts):
    """One batch of 16 per entry, with that many input features (the first ``din`` are the data's)."""
    out = []
    for i, count in enumerate(feature_counts):
        x = np.zeros((16, count), np.float32)
        x[:, :min(count, 8)] = data["x"][16 * i:16 * i + 16, :min(count, 8)]
        out.append({"x": x, "label": data["label"][16 * i:16 * i + 16]})
    return out


def test_a_batch_whose_shape_the_model_cannot_take_names_both_shapes(model, data):
    with pytest.warns(UserWarning, match=r"batch 1\) has shapes .*\(16, 5\) float32.*compiles again"), \
            pytest.raises(TypeError, match="dot_general") as info:  # the model's own error, as it came
        Trainer(model, optax.sgd(0.1), max_epochs=1).fit(_batches(data, [8, 5]))
    assert ("(step 2 (epoch 0, batch 1) has shapes {'label': (16,) int32, 'x': (16, 5) float32}, unlike the first "
            "batch's {'label': (16,) int32, 'x': (16, 8) float32})") in info.value.__notes__


def test_numpy_and_jax_batches_of_the_same_shapes_are_the_same_shapes(model, data):
    import warnings

    batches = _batches(data, [8, 8, 8, 8])
    batches[1] = {key: jnp.asarray(value) for key, value in batches[1].items()}
    for k in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "compiles again", no refusal to stack them
            trainer = Trainer(model, optax.sgd(0.1), max_epochs=1, steps_per_execution=k)
            trainer.fit(batches)
        assert trainer.step == 4


def test_a_new_shape_the_model_takes_compiles_again_with_one_warning_per_shape(data):
    from flax import nnx

    class MeanOverFeatures(nnx.Module):  # takes any number of input features
        def __init__(self, *, rngs):
            self.out = nnx.Linear(1, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(x.mean(axis=-1, keepdims=True))

    trainer = Trainer(MeanOverFeatures(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2)
    with pytest.warns(UserWarning) as caught:
        trainer.fit(_batches(data, [8, 6, 6, 8, 4]))
    changes = [str(w.message) for w in caught if "compiles again" in str(w.message)]
    assert len(changes) == 2 and "(16, 6) float32" in changes[0] and "(16, 4) float32" in changes[1]
    assert trainer.step == 10  # every batch of both epochs trained; the second epoch warned no more


def test_a_second_trainer_of_the_same_module_leaves_the_first_and_earlier_snapshots_valid(data):
    from flax import nnx

    from conftest import TinyMLP

    model = TinyMLP(rngs=nnx.Rngs(0))
    before = jax.tree.leaves(nnx.state(model, nnx.Param))  # the module's own arrays, before any training
    first = Trainer(model, optax.adam(1e-2), max_epochs=1)
    first.fit(ArrayLoader(data, 32))
    first_params = jax.tree.map(np.array, nnx.state(first.model, nnx.Param))  # copies, not views
    second = Trainer(model, optax.adam(1e-3), max_epochs=2)  # fine-tuning the same module
    second.fit(ArrayLoader(data, 32))
    assert not any(a.is_deleted() for a in before)  # donated by neither trainer
    # what the second trainer put into the module is no user's write: the first keeps its own state
    assert first.evaluate(ArrayLoader(data, 32, shuffle=False))["loss"] > 0  # the first trainer still works
    np.testing.assert_array_equal(jax.tree.leaves(first_params)[0],
                                  np.asarray(jax.tree.leaves(first.state.params)[0]))
    assert model(data["x"][:2]).shape == (2, 3)


def test_a_state_used_up_by_a_later_step_is_refused_when_assigned(model, data):
    from callbacks import Callback

    class Keep(Callback):
        kept = copied = None

        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 0:
                self.kept = trainer.state
                self.copied = jax.tree.map(jnp.copy, trainer.state)

    keep = Keep()
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=2, callbacks=[keep])
    trainer.fit(ArrayLoader(data, 32))
    with pytest.raises(ValueError, match="holds arrays a later step has reused.*jax.tree.map\\(jnp.copy"):
        trainer.state = keep.kept
    assert trainer.step == 6
    trainer.state = keep.copied  # a copy is fine, and the step follows it
    assert trainer.step == 3


def test_small_mistakes_of_a_newcomer_are_named(model, data):
    from callbacks import Callback, ProgressBar
    from trainer.optim import OptimConfig

    trainer = Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=ProgressBar(stream=__import__("io").StringIO()))
    assert [type(cb) for cb in trainer.callbacks.callbacks] == [ProgressBar]  # one callback needs no list
    with pytest.raises(TypeError, match="config must be a dict of the run's settings"):
        Trainer(model, optax.sgd(0.1), max_steps=1, config=["lr", 1])
    with pytest.raises(TypeError, match="callbacks must be a list of Callback instances; got int"):
        Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=3)
    with pytest.raises(ValueError, match=r"the loss function looked up the key 'inputs', which the batch lacks; "
                                         r"the batch has keys \['label', 'x'\]"):
        Trainer(model, optax.sgd(0.1), max_steps=1, loss_fn=lambda m, b: m(b["inputs"]).mean()).fit(
            ArrayLoader(data, 32))
    with pytest.raises(ValueError, match="a batch holds no arrays with a batch axis \\(it holds list\\)"):
        Trainer(model, optax.sgd(0.1), max_steps=1).fit([{"x": data["x"][:4].tolist(), "label": [0, 1, 2, 0]}])
    with pytest.raises(TypeError, match="learning_rate='1e-3' must be a number"):
        OptimConfig(learning_rate="1e-3").build(10)
    for number in (jnp.float32(1e-3), np.array(1e-3), np.float64(1e-3), 1):  # any real number, 0-d arrays too
        OptimConfig(learning_rate=number).build(10)

    class KerasNamed(Callback):
        def on_train_end(self, logs=None): ...
        def on_epoch_ends(self, trainer, epoch, logs): ...

    with pytest.warns(UserWarning) as seen:
        Trainer(model, optax.sgd(0.1), max_steps=1, callbacks=[KerasNamed(), KerasNamed()])
    messages = [str(w.message) for w in seen]
    assert len(messages) == 2  # once per class and name, not per instance
    assert "KerasNamed.on_epoch_ends is not a trainer event, so it is never called; the events are" in messages[0]
    assert "KerasNamed.on_train_end is not a trainer event, so it is never called; its event here is on_fit_end" in messages[1]


def test_a_first_batch_the_model_cannot_take_gets_its_shapes_noted(model, data):
    with pytest.raises(TypeError, match="dot_general") as info:
        Trainer(model, optax.sgd(0.1), max_steps=1).fit(_batches(data, [5]))
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "batch of step 1 (epoch 0, batch 0), of shapes {'label': (16,) int32, 'x': (16, 5) float32}" in notes


def test_a_predict_step_override_leaves_the_default_losss_label_check_alone(data):
    """predict_step serves predict() (here: class ids); the label check reads the model's own outputs."""
    class ClassIds(Trainer):
        def predict_step(self, model, batch):
            return model(batch["x"]).argmax(-1)

    labels = np.array(data["label"], np.int64)
    trainer = ClassIds(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=2)
    trainer.fit(ArrayLoader({"x": data["x"], "label": labels}, 8))  # batch 8 is no class count
    assert trainer.predict([{"x": data["x"][:4]}]).shape == (4,)
    with pytest.raises(ValueError, match=r"the model gives 3 classes, so labels must be in \[0, 3\)"):
        ClassIds(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=2).fit(
            ArrayLoader({"x": data["x"], "label": labels + 5}, 32))


def test_finish_metrics_must_return_the_dict_of_numbers(model, data):
    class Forgot(Trainer):
        def finish_metrics(self, metrics):
            metrics = dict(metrics, double_loss=2 * metrics.get("loss", 0.0))  # no return

    with pytest.raises(TypeError, match=r"Forgot.finish_metrics must return the dict of metrics; it returned "
                                        r"NoneType \(a missing return\?\)"):
        Forgot(model, optax.sgd(0.1), max_epochs=1).fit(ArrayLoader(data, 32))

    class Listed(Trainer):
        def finish_metrics(self, metrics):
            return dict(metrics, losses=[1.0, 2.0])

    with pytest.raises(TypeError, match=r"names \(str\) and numbers; these are not: \{'losses': 'list'\}"):
        Listed(model, optax.sgd(0.1), max_epochs=1).fit(ArrayLoader(data, 32))


def test_record_takes_one_number_and_says_so(model):
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    trainer.record("speed", np.float32(3.5))
    assert trainer.pending_logs["speed"] == (0, 3.5)
    for bad in ("fast", "1.5", None, np.ones(3)):
        with pytest.raises(TypeError, match=r"record\('speed', .*\): record takes one number"):
            trainer.record("speed", bad)


def test_a_batch_array_of_strings_is_named_in_the_error(model, data):
    """A file-name column in the batches: JAX's error says only that an argument is not an array."""
    batches = [{**b, "path": np.array([f"img{i}.png" for i in range(len(b["x"]))])} for b in ArrayLoader(data, 32)]
    with pytest.raises(TypeError) as caught:
        Trainer(model, optax.sgd(0.1), max_epochs=1).fit(batches)
    assert "the batch's ['path'] holds no numbers" in "".join(getattr(caught.value, "__notes__", []))


def test_labels_of_the_wrong_shape_get_advice_that_fits_them(model, data):
    """[N, 1] labels for [N, C] outputs: drop the axis with labels[..., 0] (reshape(-1), the old advice,
    flattens per-position labels wrongly); a shape that is simply other gets no such advice."""
    column = [{"x": data["x"][:16], "label": data["label"][:16, None]}]
    with pytest.raises(ValueError, match=r"shape \(16, 1\), .* need one class id per output row, shape \(16,\) "
                                         r"\(drop the trailing axis of 1: labels\[\.\.\., 0\]\)"):
        Trainer(model, optax.sgd(0.1), max_steps=1).fit(column)
    pairs = [{"x": data["x"][:16], "label": np.zeros((16, 2), np.int32)}]
    with pytest.raises(ValueError, match=r"shape \(16, 2\), .* need one class id per output row, shape \(16,\)\.$"):
        Trainer(model, optax.sgd(0.1), max_steps=1).fit(pairs)


def test_parameters_written_into_the_model_are_trained_and_evaluated(data):
    """The trainer trained a copy: pretrained weights loaded into the module after the Trainer was
    built, or a callback's edit of trainer.model (Keras's set_weights), were dropped in silence."""
    import jax.numpy as jnp
    from flax import nnx

    from callbacks import Callback
    from conftest import TinyMLP

    model = TinyMLP(rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.sgd(0.0), max_steps=2)
    pretrained = nnx.state(TinyMLP(rngs=nnx.Rngs(7)), nnx.Param)
    nnx.update(model, pretrained)  # loaded after the Trainer was built
    expected = trainer.evaluate(ArrayLoader(data, 32, shuffle=False))["loss"]
    reference = Trainer(TinyMLP(rngs=nnx.Rngs(7)), optax.sgd(0.0), max_steps=2)
    assert expected == reference.evaluate(ArrayLoader(data, 32, shuffle=False))["loss"]
    trainer.fit(ArrayLoader(data, 32))
    np.testing.assert_array_equal(np.asarray(trainer.state.params["l1"]["kernel"][...]),
                                  np.asarray(pretrained["l1"]["kernel"][...]))

    class ZeroAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 3:
                trainer.model.l1.kernel[...] = jnp.zeros_like(trainer.model.l1.kernel[...])

    trainer.callbacks.callbacks.append(ZeroAt())
    trainer.max_steps = 5
    trainer.fit(ArrayLoader(data, 32))
    assert float(jnp.abs(trainer.state.params["l1"]["kernel"][...]).sum()) == 0.0  # trained on (lr 0) from zeros
    trainer.model.l1.kernel.value = jnp.zeros((3, 3))
    with pytest.raises(ValueError, match=r"parameter .*l1.*kernel.* was given shape \(3, 3\), but it has shape \(8, 16\)"):
        trainer.evaluate(ArrayLoader(data, 32))


def test_loaded_batch_statistics_and_writes_through_a_kept_reference_are_taken(data):
    """A pretrained BatchNorm model loaded after the Trainer was built: its statistics were dropped
    (only parameters were taken) and a later read of trainer.model wiped them from the module; a
    callback that kept ``trainer.model`` from on_fit_start (Keras's ``self.model``) and wrote through it
    later was never trained on, and the end of fit overwrote its write."""
    import jax.numpy as jnp
    from flax import nnx

    from callbacks import Callback

    class Normed(nnx.Module):
        def __init__(self, seed):
            rngs = nnx.Rngs(seed)
            self.l1, self.bn, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.bn(self.l1(x))))

    loader = ArrayLoader(data, 32, shuffle=False)
    pretrained = Normed(1)
    reference = Trainer(pretrained, optax.adam(1e-2), max_epochs=2)
    reference.fit(ArrayLoader(data, 32))
    expected = reference.evaluate(loader)["loss"]
    model = Normed(0)
    trainer = Trainer(model, optax.sgd(0.0), max_epochs=2)
    nnx.update(model, nnx.state(pretrained))  # parameters and batch statistics, after the Trainer was built
    assert trainer.evaluate(loader)["loss"] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_array_equal(np.asarray(trainer.model.bn.mean[...]), np.asarray(pretrained.bn.mean[...]))

    class KeepRef(Callback):
        def on_fit_start(self, trainer):
            self.model = trainer.model

        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 0:
                self.model.l2.bias.value = jnp.full((3,), 0.5)  # [...] = would read the donated array

    trainer.callbacks.callbacks.append(KeepRef())
    trainer.fit(ArrayLoader(data, 32))  # lr 0: only the write changes the bias, from epoch 1 on
    np.testing.assert_array_equal(np.asarray(trainer.state.params["l2"]["bias"][...]), np.full((3,), 0.5, np.float32))


def test_a_restore_wins_over_a_pending_write_and_a_checkpoint_saves_a_written_one(tmp_path, data):
    """A write into trainer.model waits for the next step: EarlyStopping's restore of the best (or a
    rollback) made meanwhile was mixed with it (that layer from the discarded steps), and a checkpoint
    saved meanwhile missed it (the resumed run differed from the unbroken one)."""
    import jax.numpy as jnp
    from flax import nnx

    from callbacks import Callback, Checkpoint, EarlyStopping
    from conftest import TinyMLP

    class Constrain(Callback):  # Keras's weight constraint, at each epoch's end: numerically no change
        def on_epoch_end(self, trainer, epoch, logs):
            kernel = trainer.model.l1.kernel
            kernel[...] = jnp.clip(kernel[...], -10.0, 10.0)

    class Best(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 0:
                self.params = jax.tree.map(np.array, trainer.state.params)

    best = Best()
    stopper = EarlyStopping(monitor="loss", mode="max", patience=1)  # epoch 0 the best: restored after epoch 1
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=4, callbacks=[best, Constrain(), stopper])
    trainer.fit(ArrayLoader(data, 32))
    for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(best.params)):
        np.testing.assert_array_equal(np.asarray(a), b)

    class Zero(Callback):  # learning rate 0: only this write changes the kernel
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 0:
                trainer.model.l1.kernel[...] = jnp.zeros((8, 16))

    class CrashAt(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 4:
                raise RuntimeError("crash")

    def run(workdir, *extra, resume=False):
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.0), max_epochs=2, workdir=workdir,
                          callbacks=[Zero(), *extra, Checkpoint(async_save=False)])
        trainer.fit(ArrayLoader(data, 32), resume=resume)
        return trainer

    with pytest.raises(RuntimeError, match="crash"):
        run(tmp_path / "run", CrashAt())
    resumed = run(tmp_path / "run", resume=True)  # from the checkpoint of epoch 0's end
    assert float(jnp.abs(resumed.state.params["l1"]["kernel"][...]).sum()) == 0.0


def test_loaded_weights_are_taken_though_a_freed_module_of_the_same_address_once_held_them(data):
    """The registry of arrays a trainer put into a module knew modules by id(): a module freed, a new
    one at its address, and weights the old one's trainer had put there, loaded into the new one, were
    taken for the new trainer's own and ignored."""
    import gc

    from flax import nnx

    from conftest import TinyMLP

    class Pool:
        reuse = None

    class Pooled(TinyMLP):
        def __new__(cls, *args, **kwargs):
            obj, Pool.reuse = Pool.reuse, None
            return obj if obj is not None else object.__new__(cls)

    def pretrain():
        model = Pooled(rngs=nnx.Rngs(0))
        trainer = Trainer(model, optax.adam(1e-2), max_steps=3)
        trainer.fit(ArrayLoader(data, 32))
        return nnx.state(trainer.model), id(model)

    from trainer import module_link

    pretrained, address = pretrain()
    gc.collect()
    # the links of a module are held weakly: the freed module (and its trainer's link) is gone from them
    assert not [module for module in module_link._LINKS.keys() if id(module) == address]
    kept = []
    for _ in range(300_000):  # CPython reuses freed addresses: find the old module's
        obj = object.__new__(Pooled)
        if id(obj) == address:
            Pool.reuse = obj
            break
        kept.append(obj)
    del kept
    if Pool.reuse is None:  # the allocator did not hand the address out again: the check above stands alone
        return
    model = Pooled(rngs=nnx.Rngs(1))
    assert id(model) == address
    trainer = Trainer(model, optax.sgd(0.0), max_steps=1)
    nnx.update(model, pretrained)  # loaded after the Trainer was built
    trainer.fit(ArrayLoader(data, 32))
    np.testing.assert_array_equal(np.asarray(trainer.state.params["l1"]["kernel"][...]),
                                  np.asarray(pretrained["l1"]["kernel"][...]))


def test_keras_and_lightning_argument_names_say_what_they_are_called_here(model, data):
    import inspect

    with pytest.raises(TypeError, match=r"Trainer\(\) got an unexpected keyword argument 'epochs': here it is max_epochs=N"):
        Trainer(model, optax.sgd(0.1), epochs=3)
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    with pytest.raises(TypeError, match=r"fit\(\) got an unexpected keyword argument 'validation_data': here it is eval_data="):
        trainer.fit(ArrayLoader(data, 32), validation_data=ArrayLoader(data, 32))
    with pytest.raises(TypeError, match=r"'epochs': here it is Trainer\(\.\.\., max_epochs=N\)"):
        trainer.fit(ArrayLoader(data, 32), epochs=2)
    with pytest.raises(TypeError, match=r"evaluate\(\) takes 1 positional argument\(s\) but got 2: pass the data as one "
                                        r"argument \(\(x, y\), .* and batch_size by name"):
        trainer.evaluate(data["x"], data["label"])
    with pytest.raises(TypeError, match=r"predict\(\) takes 1 positional argument\(s\) but got 2: .* "
                                        r"predict\(x, batch_size=32\)"):
        trainer.predict(data["x"], 32)
    with pytest.raises(TypeError, match=r"fit\(x, y\) as Keras takes it: .* fit\(ArrayLoader\(\{'x': x, 'label': y\}"):
        trainer.fit(data["x"], data["label"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'$"):  # unknown anywhere: Python's own
        Trainer(model, optax.sgd(0.1), colour="red")
    assert trainer.step == 0 and "max_epochs" in inspect.signature(Trainer).parameters  # the signature as written


def test_warnings_point_at_the_users_own_line(model, data):
    """fit / evaluate are wrapped (Keras's names): warnings aimed one frame up named trainer/other_names.py."""
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    trainer.fit(ArrayLoader(data, 8))
    with pytest.warns(UserWarning, match="nothing to do") as fit_warning:
        trainer.fit(ArrayLoader(data, 8))
    with pytest.warns(UserWarning, match="leaves out") as evaluate_warning:
        trainer.evaluate(ArrayLoader({k: v[:20] for k, v in data.items()}, 8))
    assert [w.filename for w in (*fit_warning, *evaluate_warning)] == [__file__, __file__]


def test_a_warning_from_the_prefetch_thread_names_no_threading_frame(model, data):
    """user_warnings.warn walked out of the library into threading.py when the feed ran on the prefetch thread."""
    with pytest.warns(UserWarning, match="dropped a batch") as caught:
        Trainer(model, optax.sgd(0.1), max_epochs=1, prefetch=2).fit(
            ArrayLoader({k: v[:20] for k, v in data.items()}, 8, drop_remainder=False))
    assert not [w.filename for w in caught if w.filename.endswith("threading.py")]


def test_every_other_name_is_refused_with_its_hint_and_each_hint_names_real_arguments(model, data):
    """Each Keras / Lightning name in the hint tables fails with its hint, and every ``name=`` a hint
    suggests is an argument of something this library (or optax, or a Flax layer) takes."""
    import inspect
    import re

    from callbacks import Checkpoint, ConsoleWriter, CsvWriter, EarlyStopping, Evaluator, MetricsLogger
    from trainer import OptimConfig, make_optimizer
    from trainer import other_names as names

    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    calls = {
        "TRAINER": lambda **kw: Trainer(model, optax.sgd(0.1), **kw),
        "FIT": lambda **kw: trainer.fit(ArrayLoader(data, 32), **kw),
        "EVALUATE": lambda **kw: trainer.evaluate(ArrayLoader(data, 32), **kw),
        "PREDICT": lambda **kw: trainer.predict(data["x"], **kw),
        "CHECKPOINT": lambda **kw: Checkpoint(**kw),
        "EARLY_STOPPING": lambda **kw: EarlyStopping(**kw),
        "METRICS_LOGGER": lambda **kw: MetricsLogger([ConsoleWriter()], **kw),
    }
    takers = [Trainer, Trainer.fit, Trainer.evaluate, Trainer.predict, Checkpoint, EarlyStopping, MetricsLogger,
              Evaluator, ArrayLoader, make_optimizer, OptimConfig, optax.MultiSteps, nnx.Linear.__init__, CsvWriter]
    known = {name for taker in takers for name in inspect.signature(taker).parameters}
    for table, call in calls.items():
        for name, hint in getattr(names, table).items():
            if name == names.POSITIONAL:
                continue
            with pytest.raises(TypeError, match=re.escape(f"keyword argument {name!r}: here it is {hint}")):
                call(**{name: 1})
            suggested = set(re.findall(r"\b([a-z_]+)=", hint))
            assert suggested <= known, (table, name, suggested - known)
    assert trainer.step == 0


def test_several_datasets_where_one_is_expected_say_how_to_evaluate_each(model, data):
    """fit(eval_data=[val, test]) said a batch "holds no arrays (it holds ArrayLoader)"; a dict of them was told
    to be wrapped in an ArrayLoader."""
    from callbacks import Evaluator

    val, test = (ArrayLoader({k: v[i:i + 32] for k, v in data.items()}, 16, shuffle=False) for i in (0, 32))
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=1)
    with pytest.raises(TypeError, match=r"eval_data holds 2 datasets \(ArrayLoader, ArrayLoader\), not batches: .*"
                                        r"Evaluator\(data\[0\], prefix='val/'\), Evaluator\(data\[1\], prefix='test/'\)"):
        trainer.fit(val, eval_data=[val, test])
    with pytest.raises(TypeError, match=r"Evaluator\(data\['val'\], prefix='val/'\), Evaluator\(data\['test'\]"):
        Evaluator({"val": val, "test": test})
    with pytest.raises(TypeError, match=r"evaluate's data holds 2 datasets .* \[trainer.evaluate\(d\) for d in data\]"):
        trainer.evaluate((val, test))
    with pytest.raises(TypeError, match=r"train_data holds 2 datasets .* join their arrays"):
        trainer.fit([val, test])
    with pytest.raises(TypeError, match=r"predict's data holds 2 datasets .* \[trainer.predict\(d\) for d in data\]"):
        trainer.predict([val, test])
    assert trainer.step == 0
    # what each message offers works, and lists of batches are still batches
    trainer = Trainer(model, optax.sgd(0.1), max_epochs=1,
                      callbacks=[Evaluator(val, prefix="val/"), Evaluator(test, prefix="test/")])
    assert {"val/loss", "test/loss"} <= set(trainer.fit(list(val))[-1])


def test_batches_of_a_registered_class_that_iterates_are_batches_not_datasets(data):
    """The review's regression: a pytree batch class with ``__iter__`` (for ``x, y = batch``) was taken for a dataset."""
    import dataclasses

    import jax
    from conftest import TinyMLP
    from flax import nnx

    from trainer import losses

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Batch:
        x: np.ndarray
        label: np.ndarray

        def __iter__(self):
            return iter((self.x, self.label))

    def loss_fn(model, batch):
        x, y = batch
        return losses.cross_entropy(model(x), y).mean()

    batches = [Batch(data["x"][i:i + 32], data["label"][i:i + 32]) for i in range(0, 96, 32)]
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, loss_fn=loss_fn)
    history = trainer.fit(batches)
    assert trainer.step == 6 and history[-1]["loss"] < history[0]["loss"]
    assert trainer.evaluate(batches)["loss"] == pytest.approx(history[-1]["loss"], rel=0.2)


def test_keras_and_lightning_method_names_on_a_trainer_say_what_does_the_same(model, data):
    """trainer.test(...), model.summary(), ... ended in Python's bare AttributeError; Keras's
    ``stop_training = True`` was set in silence and stopped nothing."""
    import re

    from flax import nnx

    import trainer as package
    from trainer.other_names import TRAINER_ATTRIBUTES

    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    for name, hint in TRAINER_ATTRIBUTES.items():
        with pytest.raises(AttributeError, match=re.escape(f"no attribute {name!r}: here it is {hint}")):
            getattr(trainer, name)
        for attribute in set(re.findall(r"\btrainer\.(\w+)", hint)) - {name}:  # what a hint offers is there
            assert hasattr(trainer, attribute), (name, attribute)
    assert hasattr(nnx, "tabulate") and hasattr(package, "load_model")
    with pytest.raises(AttributeError, match=r"'stop_training': here it is trainer.should_stop = True"):
        trainer.stop_training = True
    with pytest.raises(AttributeError, match=r"no attribute 'colour'$"):  # unknown anywhere: Python's own
        trainer.colour
    assert getattr(trainer, "colour", None) is None and not hasattr(trainer, "test")

    class Mine(Trainer):  # the review: a __getattr__ named the property, not the attribute it lacked
        @property
        def group_rate(self):
            return self.opt_config

    mine = Mine(model, optax.sgd(0.1), max_steps=1)
    with pytest.raises(AttributeError, match=r"no attribute 'opt_config'$"):
        mine.group_rate
    mine.summary = "a subclass's own"  # names other than stop_training stay free for an instance's own use
    assert mine.summary == "a subclass's own"
