"""Where the loss comes from (loss_fn, compute_loss), aux metrics, stateful layers, the hand loop."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import Callback
from conftest import TinyMLP
from trainer import ArrayLoader, Trainer, losses


class LastMetrics(Callback):
    def __init__(self):
        self.metrics = None

    def on_step_end(self, trainer, step, metrics):
        self.metrics = metrics


def test_loss_fn_returning_aux_puts_aux_into_metrics(model, data):
    def loss_fn(model, batch):
        logits = model(batch["x"])
        loss = losses.cross_entropy(logits, batch["label"]).mean()
        return loss, {"mean_logit": logits.mean()}

    spy = LastMetrics()
    trainer = Trainer(model, optax.adam(1e-2), loss_fn=loss_fn, max_epochs=1, callbacks=[spy])
    history = trainer.fit(ArrayLoader(data, 32))
    assert set(spy.metrics) == {"loss", "mean_logit"}
    assert set(history[0]) == {"loss", "mean_logit", "epoch"}
    jax.tree.map(lambda a: a, next(iter(ArrayLoader(data, 32))))
    eval_metrics = trainer.evaluate(ArrayLoader(data, 32, shuffle=False, drop_remainder=False))
    assert set(eval_metrics) == {"loss", "mean_logit"}


def test_subclass_overriding_compute_loss_trains(data):
    class MSETrainer(Trainer):
        def compute_loss(self, model, batch):
            onehot = jax.nn.one_hot(batch["label"], 3)
            return jnp.mean(losses.mse(jax.nn.softmax(model(batch["x"])), onehot))

    trainer = MSETrainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(3e-2), max_epochs=15)
    history = trainer.fit(ArrayLoader(data, 32))
    assert set(history[0]) == {"loss", "epoch"}
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


def test_plain_scalar_loss_fn_is_accepted(model, data):
    trainer = Trainer(model, optax.sgd(0.1), max_steps=3,
                      loss_fn=lambda m, b: losses.cross_entropy(m(b["x"]), b["label"]).mean())
    assert set(trainer.fit(ArrayLoader(data, 32))[0]) == {"loss", "epoch"}


def test_non_scalar_loss_is_refused_with_a_clear_error(model, data):
    trainer = Trainer(model, optax.sgd(0.1), max_steps=3,
                      loss_fn=lambda m, b: losses.cross_entropy(m(b["x"]), b["label"]))
    with pytest.raises(ValueError, match="scalar loss"):
        trainer.fit(ArrayLoader(data, 32))


def test_onehot_labels_mse_and_l2_losses(data):
    onehot = {"x": data["x"], "label": np.eye(3, dtype=np.float32)[data["label"]]}
    for loss_fn, keys in [
        (losses.supervised(losses.cross_entropy_onehot), {"loss", "accuracy"}),
        (losses.supervised(losses.mse, l2=1e-3), {"loss", "l2"}),
    ]:
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), loss_fn=loss_fn, max_epochs=8)
        history = trainer.fit(ArrayLoader(onehot, 32))
        assert set(history[0]) - {"epoch"} == keys
        assert history[-1]["loss"] < history[0]["loss"]


def test_l2_penalty_is_half_sum_of_squares(model):
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert float(losses.l2_penalty(model)) == pytest.approx(0.5 * sum(float(jnp.sum(p ** 2)) for p in params), rel=1e-6)


def test_dropout_model_trains_and_same_seed_repeats_the_run(data):
    def run(seed):
        trainer = Trainer(TinyMLP(dropout=0.5, rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, seed=seed)
        trainer.fit(ArrayLoader(data, 32))
        return jax.tree.leaves(nnx.state(trainer.model, nnx.Param)), trainer.history

    (a, ha), (b, hb), (c, _) = run(0), run(0), run(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and ha == hb
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))  # another seed, other dropout masks


def test_fit_matches_a_hand_written_jit_loop(data):
    """Trainer.fit and the loop an expert writes by hand end with the same parameters."""
    tx = optax.adamw(1e-2)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_epochs=2)
    trainer.fit(ArrayLoader(data, 32, seed=5))

    model = TinyMLP(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_of(p):
            logits = nnx.merge(graphdef, p, rest)(batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        grads = jax.grad(loss_of)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    loader = ArrayLoader(data, 32, seed=5)
    for epoch in range(2):
        for batch in loader.iterator(epoch):
            params, opt_state = step(params, opt_state, batch)
    for mine, theirs in zip(jax.tree.leaves(nnx.state(trainer.model, nnx.Param)), jax.tree.leaves(params)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def test_trainer_model_is_the_callers_module_updated_in_place(model, data):
    before = np.array(model.l1.kernel[...])
    trainer = Trainer(model, optax.sgd(0.5), max_steps=3)
    trainer.fit(ArrayLoader(data, 32))
    assert trainer.model is model
    assert not np.array_equal(before, np.array(model.l1.kernel[...]))
    out = model(data["x"][:4])  # usable after fit
    assert out.shape == (4, 3)



def test_reading_trainer_model_again_keeps_what_calling_it_changed_until_the_state_changes(data):
    """Monte-Carlo dropout through ``trainer.model``: its RNG counters advance with each call and a second
    read does not reset them (it reset them, so every call drew the same mask); more training is seen."""
    trainer = Trainer(TinyMLP(dropout=0.5, rngs=nnx.Rngs(0)), optax.sgd(0.5), max_steps=2)
    trainer.fit(ArrayLoader(data, 32))
    x = data["x"][:4]
    trainer.model.train()
    first = np.asarray(trainer.model(x))
    second = np.asarray(trainer.model(x))
    assert not np.array_equal(first, second)
    kernel = np.array(trainer.model.l1.kernel[...])
    trainer.max_steps = 3
    trainer.fit(ArrayLoader(data, 32))
    assert not np.array_equal(kernel, np.array(trainer.model.l1.kernel[...]))

def test_loss_fn_returning_a_dict_with_loss_trains_as_the_tuple_form(data):
    """Lightning's habit, {"loss": ..., **metrics}: the same steps and metrics as (loss, metrics)."""
    def as_tuple(model, batch):
        logits = model(batch["x"])
        return losses.cross_entropy(logits, batch["label"]).mean(), {"mean_logit": logits.mean()}

    def as_dict(model, batch):
        loss, metrics = as_tuple(model, batch)
        return {"loss": loss, **metrics}

    runs = [Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), loss_fn=fn, max_epochs=2).fit(ArrayLoader(data, 32))
            for fn in (as_tuple, as_dict)]
    assert runs[0] == runs[1] and set(runs[1][0]) == {"loss", "mean_logit", "epoch"}
    for bad, message in ((lambda m, b: {"total": as_tuple(m, b)[0]}, r"returned a dict without a 'loss' key \(\['total'\]\)"),
                         (lambda m, b: (as_tuple(m, b)[0], {1: 0.0}), r"returned a metric named 1, a int"),
                         (lambda m, b: (as_tuple(m, b)[0], {"x": None}), r"returned metric 'x' = None")):
        with pytest.raises(TypeError, match=message):
            Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn=bad, max_steps=1).fit(ArrayLoader(data, 32))
    per_class = lambda m, b: (as_tuple(m, b)[0], {"class_logit": m(b["x"]).mean(0)})  # noqa: E731  a [3] metric
    for run in ("fit", "evaluate"):  # training averaged it into one number in silence
        trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), loss_fn=per_class, max_steps=1)
        with pytest.raises(ValueError, match=r"metric 'class_logit' of shape \(3,\); each metric is a scalar .*"
                                             r"class_logit/0"):
            getattr(trainer, run)(ArrayLoader(data, 32))


