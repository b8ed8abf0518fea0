"""evaluate counts every example once (padded, masked last batch); predict returns every output."""

from __future__ import annotations

import numpy as np
import optax
import pytest

from trainer import ArrayLoader, Evaluator, Trainer


def _reference(trainer, data):
    logits = np.asarray(trainer.model(data["x"]))
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    loss = -log_probs[np.arange(len(logits)), data["label"]].mean()
    return loss, (logits.argmax(1) == data["label"]).mean()


@pytest.mark.parametrize("batch", [32, 40, 100])
def test_evaluate_equals_numpy_reference_over_all_examples(model, data, batch):
    trainer = Trainer(model, optax.adam(1e-2), max_steps=5)
    trainer.fit(ArrayLoader(data, 32))
    metrics = trainer.evaluate(ArrayLoader(data, batch, shuffle=False, drop_remainder=False))
    loss, acc = _reference(trainer, data)
    assert metrics["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)


def test_evaluate_compiles_once_for_a_smaller_last_batch(model, data):
    trainer = Trainer(model, optax.adam(1e-2), max_steps=1)
    trainer.evaluate(ArrayLoader(data, 40, shuffle=False, drop_remainder=False))  # 40, 40, 16
    assert trainer._eval_step._cache_size() == 1


def test_predict_returns_every_row_in_order(model, data):
    trainer = Trainer(model, optax.adam(1e-2), max_steps=1)
    out = trainer.predict(ArrayLoader({"x": data["x"]}, 40, shuffle=False, drop_remainder=False))
    assert isinstance(out, np.ndarray) and out.shape == (96, 3)
    np.testing.assert_allclose(out, np.asarray(trainer.model(data["x"])), rtol=1e-5, atol=1e-6)


def test_predict_and_evaluate_take_raw_arrays_as_rows_in_batches(model, data):
    """As Keras's ``predict(x)``: every row in order, ``batch_size`` at a time (not iterated row by row)."""
    import jax.numpy as jnp

    trainer = Trainer(model, optax.adam(1e-2), max_steps=1)
    expected = np.asarray(model(data["x"]))
    for raw in (data["x"], jnp.asarray(data["x"])):
        np.testing.assert_allclose(trainer.predict(raw, batch_size=48), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainer.predict(data["x"]), expected, rtol=1e-5, atol=1e-6)  # 32 at a time
    loss, accuracy = _reference(trainer, data)
    assert trainer.evaluate(data)["loss"] == pytest.approx(loss, rel=1e-5)
    assert trainer.evaluate(data, batch_size=7)["accuracy"] == pytest.approx(accuracy)
    with pytest.raises(ValueError, match="batch_size=16 applies to raw arrays; this data .* yields its own batches"):
        trainer.predict(ArrayLoader(data, 32, shuffle=False, drop_remainder=False), batch_size=16)


def test_raw_arrays_are_refused_by_fit_and_evaluator(model, data):
    trainer = Trainer(model, optax.adam(1e-2), max_steps=1)
    with pytest.raises(TypeError, match="train_data must be an iterable of batches, not raw arrays"):
        trainer.fit(data)
    with pytest.raises(TypeError, match="Evaluator's data must be an iterable of batches"):
        Evaluator(data)
    with pytest.raises(TypeError, match="Evaluator needs data"):
        Evaluator(None)
    with pytest.raises(TypeError, match="prefix=5 must be a string"):
        Evaluator(ArrayLoader(data, 32), prefix=5)
    assert trainer.predict([data["x"][:8]]).shape == (8, 3)  # a list of input arrays is batches


def test_eval_data_the_model_cannot_take_fails_before_training(model, data):
    bad = ArrayLoader({"x": np.zeros((32, 5), np.float32), "label": data["label"][:32]}, 16)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=2)
    with pytest.raises(ValueError, match=r"evaluating the first batch of the evaluation data \(shapes "
                                         r"\{'label': \(16,\) int32, 'x': \(16, 5\) float32\}\) fails with.*dot_general"):
        trainer.fit(ArrayLoader(data, 32), eval_data=bad)
    assert trainer.step == 0
    trainer.fit(ArrayLoader(data, 32), eval_data=[dict(x=data["x"][:16], label=data["label"][:16])])  # a list fits
    assert trainer.epoch == 2 and "eval/accuracy" in trainer.history[-1]


