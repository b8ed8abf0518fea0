"""Models beyond a plain MLP: layers that change their own state when called (``nnx.RNN``'s RNG stream, a
counter, ``sow``), NNX transforms inside the model, layers stacked by ``nnx.vmap``, bfloat16 parameters,
Python numbers in variables, a frozen BatchNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import Checkpoint
from trainer import ArrayLoader, Trainer, load_model, losses

RNG = np.random.default_rng(0)


def sequences(n: int = 20) -> dict[str, np.ndarray]:
    x = RNG.normal(size=(n, 5, 3)).astype(np.float32)
    return {"x": x, "label": (x[..., 0] > 0).astype(np.int32)}


def rows(n: int = 32, width: int = 3) -> dict[str, np.ndarray]:
    x = RNG.normal(size=(n, width)).astype(np.float32)
    return {"x": x, "label": (x[:, 0] > 0).astype(np.int32)}


class Recurrent(nnx.Module):
    """Flax's own RNN: it forks its RNG stream on every call, in eval mode too."""

    def __init__(self, rngs: nnx.Rngs):
        self.rnn = nnx.RNN(nnx.LSTMCell(3, 8, rngs=rngs))
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x))


class Sowing(nnx.Module):
    """Sows a value on each call (and counts its calls' rows in a variable of its own)."""

    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)
        self.seen = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        h = self.lin(x)
        self.sow(nnx.Intermediate, "logits_mean", h.mean())
        self.seen.set_value(self.seen.get_value() + x.shape[0])
        return h


@pytest.mark.filterwarnings("ignore:Using 'Module.sow:DeprecationWarning")  # flax's newer nnx.capture: the same
def test_models_that_change_their_state_when_called_are_evaluated_exactly():
    """The default compute_metrics vmaps the loss over the examples with the model captured from outside the
    vmap: nnx.RNN (its RNG stream), a counter or a sow raised TraceContextError, in evaluate and in fit."""
    data = sequences()
    loader = ArrayLoader(data, 8, shuffle=False, drop_remainder=False)  # a padded last batch of 4
    trainer = Trainer(Recurrent(nnx.Rngs(0)), optax.adam(1e-2), max_steps=2)
    history = trainer.fit(loader, eval_data=loader)
    model = trainer.model
    model.eval()
    logits = model(jnp.asarray(data["x"]))
    expected = float(losses.cross_entropy(logits, data["label"]).mean())
    assert trainer.evaluate(loader)["loss"] == pytest.approx(expected, rel=1e-5)
    assert history[-1]["eval/loss"] == pytest.approx(expected, rel=1e-5)

    data = rows()
    trainer = Trainer(Sowing(nnx.Rngs(0)), optax.sgd(0.1), max_steps=4)
    trainer.fit(ArrayLoader(data, 8), eval_data=ArrayLoader(data, 8, shuffle=False))
    assert int(trainer.state.model_state["seen"][...]) == 4 * 8  # training steps count; evaluations change nothing
    assert not jax.tree.leaves(nnx.filter_state(trainer.state.model_state, nnx.Intermediate))  # dropped after each step
    trainer.model(jnp.asarray(data["x"][:4]))  # an eager look sows into the module: no layer added for the trainer
    np.testing.assert_allclose(trainer.predict(data["x"]), trainer.model.lin(jnp.asarray(data["x"])), rtol=1e-6)


def test_a_variable_that_a_call_fills_is_refused_by_name():
    class Filling(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)
            self.last = nnx.Variable(None)

        def __call__(self, x):
            h = self.lin(x)
            self.last.set_value(h)
            return h

    trainer = Trainer(Filling(nnx.Rngs(0)), optax.sgd(0.1), max_steps=1)
    with pytest.raises(ValueError, match=r"last \(None -> float32\[8, 2\]\).*__init__"):
        trainer.fit(ArrayLoader(rows(), 8))