def test_a_compute_loss_override_that_ignores_loss_fn_is_warned_about_when_built(model):
    """Given both, the override wins; one that neither calls super() nor reads self.loss_fn drops the
    loss_fn silently, so building it says so (an override building on either is not warned about)."""
    import warnings

    class TenTimes(Trainer):
        def compute_loss(self, model, batch):
            return 10 * losses.cross_entropy(model(batch["x"]), batch["label"]).mean()

    class PlusL2(Trainer):
        def compute_loss(self, model, batch):
            return super().compute_loss(model, batch) + 0.0

    class Named(Trainer):
        def compute_loss(self, model, batch):
            return Trainer.compute_loss(self, model, batch)

    class Nested(Trainer):
        def compute_loss(self, model, batch):
            loss = lambda m: self.loss_fn(m, batch)  # noqa: E731
            return loss(model)

    with pytest.warns(UserWarning, match=r"TenTimes overrides compute_loss, which does not use loss_fn="):
        TenTimes(model, optax.sgd(0.1), max_steps=1, loss_fn=losses.supervised(losses.cross_entropy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for uses_it in (PlusL2, Named, Nested):
            uses_it(model, optax.sgd(0.1), max_steps=1, loss_fn=losses.supervised(losses.cross_entropy))
        TenTimes(model, optax.sgd(0.1), max_steps=1)


class Tagger(nnx.Module):
    """Per-position class scores ``[batch, time, 5]`` of 5 token ids: a sequence labeller."""

    def __init__(self):
        self.embed = nnx.Embed(5, 8, rngs=nnx.Rngs(0))
        self.out = nnx.Linear(8, 5, rngs=nnx.Rngs(1))

    def __call__(self, tokens):
        return self.out(self.embed(tokens))


@pytest.mark.parametrize("positions", [3, 8])
def test_a_padded_batch_of_sequences_averages_over_real_rows_and_positions(positions):
    """Per-position outputs ``[batch, time, classes]``: the pad mask weighs rows, not the time axis (a
    [batch] mask broadcast against [batch, time] losses raised for 3 positions, and for 8 (= the batch)
    gave an accuracy of 1.15 and ~8x the loss)."""
    tokens = np.random.default_rng(0).integers(0, 5, size=(20, positions)).astype(np.int32)
    labels = (tokens + 1) % 5
    batches = [{"tokens": tokens[i:i + 8], "label": labels[i:i + 8]} for i in range(0, 20, 8)]  # 8, 8, 4
    model = Tagger()
    logits = np.asarray(model(tokens))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    loss = -np.take_along_axis(log_probs, labels[..., None], -1).mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    history = Trainer(model, optax.sgd(0.0), max_epochs=1, ragged_batches="pad").fit(batches)
    assert history[0]["loss"] == pytest.approx(loss, rel=1e-5)
    assert history[0]["accuracy"] == pytest.approx(accuracy, rel=1e-6)


def test_buckets_of_sequence_lengths_train_fused_where_a_chunk_holds_one_length():
    """With steps_per_execution=K a chunk met a batch of another length (or, as an epoch's length is
    not a multiple of K, the next epoch's chunks fell elsewhere) and the fit was refused after
    training: such a chunk's batches now run as single steps, bitwise as K=1, warned about once."""
    rng = np.random.default_rng(0)
    batches = [{"tokens": t, "label": (t + 1) % 5} for t in
               (rng.integers(0, 5, size=(8, n)).astype(np.int32) for n in (6, 6, 10, 6, 6))]

    class Ends(Callback):
        def __init__(self):
            self.steps = []

        def on_step_end(self, trainer, step, metrics):
            self.steps.append(step)

    single, fused = Ends(), Ends()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the second length compiles again
        reference = Trainer(Tagger(), optax.adam(1e-2), max_epochs=2, callbacks=[single])
        reference.fit(batches)
    with pytest.warns(UserWarning) as seen:
        trainer = Trainer(Tagger(), optax.adam(1e-2), max_epochs=2, steps_per_execution=2, callbacks=[fused])
        trainer.fit(batches)
    split = [str(w.message) for w in seen if "steps_per_execution=2" in str(w.message)]
    assert len(split) == 1 and "step 4 (epoch 0, batch 3)" in split[0] and "unlike the 1 batch(es)" in split[0]
    assert single.steps == list(range(1, 11))
    assert fused.steps == [2, 3, 4, 5, 6, 7, 8, 10]  # chunks at steps 1-2 and 9-10, the rest single
    for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(reference.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_buckets_of_other_sequence_lengths_are_checked_against_their_own_outputs():
    """The label check took the model's output shape from the first batch only: a second bucket of
    sequence length (T=10 after T=6) was refused as mismatched labels. Each shape is asked once; the
    labels' shape and dtype are checked for JAX arrays too (one-hot ones got a raw JAX error)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    batches = [{"tokens": t, "label": (t + 1) % 5} for t in
               (rng.integers(0, 5, size=(8, n)).astype(np.int32) for n in (6, 10, 6))]
    class CompileTime(Callback):
        seen = []

        def on_step_end(self, trainer, step, metrics):
            self.seen.append(trainer.compile_seconds)

    trainer = Trainer(Tagger(), optax.adam(1e-2), max_epochs=2, callbacks=[CompileTime()])
    with pytest.warns(UserWarning, match="compil"):  # the second shape compiles again, said once
        trainer.fit(batches)
    assert trainer.step == 6 and set(trainer._output_shapes.values()) == {(8, 6, 5), (8, 10, 5)}
    seen = CompileTime.seen  # compile time counted at the first step of each shape only (it was the first's)
    assert 0 < seen[0] < seen[1] and seen[1:] == [seen[1]] * 5
    assert trainer.evaluate(batches)["accuracy"] > 0.5
    bad = [{"tokens": batches[1]["tokens"], "label": batches[1]["label"][:, :6]}]
    with pytest.raises(ValueError, match=r"labels at .* have shape \(8, 6\), but the model's outputs \(8, 10, 5\)"):
        trainer.evaluate(bad)
    one_hot = [{"tokens": jnp.asarray(batches[0]["tokens"]), "label": jax.nn.one_hot(batches[0]["label"], 5)}]
    with pytest.raises(ValueError, match=r"are float32 \(8, 6, 5\), but this loss .* takes integer labels"):
        Trainer(Tagger(), optax.adam(1e-2), max_steps=1).fit(one_hot)


def test_a_per_position_mask_averages_training_and_evaluation_over_real_positions():
    """A [batch, time] "mask" of padded sequences: training raised a broadcasting error and
    evaluate silently returned the unmasked mean (the mask broadcast to [1, T, T] per example)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(8, 6)).astype(np.int32)
    targets = rng.integers(0, 5, size=(8, 6)).astype(np.int32)
    mask = np.arange(6)[None, :] < np.array([6, 4, 3, 1, 0, 2, 5, 6])[:, None]
    batches = [{"tokens": tokens[i:i + 4], "label": targets[i:i + 4], "mask": mask[i:i + 4]} for i in (0, 4)]
    model = Tagger()
    logits = np.asarray(model(tokens), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    hits = logits.argmax(-1) == targets
    trainer = Trainer(model, optax.sgd(0.0), max_epochs=1)
    history = trainer.fit(batches)
    first, second = mask[:4], mask[4:]  # training: each batch's mean over its real positions
    expected = (nll[:4][first].mean() + nll[4:][second].mean()) / 2
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-5)
    result = trainer.evaluate(batches)  # evaluation: the mean over every real position
    assert result["loss"] == pytest.approx(nll[mask].mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx(hits[mask].mean(), rel=1e-6)

    def per_sequence(model, batch):  # a loss of one's own that reads the mask itself: each sequence counts once
        nll = losses.cross_entropy(model(batch["tokens"]), batch["label"])
        real = batch["mask"].astype(jnp.float32)
        return jnp.mean(jnp.sum(nll * real, 1) / jnp.maximum(jnp.sum(real, 1), 1.0))

    own = Trainer(model, optax.sgd(0.0), loss_fn=per_sequence, max_steps=1).evaluate(batches)
    per_row = np.array([nll[i][mask[i]].mean() if mask[i].any() else 0.0 for i in range(8)])
    assert own["loss"] == pytest.approx(per_row.mean(), rel=1e-5)  # not weighted by the mask's count
    wrong = [{"tokens": tokens[:4], "label": targets[:4], "mask": mask[:4, :5]}]
    with pytest.raises(ValueError, match=r"'mask' has shape \(4, 5\), but the loss gives values of shape \(4, 6\)"):
        Trainer(Tagger(), optax.sgd(0.1), max_steps=1).fit(wrong)


def test_accuracy_is_reported_for_a_class_axis_only_and_mse_refuses_targets_of_another_shape():
    """One logit or a regression against integer targets logged an ``accuracy`` that was the share
    of label 0 (argmax of one value is 0); mse reshaped transposed targets onto the predictions."""
    x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    one_output = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
    loss, metrics = losses.supervised(losses.mse)(one_output, {"x": x, "y": np.arange(16) % 3})
    assert "accuracy" not in metrics and np.isfinite(float(loss))
    _, metrics = losses.supervised(losses.cross_entropy)(TinyMLP(rngs=nnx.Rngs(0)), {"x": x, "y": np.arange(16) % 3})
    assert "accuracy" in metrics  # three classes: reported
    predictions = jnp.zeros((4, 6))
    assert losses.mse(predictions, jnp.ones((4, 6, 1))).shape == (4,)  # a trailing axis of 1: fine
    with pytest.raises(ValueError, match=r"mse got targets of shape \(6, 4\) for predictions of shape \(4, 6\)"):
        losses.mse(predictions, jnp.ones((6, 4)))


def test_the_default_loss_on_a_model_returning_a_dict_or_tuple_says_to_pass_loss_fn(data):
    class Outputs(nnx.Module):
        def __init__(self, wrap, *, rngs):
            self.layer, self.wrap = nnx.Linear(8, 3, rngs=rngs), wrap

        def __call__(self, x):
            return self.wrap(self.layer(x))

    for wrap, kind in ((lambda y: {"logits": y}, "dict"), (lambda y: (y, y.sum()), "tuple")):
        trainer = Trainer(Outputs(wrap, rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1)
        with pytest.raises(TypeError, match=f"the model returned a {kind}, but this loss .* takes one array of "
                                            "predictions .* Pass loss_fn="):
            trainer.fit(ArrayLoader(data, 32))