def test_predict_refuses_a_loader_that_shuffles_or_drops_and_evaluation_warns_when_rows_are_left_out(model):
    from conftest import make_data

    data = make_data(n=100)  # 100 rows: batches of 32 leave 4 out with drop_remainder=True
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1)
    with pytest.raises(ValueError, match=r"predict's data is an ArrayLoader that shuffles its rows.*shuffle=False"):
        trainer.predict(ArrayLoader(data, 32, drop_remainder=False))
    with pytest.raises(ValueError, match=r"leaves out its last 4 rows \(drop_remainder=True\)"):
        trainer.predict(ArrayLoader(data, 32, shuffle=False))
    assert trainer.predict(ArrayLoader(data, 32, shuffle=False, drop_remainder=False)).shape == (100, 3)
    with pytest.warns(UserWarning, match=r"evaluate's data is an ArrayLoader that leaves out its last 4 of 100 rows"):
        partial = trainer.evaluate(ArrayLoader(data, 32, shuffle=False))
    whole = trainer.evaluate(ArrayLoader(data, 32, shuffle=False, drop_remainder=False))
    assert partial["loss"] != whole["loss"]  # the warning is about a real difference
    with pytest.warns(UserWarning, match=r"Evaluator's data is an ArrayLoader that leaves out its last 4"):
        Evaluator(ArrayLoader(data, 32))


def test_a_metric_a_callback_derives_in_on_eval_end_is_kept_and_can_be_monitored(model, data):
    """As an epoch's logs: what ``on_eval_end`` adds reaches later callbacks, the epoch's row of
    ``history``, ``evaluate``'s result and ``trainer.eval_metrics``."""
    import math

    from callbacks import Callback, EarlyStopping

    class Perplexity(Callback):
        def on_eval_end(self, trainer, metrics):
            metrics[trainer.eval_prefix + "perplexity"] = math.exp(metrics[trainer.eval_prefix + "loss"])

    stopper = EarlyStopping(monitor="eval/perplexity", patience=5)
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=2, callbacks=[Perplexity(), stopper])
    history = trainer.fit(ArrayLoader(data, 32), eval_data=ArrayLoader(data, 64, shuffle=False))
    assert [h["eval/perplexity"] for h in history] == [pytest.approx(math.exp(h["eval/loss"])) for h in history]
    assert stopper.best == pytest.approx(min(h["eval/perplexity"] for h in history))
    result = trainer.evaluate(ArrayLoader(data, 64, shuffle=False), prefix="test/")
    assert result["test/perplexity"] == pytest.approx(math.exp(result["test/loss"]))
    assert trainer.eval_metrics == result


def test_a_pad_trainers_evaluation_batches_carry_the_mask_a_custom_loss_weighs_by(model, data):
    """``ragged_batches="pad"`` writes ``batch["mask"]`` into training batches; a loss written to weigh by it
    finds it in evaluation batches too, and the evaluation is the plain per-example mean."""
    import jax.numpy as jnp

    def masked_loss(model, batch):
        ce = optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["label"])
        weights = batch["mask"].astype(jnp.float32)
        return jnp.sum(ce * weights) / jnp.maximum(weights.sum(), 1.0)

    trainer = Trainer(model, optax.sgd(0.1), loss_fn=masked_loss, max_epochs=1, ragged_batches="pad")
    history = trainer.fit(ArrayLoader(data, 40, drop_remainder=False),
                          eval_data=ArrayLoader(data, 40, shuffle=False, drop_remainder=False))
    loss, _ = _reference(trainer, data)
    assert history[-1]["eval/loss"] == pytest.approx(loss, rel=1e-5)
    assert trainer.evaluate(ArrayLoader(data, 40, shuffle=False, drop_remainder=False))["loss"] == pytest.approx(loss, rel=1e-5)
    assert trainer.predict(ArrayLoader({"x": data["x"]}, 40, shuffle=False, drop_remainder=False)).shape == (96, 3)


def test_a_loss_that_fails_on_a_whole_batch_is_not_evaluated_example_by_example(model, data):
    """Evaluation calls the loss on each example alone, where size-1 axes broadcast: one-hot cross-entropy on
    integer labels of one example gave a number in silence. It is traced on a whole batch first."""
    from trainer import losses

    trainer = Trainer(model, optax.sgd(0.1), loss_fn=losses.supervised(losses.cross_entropy_onehot), max_steps=1)
    with pytest.raises(ValueError, match=r"the loss function on a whole batch of the evaluation data \(shapes .*"
                                         r"fails with .*Incompatible shapes"):
        trainer.evaluate(data)
    with pytest.raises(ValueError, match="the loss function on a whole batch"):
        trainer.fit(ArrayLoader(dict(data, label=np.eye(3, dtype=np.float32)[data["label"]]), 32),
                    eval_data=ArrayLoader(data, 32, shuffle=False))
    assert trainer.step == 0  # refused before training