def test_layers_stacked_by_vmap_with_dropout_train_with_a_key_per_layer():
    """nnx.reseed refused the stacked streams' keys (not scalars): no Trainer could be built for Flax's own
    scan-over-layers pattern with dropout."""
    layers = 3

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.drop = nnx.Linear(4, 4, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return x + self.drop(nnx.relu(self.lin(x)))

    class Stacked(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.inp, self.blocks, self.out = nnx.Linear(3, 4, rngs=rngs), make(rngs), nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, block):
                return block(h)

            return self.out(body(self.inp(x), self.blocks))

    trainer = Trainer(Stacked(nnx.Rngs(0)), optax.sgd(0.1), max_steps=2, seed=3)
    keys = jax.random.key_data(trainer.state.model_state["blocks"]["drop"]["rngs"]["key"][...])
    assert keys.shape[0] == layers and len({tuple(k) for k in np.asarray(keys)}) == layers  # each layer its own
    data = rows()
    trainer.fit(ArrayLoader(data, 8))
    model = trainer.model
    model.eval()
    assert trainer.evaluate(ArrayLoader(data, 8, shuffle=False))["loss"] == pytest.approx(
        float(losses.cross_entropy(model(jnp.asarray(data["x"])), data["label"]).mean()), rel=1e-5)


def test_non_finite_bfloat16_parameters_are_not_checkpointed(tmp_path):
    """numpy's kind of bfloat16 is 'V', not 'f': the check of a save by kind let NaN parameters through."""
    model = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    trainer = Trainer(model, optax.sgd(jnp.inf), max_steps=1, workdir=tmp_path,
                      callbacks=[Checkpoint(every_n_steps=1)])
    with pytest.warns(RuntimeWarning, match="not saving step 1"):
        trainer.fit(ArrayLoader(rows(16), 8))
    assert not list((tmp_path / "checkpoints").glob("*1*"))


def test_an_export_loads_into_a_fresh_module_with_a_python_number_and_an_abstract_one_with_rng_streams(tmp_path):
    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)
            self.seen = nnx.Variable(0)  # a Python number, as Flax allows

        def __call__(self, x):
            self.seen.set_value(self.seen.get_value() + x.shape[0])
            return self.lin(x)

    trainer = Trainer(Counting(nnx.Rngs(0)), optax.sgd(0.1), max_steps=2)
    trainer.fit(ArrayLoader(rows(), 8))
    trainer.save_model(tmp_path / "counting")
    assert int(load_model(tmp_path / "counting", Counting(nnx.Rngs(1))).seen.get_value()) == 16

    data = sequences(8)
    trainer = Trainer(Recurrent(nnx.Rngs(0)), optax.sgd(0.1), max_steps=1)
    trainer.fit(ArrayLoader(data, 8))
    trainer.save_model(tmp_path / "rnn")
    loaded = load_model(tmp_path / "rnn", nnx.eval_shape(lambda: Recurrent(nnx.Rngs(0))))  # no RNG streams saved
    loaded.eval()
    np.testing.assert_allclose(loaded(jnp.asarray(data["x"])), trainer.predict(data["x"]), rtol=1e-5, atol=1e-6)


class Normed(nnx.Module):
    def __init__(self, rngs):
        self.lin, self.bn, self.out = nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.bn(self.lin(x)))


def test_padding_with_batch_statistics_warns_and_a_frozen_batchnorm_stays_frozen_by_the_readmes_override():
    with pytest.warns(UserWarning, match="ragged_batches='pad'.*batch statistics"):
        Trainer(Normed(nnx.Rngs(0)), optax.sgd(0.1), max_epochs=1, ragged_batches="pad").fit(
            ArrayLoader(rows(36), 8, drop_remainder=False))

    class FrozenNorm(Trainer):
        def compute_loss(self, model, batch):
            model.bn.eval()
            return super().compute_loss(model, batch)

    for cls, moves in ((Trainer, True), (FrozenNorm, False)):
        model = Normed(nnx.Rngs(0))
        before = np.array(model.bn.mean[...])
        trainer = cls(model, optax.sgd(0.1), max_steps=3)
        trainer.fit(ArrayLoader(rows(), 8))
        assert (np.abs(np.array(trainer.model.bn.mean[...]) - before).max() > 0) == moves, cls.__name__


