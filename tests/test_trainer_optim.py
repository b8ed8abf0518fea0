"""Optimizers and schedules from plain values: they build, and their learning rates are optax's."""

from __future__ import annotations

import numpy as np
import optax
import pytest

from conftest import TinyMLP
from flax import nnx
from trainer import ArrayLoader, OptimConfig, Trainer, make_optimizer, make_schedule
from trainer.optim import current_learning_rate

STEPS = [0, 5, 10, 11, 50, 99, 100]


@pytest.mark.parametrize("name, kwargs, reference", [
    ("constant", {}, optax.constant_schedule(0.1)),
    ("warmup_cosine", {"warmup_steps": 10, "end_learning_rate": 0.001},
     optax.warmup_cosine_decay_schedule(0.0, 0.1, 10, 100, end_value=0.001)),
    ("exponential", {"decay_rate": 0.5, "decay_steps": 20}, optax.exponential_decay(0.1, 20, 0.5)),
    ("exponential", {"warmup_steps": 10, "decay_rate": 0.5, "decay_steps": 20},
     optax.join_schedules([optax.linear_schedule(0.0, 0.1, 10), optax.exponential_decay(0.1, 20, 0.5)], [10])),
    ("exponential", {"decay_rate": 0.5, "decay_steps": 20, "end_learning_rate": 0.02},  # a floor (was ignored)
     optax.exponential_decay(0.1, 20, 0.5, end_value=0.02)),
    ("constant", {"warmup_steps": 10},
     optax.join_schedules([optax.linear_schedule(0.0, 0.1, 10), optax.constant_schedule(0.1)], [10])),
])
def test_schedule_values_match_optax(name, kwargs, reference):
    schedule = make_schedule(name, learning_rate=0.1, total_steps=100, **kwargs)
    for step in STEPS:
        assert float(schedule(step)) == pytest.approx(float(reference(step)), rel=1e-6, abs=1e-9)


def test_warmup_rises_linearly_then_peaks():
    schedule = make_schedule("warmup_cosine", learning_rate=0.1, total_steps=100, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.05)
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_each_optimizer_builds_and_trains(data, name, clip_norm):
    tx = make_optimizer(name, learning_rate=0.05, weight_decay=1e-4, nesterov=(name == "sgd"), clip_norm=clip_norm)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_epochs=4)
    history = trainer.fit(ArrayLoader(data, 32))
    assert history[-1]["loss"] < history[0]["loss"]


def test_learning_rate_is_read_from_optimizer_state_at_each_step(data):
    config = OptimConfig(optimizer="adamw", learning_rate=0.1, schedule="warmup_cosine", warmup_steps=4)
    schedule = config.make_schedule(total_steps=12)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), config.build(total_steps=12), max_steps=12)
    seen = []
    from callbacks import Callback

    class Spy(Callback):
        def on_step_end(self, trainer, step, metrics):
            seen.append(float(trainer.learning_rate))

    trainer.callbacks.callbacks.append(Spy())
    trainer.fit(ArrayLoader(data, 32))
    # step k (1-based) used the schedule's value at count k - 1
    np.testing.assert_allclose(seen, [float(schedule(k)) for k in range(12)], rtol=1e-6)


def test_sgd_with_nesterov_momentum_matches_optax():
    mine = make_optimizer("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
    ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
    params = {"w": np.ones(3, np.float32)}
    grads = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    s1, s2 = mine.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = mine.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": -1e-3}, "learning_rate=-0.001 must be positive"),
    ({"learning_rate": 0.0}, "must be positive"),
    ({"learning_rate": 1e-3, "clip_norm": 0.0}, "clip_norm"),
    ({"learning_rate": 1e-3, "weight_decay": -1.0}, "weight_decay"),
    ({"learning_rate": 1e-3, "momentum": 1.5}, r"momentum=1.5 must be in \[0, 1\)"),
    ({"learning_rate": 1e-3, "momentum": -1.0}, r"momentum=-1.0 must be in \[0, 1\)"),
    ({"learning_rate": 1e-3, "b2": 1.0}, r"b2=1.0 must be in \[0, 1\)"),
])
def test_bad_optimizer_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer("adamw", **kwargs)