def test_evaluation_traces_its_sums_once_per_batch_shapes_not_once_per_call(model, data, monkeypatch):
    import jax

    trainer = Trainer(model, optax.adam(1e-2), max_steps=1)
    loader = ArrayLoader(data, 40, shuffle=False, drop_remainder=False)
    first = trainer.evaluate(loader)
    traced = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traced.append(1) or real(*a, **k))
    assert trainer.evaluate(loader) == first and trainer.evaluate(loader) == first
    assert traced == []


def test_predict_refuses_outputs_whose_first_axis_is_not_the_batch(model, data):
    import jax.numpy as jnp

    class TimeMajor(Trainer):
        def predict_step(self, model, batch):
            return jnp.stack([model(batch["x"])] * 4)  # [time, batch, classes]

    class PerBatch(Trainer):
        def predict_step(self, model, batch):
            return {"logits": model(batch["x"]), "mean": jnp.mean(model(batch["x"]))}

    loader = ArrayLoader({"x": data["x"]}, 40, shuffle=False, drop_remainder=False)
    with pytest.raises(ValueError, match=r"predict_step's output has shape \(4, 40, 3\), but a batch has 40 rows"):
        TimeMajor(model, optax.sgd(0.1), max_steps=1).predict(loader)
    with pytest.raises(ValueError, match=r"predict_step's output \['mean'\] has shape \(\)"):
        PerBatch(model, optax.sgd(0.1), max_steps=1).predict(loader)


def test_an_input_the_model_cannot_take_is_named_in_evaluate_and_predict_after_a_first_trace(model, data):
    trainer = Trainer(model, optax.adam(1e-2), loss_fn=lambda m, b: m(b["x"]).mean() ** 2, max_steps=1)
    trainer.evaluate(data)
    trainer.predict(data["x"])
    wide = {"x": np.zeros((16, 5), np.float32), "label": data["label"][:16]}
    with pytest.raises(ValueError, match=r"whole batch of the evaluation data \(shapes \{'label': \(16,\) int32, "
                                         r"'x': \(16, 5\) float32\}\) fails with TypeError: dot_general"):
        trainer.evaluate([wide])
    with pytest.raises(TypeError, match="dot_general") as err:
        trainer.predict([wide["x"]])
    assert "(predicting, a batch of shapes (16, 5) float32)" in err.value.__notes__


def test_masks_that_are_not_marks_and_data_masked_out_entirely_are_refused(model, data):
    trainer = Trainer(model, optax.adam(1e-2), max_steps=1)
    weights = np.where(np.arange(96) % 2, 0.5, 1.0).astype(np.float32)
    with pytest.raises(ValueError, match="the batch's 'mask' is float32; a mask marks real rows"):
        trainer.evaluate([dict(data, mask=weights)])
    assert trainer.evaluate([dict(data, mask=np.ones(96, np.int32))]) == trainer.evaluate(data, batch_size=96)
    with pytest.raises(ValueError, match="every example of the evaluation data is masked out"):
        trainer.evaluate([dict(data, mask=np.zeros(96, bool))])


def test_keras_shaped_mistakes_in_evaluate_say_what_to_pass(model, data):
    trainer = Trainer(model, optax.adam(1e-2), max_steps=1)
    with pytest.raises(TypeError, match="evaluate got None for its data"):
        trainer.evaluate(None)
    with pytest.raises(ValueError, match=r"pass the tuple \(x, y\) or a dict .*: a list \[x, y\] is read as a list of "
                                         "batches"):
        trainer.evaluate([data["x"], data["label"]])
    with pytest.raises(TypeError, match=r"wrap them: ArrayLoader\(\{'x': \.\.\., 'label': \.\.\.\}, batch_size=96, "
                                        r"shuffle=False, drop_remainder=False\)"):
        trainer.fit(ArrayLoader(data, 32), eval_data=data)
    with pytest.raises(TypeError, match=r"wrap them: ArrayLoader\(\{'x': x, 'label': y\}, batch_size=96\)"):
        trainer.fit((data["x"], data["label"]))


def test_eval_labels_out_of_range_are_refused_before_training(model, data):
    trainer = Trainer(model, optax.adam(1e-2), max_epochs=1)
    bad = ArrayLoader(dict(data, label=np.full(96, 7, np.int32)), 32, shuffle=False)
    with pytest.raises(ValueError, match=r"labels at evaluation lie in \[7, 7\] but the model gives 3 classes"):
        trainer.fit(ArrayLoader(data, 32), eval_data=bad)
    assert trainer.step == 0