class Decoder(nnx.Module):
    """Flax's attention with its decoding cache (``init_cache`` adds ``nnx.Cache`` variables)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
        self.out = nnx.Linear(8, 11, rngs=rngs)

    def __call__(self, tokens, decode: bool = False):
        h = self.embed(tokens)
        mask = None if decode else nnx.make_causal_mask(tokens)
        return self.out(self.attn(h, mask=mask, decode=decode))


def step_logits_after(trainer, tokens):
    return trainer.predict(tokens[:3, :1])


def test_a_decoding_cache_made_after_the_trainer_is_the_modules_own_and_no_export_holds_it(tmp_path):
    """Caches made for generation through trainer.model counted as layers added: every later fit, evaluate,
    predict and save was refused; an export held them (its batch size baked in) and a fresh model could not
    load it."""
    tokens = RNG.integers(0, 11, size=(16, 6)).astype(np.int32)
    data = {"tokens": tokens[:, :-1], "label": tokens[:, 1:]}
    trainer = Trainer(Decoder(nnx.Rngs(0)), optax.adam(1e-2), max_steps=2)
    trainer.fit(ArrayLoader(data, 8))
    model = trainer.model
    model.attn.init_cache((3, 4, 8))  # generation for 3 prompts
    step_logits = [model(jnp.asarray(tokens[:3, i:i + 1]), decode=True) for i in range(4)]
    full = trainer.predict(tokens[:3, :4])
    np.testing.assert_allclose(np.concatenate(step_logits, axis=1), full, atol=1e-5)
    trainer.max_steps = 4
    trainer.fit(ArrayLoader(data, 8))
    assert trainer.step == 4 and model.attn.cached_key.shape[0] == 3  # the module keeps its cache
    model.attn.init_cache((3, 4, 8))  # still the module's to use (not arrays a step donated)
    np.testing.assert_allclose(model(jnp.asarray(tokens[:3, :1]), decode=True), step_logits_after(trainer, tokens),
                               atol=1e-5)
    trainer.save_model(tmp_path / "export")
    loaded = load_model(tmp_path / "export", Decoder(nnx.Rngs(1)))  # built afresh: no cache
    np.testing.assert_allclose(loaded(jnp.asarray(tokens[:, :-1])), trainer.predict(data["tokens"]), atol=1e-6)


def test_groups_of_multi_transform_with_rates_of_their_own_are_monitored_each():
    """The monitor said to wrap the optimizer with inject_hyperparams, which the user had done, twice."""
    from callbacks import LearningRateMonitor, MetricsLogger, MetricWriter

    class Memory(MetricWriter):
        def __init__(self):
            self.rows = []

        def write_scalars(self, step, scalars):
            self.rows.append(dict(scalars))

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "head" if path[0].key == "out" else "body", params)

    tx = optax.multi_transform({"head": optax.inject_hyperparams(optax.adam)(1e-2),
                                "body": optax.inject_hyperparams(optax.sgd)(1e-3)}, labels)
    memory = Memory()
    trainer = Trainer(Normed(nnx.Rngs(0)), tx, max_steps=2,
                      callbacks=[LearningRateMonitor(), MetricsLogger([memory], log_every=2)])
    trainer.fit(ArrayLoader(rows(), 8))
    assert memory.rows[-1]["learning_rate/head"] == pytest.approx(1e-2)
    assert memory.rows[-1]["learning_rate/body"] == pytest.approx(1e-3)
    assert trainer.learning_rate is None  # which one would it be


def test_a_trainer_without_an_optimizer_evaluates_and_predicts_and_refuses_to_fit():
    data = rows(20)
    model = Normed(nnx.Rngs(0))
    trainer = Trainer(model)  # Lightning's validate / predict need no optimizer; nor max_epochs / max_steps
    model.eval()
    logits = model(jnp.asarray(data["x"]))
    assert trainer.evaluate(data)["loss"] == pytest.approx(float(losses.cross_entropy(logits, data["label"]).mean()))
    np.testing.assert_allclose(trainer.predict(data["x"]), logits, rtol=1e-6)
    with pytest.raises(TypeError, match="without an optimizer"):
        trainer.fit(ArrayLoader(data, 4))


def test_intermediate_variables_the_model_holds_are_kept_and_only_what_a_call_sows_is_dropped():
    """Popping every nnx.Intermediate at build and after each step removed a variable a model made in __init__
    (an AttributeError), the perturbations of Flax's nnx.perturb pattern, and values sown before the build."""

    class Scaled(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.scale = nnx.Linear(3, 2, rngs=rngs), nnx.Intermediate(jnp.full((2,), 2.0))

        def __call__(self, x):
            h = self.lin(x) * self.scale[...]
            self.sow(nnx.Intermediate, "act", h)
            return h

    model = Scaled(nnx.Rngs(0))
    model(jnp.zeros((2, 3)))  # sown before the Trainer: the user's to read
    sown = np.array(model.act.get_value()[0])
    trainer = Trainer(model, optax.sgd(0.1), max_steps=2)
    np.testing.assert_array_equal(model.act.get_value()[0], sown)
    trainer.fit(ArrayLoader(rows(), 8))
    assert float(trainer.state.model_state["scale"][...][0]) == 2.0
    np.testing.assert_array_equal(trainer.model.scale[...], [2.0, 2.0])  # the module's own (the state's donated)

    class Perturbed(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.perturb("h", self.lin(x))

    class IntermediateGrads(Trainer):
        def compute_loss(self, model, batch):
            graphdef, rest, perturbations = nnx.split(model, nnx.Not(nnx.Perturbation), nnx.Perturbation)

            def loss_of(perturbations):
                return losses.cross_entropy(nnx.merge(graphdef, rest, perturbations)(batch["x"]), batch["label"]).mean()

            grads = jax.grad(loss_of)(perturbations)
            return loss_of(perturbations), {"h_grad": sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))}

    class PoppingLoss(Trainer):  # reads what the call sowed, as Flax's guide does
        def compute_loss(self, model, batch):
            logits = model(batch["x"])
            sown = nnx.pop(model, nnx.Intermediate)
            penalty = sum(jnp.mean(v ** 2) for v in jax.tree.leaves(sown) if v.ndim == 2)
            return losses.cross_entropy(logits, batch["label"]).mean() + 0.1 * penalty

    results, data = [], rows()
    for called_before in (False, True):  # a value sown before the build is the user's: no state of the trainer
        model = Scaled(nnx.Rngs(0))
        if called_before:
            model(jnp.zeros((2, 3)))
        results.append(PoppingLoss(model, optax.sgd(0.1), max_steps=3).fit(ArrayLoader(data, 8, shuffle=False)))
    assert results[0] == results[1]

    model = Perturbed(nnx.Rngs(0))
    model(jnp.zeros((8, 3)))  # makes the perturbations, as Flax's guide says
    history = IntermediateGrads(model, optax.sgd(0.1), max_steps=2).fit(ArrayLoader(rows(), 8))
    assert history[-1]["h_grad"] > 0