def test_bad_schedule_values_are_refused():
    with pytest.raises(ValueError, match="learning_rate=0 must be positive"):
        make_schedule("constant", learning_rate=0)
    with pytest.raises(ValueError, match="needs total_steps"):
        make_schedule("warmup_cosine", learning_rate=0.1, warmup_steps=10)
    with pytest.raises(ValueError, match="choose one of"):
        make_schedule("linear_decay", learning_rate=0.1)
    with pytest.raises(ValueError, match="choose one of"):
        make_optimizer("lamb", learning_rate=0.1)


def test_an_end_learning_rate_above_the_peak_is_refused_and_a_growing_exponential_ignores_it():
    for name in ("warmup_cosine", "exponential"):
        with pytest.raises(ValueError, match=r"end_learning_rate=0.5 is above learning_rate=0.003"):
            make_schedule(name, learning_rate=3e-3, total_steps=100, end_learning_rate=0.5)
    with pytest.warns(UserWarning, match=r"decay_rate=2.0 grows the rate: ignored"):  # optax pinned it at the end
        growing = make_schedule("exponential", learning_rate=1e-3, decay_rate=2.0, decay_steps=2, end_learning_rate=1e-4)
    assert [round(float(growing(s)), 6) for s in (0, 2, 4)] == [0.001, 0.002, 0.004]


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_weight_decay_reaches_the_matrices_only_when_asked(name):
    """AdamW decayed LayerNorm scales, biases and embeddings with no way to say otherwise."""
    import jax
    import jax.numpy as jnp

    params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2), "scale": jnp.ones(2),
              "query": {"bias": jnp.ones((4, 2))}}  # attention's [heads, head_dim] bias: still a bias
    zero = jax.tree.map(jnp.zeros_like, params)
    for mask, decayed in (("all", {"kernel", "bias", "scale", "query"}), ("matrices", {"kernel"}),
                          ({"kernel": False, "bias": True, "scale": False, "query": {"bias": False}}, {"bias"})):
        tx = make_optimizer(name, learning_rate=0.1, weight_decay=0.5, weight_decay_mask=mask)
        updates, _ = tx.update(zero, tx.init(params), params)  # zero gradients: only the decay moves them
        moved = {k for k, u in updates.items() if max(float(jnp.abs(x).max()) for x in jax.tree.leaves(u)) > 0}
        assert moved == decayed, (name, mask)
    with pytest.raises(ValueError, match=r"weight_decay_mask='biases' is not known"):
        make_optimizer(name, learning_rate=0.1, weight_decay=0.5, weight_decay_mask="biases")


def test_optim_config_passes_adams_betas_and_warns_about_settings_its_choice_ignores():
    """OptimConfig had no b1 / b2, and Nesterov momentum of an Adam or an exponential decay rate of a
    cosine schedule were ignored without a word."""
    import jax.numpy as jnp

    params = {"w": jnp.ones(2)}
    grads = {"w": jnp.array([1.0, -2.0])}
    config = OptimConfig(optimizer="adam", schedule="constant", b1=0.5, b2=0.75, weight_decay=0.0, learning_rate=0.1)
    tx = config.build()
    updates, _ = tx.update(grads, tx.init(params), params)
    ref = optax.adam(0.1, b1=0.5, b2=0.75)
    expected, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    assert config.ignored_settings() == []
    noisy = OptimConfig(optimizer="adam", momentum=0.3, nesterov=True, decay_rate=0.5, weight_decay=0.0,
                        weight_decay_mask="matrices")
    assert noisy.ignored_settings() == ["decay_rate", "momentum", "nesterov", "weight_decay_mask"]
    with pytest.warns(UserWarning, match=r"optimizer='adam', schedule='warmup_cosine': ignored decay_rate=0.5 \(only "
                                         r"exponential reads it\); momentum=0.3 \(only sgd reads it\); nesterov=True "
                                         r"\(only sgd reads it\); weight_decay_mask='matrices' \(weight_decay is 0\)"):
        noisy.build(100)
    plain = OptimConfig(optimizer="sgd", momentum=0.0, nesterov=True)  # Nesterov without momentum: plain SGD
    with pytest.warns(UserWarning, match=r"ignored nesterov=True \(momentum is 0\)"):
        plain.build(100)