def test_a_pad_trainer_evaluates_and_predicts_batches_that_are_not_dicts(model, data):
    """Only a dict batch can hold batch["mask"]: raw arrays and tuple batches are padded and masked as before."""
    trainer = Trainer(model, optax.sgd(0.1), max_steps=1, ragged_batches="pad")
    assert trainer.predict(data["x"][:40], batch_size=16).shape == (40, 3)
    loss, accuracy = _reference(trainer, data)
    assert trainer.evaluate((data["x"], data["label"]), batch_size=40)["loss"] == pytest.approx(loss, rel=1e-5)


def test_fit_traces_its_evaluation_data_once_not_at_every_fit(model, data, monkeypatch):
    """Each fit traced the evaluation's sums again at its start; JAX keeps every trace (~0.2 MB a fit for a
    30-layer MLP)."""
    import jax

    trainer = Trainer(model, optax.adam(1e-2), max_epochs=1)
    eval_data = ArrayLoader(data, 32, shuffle=False, drop_remainder=False)
    trainer.fit(ArrayLoader(data, 32), eval_data=eval_data)
    traced = []
    real = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traced.append(a[0]) or real(*a, **k))
    for epochs in (2, 3, 4):
        trainer.max_epochs = epochs
        trainer.fit(ArrayLoader(data, 32), eval_data=eval_data)
    assert trainer.epoch == 4 and not [f for f in traced if "sums" in getattr(f, "__name__", "")], traced


def test_a_metric_that_is_no_mean_over_examples_is_warned_about_once(data):
    """A loss divided by the batch's total weight (or an F1) in a loss_fn was evaluated per example in silence
    (the audit's F1: 0.071 against 0.482)."""
    import warnings

    import jax
    import jax.numpy as jnp
    from conftest import TinyMLP
    from flax import nnx

    from trainer import losses

    def weights(batch):
        return jnp.where(batch["label"] == 1, 3.0, 1.0)

    def normalised(model, batch):  # per example: w * l / w = l, so evaluation reports the unweighted mean
        w = weights(batch)
        return jnp.sum(w * losses.cross_entropy(model(batch["x"]), batch["label"])) / jnp.sum(w)

    def kerass(model, batch):  # Keras's reduction, the mean of w * l: a mean over examples, no warning
        return jnp.mean(weights(batch) * losses.cross_entropy(model(batch["x"]), batch["label"]))

    loader = ArrayLoader(data, 32, shuffle=False)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, loss_fn=normalised)
    with pytest.warns(UserWarning, match=r"the evaluation \('eval/'\) computes each example's metrics alone .* first "
                                         r"batch 'loss' .* \(the mean over its examples\) against .* \(the batch's\)") as caught:
        trainer.fit(loader, eval_data=loader)
        trainer.evaluate(loader)
    assert len([w for w in caught if "each example's metrics alone" in str(w.message)]) == 1 and caught[0].filename == __file__
    class Sampling(nnx.Module):  # a VAE's loss draws its sample in eval mode too: by chance unequal, a mean still
        def __init__(self, rngs):
            self.encode, self.decode, self.rngs = nnx.Linear(8, 4, rngs=rngs), nnx.Linear(2, 8, rngs=rngs), rngs

        def __call__(self, x):
            h = self.encode(x)
            z = h[:, :2] + jnp.exp(0.5 * h[:, 2:]) * jax.random.normal(self.rngs.noise(), h[:, :2].shape)
            return self.decode(z)

    class Half(nnx.Module):  # bfloat16 logits reach the loss: its rounding is no difference of form
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 64, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs)
            self.out = nnx.Linear(64, 2, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    def reconstruction(model, batch):
        return jnp.mean(jnp.sum((model(batch["x"]) - batch["x"]) ** 2, -1))

    def plain(model, batch):
        return jnp.mean(losses.cross_entropy(model(batch["x"]), batch["label"]))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=1, loss_fn=kerass).fit(loader, eval_data=loader)
        Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=1).fit(loader, eval_data=loader)
        Trainer(Sampling(nnx.Rngs(0, noise=1)), optax.adam(1e-3), max_epochs=1, loss_fn=reconstruction).fit(
            loader, eval_data=loader)
        x = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)  # where bf16's rounding showed 0.16%
        quadrants = {"x": x, "label": (x[:, 0] * x[:, 1] > 0).astype(np.int32)}
        Trainer(Half(nnx.Rngs(0)), optax.adam(1e-2), max_epochs=1, loss_fn=plain).fit(
            ArrayLoader(quadrants, 32), eval_data=ArrayLoader({k: v[:100] for k, v in quadrants.items()}, 32,
                                                               shuffle=False, drop_remainder=False))