def test_a_state_whose_dtype_a_step_promotes_keeps_its_dtype():
    """check_same_structure refused a float16 average updated with a float32 mean, which trained before."""

    class Averaging(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.mean = nnx.Linear(3, 2, rngs=rngs), nnx.BatchStat(jnp.zeros((), jnp.float16))

        def __call__(self, x):
            self.mean.set_value(0.9 * self.mean.get_value() + 0.1 * x.mean())
            return self.lin(x)

    for k in (1, 2):
        trainer = Trainer(Averaging(nnx.Rngs(0)), optax.sgd(0.1), max_steps=4, steps_per_execution=k)
        trainer.fit(ArrayLoader(rows(), 8))
        assert trainer.state.model_state["mean"][...].dtype == jnp.float16

    class Counting(nnx.Module):  # an integer made a float would be truncated back: refused
        def __init__(self, rngs):
            self.lin, self.n = nnx.Linear(3, 2, rngs=rngs), nnx.BatchStat(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.n.set_value(self.n.get_value() + 0.5)
            return self.lin(x)

    with pytest.raises(ValueError, match=r"n \(int32\[\] -> float32\[\]\)"):
        Trainer(Counting(nnx.Rngs(0)), optax.sgd(0.1), max_steps=1).fit(ArrayLoader(rows(), 8))


def test_padding_warns_of_batch_statistics_only_when_a_batch_is_padded(recwarn):
    Trainer(Normed(nnx.Rngs(0)), optax.sgd(0.1), max_steps=4, ragged_batches="pad").fit(ArrayLoader(rows(32), 8))
    assert not [w for w in recwarn if "batch statistics" in str(w.message)]  # 32 rows: nothing padded
    with pytest.warns(UserWarning, match="padded from 4 to 8 rows.*batch statistics") as caught:
        Trainer(Normed(nnx.Rngs(0)), optax.sgd(0.1), max_epochs=3, ragged_batches="pad", prefetch=0).fit(
            ArrayLoader(rows(36), 8, drop_remainder=False))
    said = [w.filename for w in caught if "batch statistics" in str(w.message)]
    assert said == [__file__]  # once, not every epoch


def test_narrow_integers_and_bfloat16_are_numbers():
    from trainer.dtypes import holds_numbers, is_floating, is_real_number

    assert all(holds_numbers(d) and is_real_number(d) for d in (jnp.int4, jnp.uint4, jnp.bfloat16, np.bool_, np.int8))
    assert is_floating(jnp.bfloat16) and not is_floating(np.int32) and holds_numbers(np.complex64)
    assert not any(holds_numbers(np.dtype(d)) for d in ("U3", "O", "V4"))


def test_a_cache_made_before_the_trainer_stays_usable_and_a_checkpoint_loads_into_a_sowing_model(tmp_path):
    """The module's caches (and Intermediates) held the state's arrays, which the first step donated; a model
    holding sown values did not fit a checkpoint, which holds none."""
    tokens = RNG.integers(0, 11, size=(16, 6)).astype(np.int32)
    data = {"tokens": tokens[:, :-1], "label": tokens[:, 1:]}
    model = Decoder(nnx.Rngs(0))
    model.attn.init_cache((3, 4, 8))
    trainer = Trainer(model, optax.adam(1e-2), max_steps=2)
    trainer.fit(ArrayLoader(data, 8))
    lent = trainer.model
    logits = lent(jnp.asarray(tokens[:3, :1]), decode=True)  # its cache was donated: "Array has been deleted"
    np.testing.assert_allclose(logits, trainer.predict(tokens[:3, :1]), atol=1e-5)

    from callbacks import Checkpoint

    model = Sowing(nnx.Rngs(0))
    model(jnp.zeros((2, 3)))
    Trainer(model, optax.sgd(0.1), max_steps=2, workdir=tmp_path, callbacks=[Checkpoint()]).fit(ArrayLoader(rows(), 8))
    target = Sowing(nnx.Rngs(1))
    target(jnp.zeros((2, 3)))  # sown into, as the trained one was
    load_model(tmp_path, target)
    np.testing.assert_array_equal(target.lin.kernel[...], model.lin.kernel[...])


def test_a_state_split_from_the_module_leaves_the_modules_cache_its_own():
    """unshared copied only other Trainers' arrays: a state assigned from trainer.model shared the module's
    cache again, and the next step donated it (decoding then failed)."""
    tokens = RNG.integers(0, 11, size=(16, 6)).astype(np.int32)
    data = {"tokens": tokens[:, :-1], "label": tokens[:, 1:]}
    model = Decoder(nnx.Rngs(0))
    model.attn.init_cache((3, 4, 8))
    trainer = Trainer(model, optax.adam(1e-2), max_steps=2)
    _, params, rest = nnx.split(trainer.model, nnx.Param, ...)
    trainer.state = trainer.state.replace(params=params, model_state=rest)
    trainer.fit(ArrayLoader(data, 8))
    logits = trainer.model(jnp.asarray(tokens[:3, :1]), decode=True)
    np.testing.assert_allclose(logits, trainer.predict(tokens[:3, :1]), atol=1e-5)