def test_plain_optax_optimizer_has_no_injected_learning_rate():
    assert current_learning_rate(optax.adam(1e-3).init({"w": np.zeros(2)})) is None


def test_global_norm_is_optaxs_over_every_leaf_in_float32():
    import jax
    import jax.numpy as jnp

    from trainer.optim import global_norm

    rng = np.random.default_rng(0)
    tree = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.bfloat16),
            "nested": [jnp.asarray(rng.normal(size=(2, 2, 2)), jnp.float32), jnp.float32(-4.0)]}
    as_f32 = {k: v for k, v in tree.items()}
    as_f32["b"] = tree["b"].astype(jnp.float32)
    assert global_norm(tree).dtype == jnp.float32
    assert float(global_norm(tree)) == pytest.approx(float(optax.tree.norm(as_f32)), rel=1e-6)
    assert float(global_norm(tree, squared=True)) == pytest.approx(float(optax.tree.norm(as_f32)) ** 2, rel=1e-6)
    assert float(global_norm({"only": jnp.asarray([3.0, 4.0])})) == 5.0
    assert float(global_norm({})) == 0.0
    assert not np.isfinite(float(global_norm(dict(tree, b=tree["b"].at[1].set(jnp.inf)))))
    large = {"w": jnp.asarray(rng.normal(size=(1 << 17,)), jnp.float32), "b": jnp.asarray(rng.normal(size=7), jnp.float32)}
    assert float(global_norm(large)) == pytest.approx(float(optax.tree.norm(large)), rel=1e-6)
    # a small tree is summed as one concatenation, a large one leaf by leaf (no copy of it all)
    assert "concatenate" in str(jax.make_jaxpr(global_norm)(tree))
    assert "concatenate" not in str(jax.make_jaxpr(global_norm)(large))


def _plateau_run(data, tx, steps):
    """Fits ``steps`` steps, returning each step's loss and the learning rate the trainer reports after it."""
    from callbacks import Callback

    losses, rates = [], []

    class Spy(Callback):
        def on_step_end(self, trainer, step, metrics):
            losses.append(float(metrics["loss"]))
            rates.append(float(trainer.learning_rate))

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=steps, callbacks=[Spy()])
    trainer.fit(ArrayLoader(data, 32))
    return trainer, losses, rates


def test_reduce_on_plateau_gets_each_steps_loss_and_the_reported_rate_falls_with_its_scale(data):
    # optax's own plateau rule: the train step passes value=loss to a transformation taking extra arguments
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=2, rtol=0.0, atol=1e-9, accumulation_size=1)
    tx = optax.chain(make_optimizer("adam", learning_rate=1e-3), plateau)
    trainer, losses, rates = _plateau_run(data, tx, 12)
    state = trainer.state.opt_state[1]
    assert float(state.best_value) == pytest.approx(min(losses), rel=1e-6)  # the value it saw is the loss
    assert rates[0] == pytest.approx(1e-3)
    # an unreachable improvement (a rate so small the loss cannot halve): the scale halves every 2 steps
    stuck = optax.contrib.reduce_on_plateau(factor=0.5, patience=2, rtol=0.5, accumulation_size=1)
    trainer, losses, rates = _plateau_run(data, optax.chain(make_optimizer("adam", learning_rate=1e-3), stuck), 8)
    # the first step sets the best; then each 2 steps that do not halve it halve the scale (steps 3, 5, 7)
    assert float(trainer.state.opt_state[1].scale) == 0.5 ** 3
    np.testing.assert_allclose(rates, [1e-3 * 0.5 ** ((k - 1) // 2) for k in range(1, 9)], rtol=1e-6)


def test_learning_rates_are_scaled_by_the_plateaus_of_their_own_group():
    from trainer.optim import learning_rates

    injected = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    tx = optax.multi_transform({"a": optax.chain(injected, optax.contrib.reduce_on_plateau()), "b": injected},
                               {"w": "a", "v": "b"})
    state = optax.tree_utils.tree_set(tx.init({"w": np.zeros(2), "v": np.zeros(3)}), scale=0.25)
    assert {k: float(v) for k, v in learning_rates(state).items()} == {"a": pytest.approx(0.025), "b": pytest.approx(0.1)}
    outer = optax.chain(injected, optax.contrib.reduce_on_plateau())  # one above every rate
    state = optax.tree_utils.tree_set(outer.init({"w": np.zeros(2)}), scale=0.5)
    assert float(current_learning_rate(state)) == pytest.approx(0.05)
    named = optax.named_chain(("adam", injected), ("plateau", optax.contrib.reduce_on_plateau()))  # its own name
    state = optax.tree_utils.tree_set(named.init({"w": np.zeros(2)}), scale=0.5)  # is no group of the rates
    assert float(current_learning_rate(state)) == pytest.approx(0.05)
    tail = optax.named_chain(("adam", injected), ("tail", optax.chain(optax.clip(1.0), optax.contrib.reduce_on_plateau())))
    state = optax.tree_utils.tree_set(tail.init({"w": np.zeros(2)}), scale=0.5)  # a stage's plateau scales the chain
    assert float(current_learning_rate(state)) == pytest.approx(0.05)
    nested = optax.multi_transform({"a": optax.chain(injected, optax.contrib.reduce_on_plateau()), "a/b": injected},
                                   {"w": "a", "v": "a/b"})  # a group named like one inside another is not
    state = optax.tree_utils.tree_set(nested.init({"w": np.zeros(2), "v": np.zeros(3)}), scale=0.25)
    assert {k: float(v) for k, v in learning_rates(state).items()} == {"a": pytest.approx(0.025), "a/b": pytest.approx(0.1)}


def test_an_optimizer_needing_more_than_the_loss_is_refused_by_what_it_needs(data):
    tx = optax.chain(optax.sgd(1e-2), optax.scale_by_zoom_linesearch(max_linesearch_steps=4))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx, max_steps=2)
    with pytest.raises(TypeError, match=r"needs 'grad' and 'value_fn'.*passes optax's extra argument value="):
        trainer.fit(ArrayLoader(data, 32))


def test_accumulated_gradients_with_a_plateau_resume_between_updates_bit_for_bit(data, tmp_path):
    # optax.MultiSteps as it stands (not its gradient_transformation()) hands value=loss on to the plateau,
    # and a checkpoint at step 3 (between the updates of steps 2 and 4) holds the partial sum
    import jax

    from callbacks import Checkpoint

    def tx():
        plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=1, rtol=0.5, accumulation_size=1)
        return optax.MultiSteps(optax.chain(make_optimizer("adam", learning_rate=1e-2), plateau), every_k_schedule=2)

    model = TinyMLP(rngs=nnx.Rngs(0))
    whole = Trainer(model, tx(), max_steps=8)
    whole.fit(ArrayLoader(data, 16))
    expected = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert float(whole.learning_rate) == pytest.approx(1e-2 * 0.5 ** 3)  # updates 1-4 saw the loss: 3 halvings
    first = Trainer(TinyMLP(rngs=nnx.Rngs(0)), tx(), max_steps=3, workdir=tmp_path,
                    callbacks=[Checkpoint(every_n_steps=3, every_n_epochs=None)])
    first.fit(ArrayLoader(data, 16))
    assert int(first.state.opt_state.mini_step) == 1  # a batch's gradients waiting for the next
    model = TinyMLP(rngs=nnx.Rngs(0))
    Trainer(model, tx(), max_steps=8, workdir=tmp_path, callbacks=[Checkpoint(every_n_steps=3, every_n_epochs=None)]
            ).fit(ArrayLoader(data, 16), resume=True)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), expected))


def test_a_transformation_of_ones_own_taking_no_extra_argument_still_trains(data):
    """The review's regression: one declared ``GradientTransformationExtraArgs`` whose update takes no ``value``."""
    sgd = optax.sgd(0.1)
    own = optax.GradientTransformationExtraArgs(sgd.init, lambda updates, state, params=None: sgd.update(updates, state))
    reference = Trainer(TinyMLP(rngs=nnx.Rngs(0)), sgd, max_steps=3)
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), own, max_steps=3)
    assert trainer.fit(ArrayLoader(data, 32)) == reference.fit(ArrayLoader(data, 32))
