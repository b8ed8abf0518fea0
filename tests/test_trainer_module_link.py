"""Weights written into the user's module are trained (``trainer.module_link``): by path, by every Trainer of
the module, placed as the state's, with layers added, removed or replaced refused, and cheap to read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from callbacks import Callback, NaNDetector
from conftest import make_data
from trainer import ArrayLoader, OptimConfig, Trainer

DATA = make_data(n=64)


class Two(nnx.Module):
    """Two square layers, so one's weights fit the other."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.a, self.b, self.out = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.b(nnx.relu(self.a(x)))))


def loader():
    return ArrayLoader(DATA, 16, shuffle=False)


def params(module_or_state) -> dict[str, np.ndarray]:
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return {jax.tree_util.keystr(p): np.array(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def trained_from(module: Two, tx=None) -> dict[str, np.ndarray]:
    """A clean run: a Trainer built on a module that holds the weights already."""
    trainer = Trainer(module, tx or optax.sgd(0.1), max_epochs=1)
    trainer.fit(loader())
    return params(trainer.state.params)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_weights_copied_from_one_layer_into_another_are_taken():
    """The registry knew arrays, not where they sat: layer b's array copied into layer a was 'the trainer's own'."""
    module = Two()
    trainer = Trainer(module, optax.sgd(0.1), max_epochs=1)
    lent = trainer.model
    lent.a.kernel[...] = lent.b.kernel[...]
    lent.a.bias[...] = lent.b.bias[...]
    trainer.fit(loader())
    clean = Two()
    clean.a.kernel[...], clean.a.bias[...] = clean.b.kernel[...], clean.b.bias[...]
    assert_same(params(trainer.state.params), trained_from(clean))


def test_a_write_in_on_fit_start_before_a_nan_detector_is_taken():
    """NaNDetector turns the guard on by assigning the state, which counted as a restore and dropped the write."""
    pretrained = nnx.state(Two(7), nnx.Param)

    class Load(Callback):
        def on_fit_start(self, trainer):
            nnx.update(trainer.model, pretrained)

    trainer = Trainer(Two(), optax.sgd(0.1), max_epochs=1, callbacks=[Load(), NaNDetector()])
    trainer.fit(loader())
    assert_same(params(trainer.state.params), trained_from(Two(7)))


def test_the_same_arrays_written_again_after_a_restore_and_a_read_are_taken():
    module = Two()
    trainer = Trainer(module, optax.sgd(0.1), max_epochs=1)
    pretrained = nnx.state(Two(7), nnx.Param)
    nnx.update(module, pretrained)
    trainer.state = jax.tree.map(jnp.copy, trainer.state)  # a restore: the pending write is discarded
    trainer.model  # the module holds the trainer's weights again
    nnx.update(module, pretrained)  # the same arrays, written again
    trainer.fit(loader())
    assert_same(params(trainer.state.params), trained_from(Two(7)))


def test_two_trainers_of_one_module_each_train_their_own_copy_from_every_write():
    module = Two()
    first, second = Trainer(module, optax.sgd(0.1), max_epochs=1), Trainer(module, optax.adam(1e-2), max_epochs=1)
    first.fit(loader())
    second.fit(loader())
    assert_same(params(first.model), trained_from(Two()))  # not the second's weights, which the module held
    assert_same(params(second.model), trained_from(Two(), optax.adam(1e-2)))

    module = Two()
    first, second = Trainer(module, optax.sgd(0.1), max_epochs=1), Trainer(module, optax.sgd(0.1), max_epochs=1)
    nnx.update(module, nnx.state(Two(7), nnx.Param))  # after both were built
    first.fit(loader())
    second.fit(loader())  # the first took the write, and left its own weights in the module since
    expected = trained_from(Two(7))
    assert_same(params(first.state.params), expected)
    assert_same(params(second.state.params), expected)


def test_a_committed_write_takes_the_placement_of_the_array_it_replaces():
    """``device_put`` kept a committed array where it was: the state became committed, and (data parallel)
    fit failed with incompatible devices."""
    module = Two()
    trainer = Trainer(module, optax.sgd(0.1), max_steps=1)
    assert not trainer.state.params["a"]["kernel"][...].committed
    module.a.kernel[...] = jax.device_put(jnp.ones((8, 8)), jax.devices()[0])
    trainer.fit(loader())
    kernel = trainer.state.params["a"]["kernel"][...]
    assert not kernel.committed and not trainer.state.params["b"]["kernel"][...].committed


def test_layers_removed_or_replaced_by_another_class_are_refused_by_name():
    class Doubled(nnx.Linear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    module = Two()
    trainer = Trainer(module, optax.sgd(0.1), max_epochs=1)
    module.b = Doubled(8, 8, rngs=nnx.Rngs(0))  # the same parameters, another computation
    with pytest.raises(ValueError, match=r"the model's layers changed since the Trainer was built: b \(now a Doubled\)"):
        trainer.evaluate(loader())
    module = Two()
    trainer = Trainer(module, optax.sgd(0.1), max_epochs=1)
    del module.b
    with pytest.raises(ValueError, match=r"layers changed since the Trainer was built: b \(removed\)\. Build a new"):
        trainer.fit(loader())
    assert trainer.step == 0


def test_a_read_of_trainer_model_every_step_walks_the_module_once_an_epoch(monkeypatch):
    """A read took three walks of the module (each a few hundred us): reading it every step cost a tiny
    model ~9x its steps. In the loop a read now writes the variables of the last walk; layers are checked
    when an epoch starts. The weights a callback writes after its read are still trained from the next step."""
    from trainer.module_link import ModuleLink

    walks = []
    real = ModuleLink._walk
    monkeypatch.setattr(ModuleLink, "_walk", lambda link: walks.append(1) or real(link))

    class ReadThenScale(Callback):
        def on_step_end(self, trainer, step, metrics):
            model = trainer.model
            if step == 6:
                model.out.kernel[...] = model.out.kernel[...] * 0  # read, then write: trained from step 7

    trainer = Trainer(Two(), optax.sgd(0.0), max_epochs=4, callbacks=[ReadThenScale()])
    trainer.fit(loader())  # 4 epochs of 4 steps
    # built, fit's start, each epoch's start, and the write's check of the layers
    assert trainer.step == 16 and len(walks) == 1 + 1 + 4 + 1, len(walks)
    assert float(jnp.abs(trainer.state.params["out"]["kernel"][...]).sum()) == 0.0


class Odd(nnx.Module):
    """Variables that hold no array (a cache filled later) and two (a pair), between ordinary ones."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.a = nnx.Linear(8, 8, rngs=rngs)
        self.cache = nnx.Cache(None)
        self.pair = nnx.Param((jnp.ones((8,)), jnp.zeros((3,))))
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        scale, shift = self.pair.get_value()
        return self.out(self.bn(self.a(x)) * scale) + shift


def test_writes_land_in_their_own_variable_beside_variables_of_no_or_several_arrays():
    """Variables paired with the state's arrays one to one: a None cache shifted every later write by one
    (a loaded BatchNorm mean landed in its variance)."""
    module = Odd()
    trainer = Trainer(module, optax.sgd(0.0), max_steps=1)
    module.bn.mean.set_value(jnp.full((8,), 7.0))
    module.pair.set_value((jnp.full((8,), 2.0), jnp.full((3,), 0.5)))
    trainer.evaluate(loader())
    state = trainer.state
    np.testing.assert_array_equal(np.asarray(state.model_state["bn"]["mean"][...]), np.full(8, 7.0))
    np.testing.assert_array_equal(np.asarray(state.model_state["bn"]["var"][...]), np.ones(8))
    scale, shift = state.params["pair"].get_value()
    np.testing.assert_array_equal(np.asarray(scale), np.full(8, 2.0))
    np.testing.assert_array_equal(np.asarray(shift), np.full(3, 0.5))
    module.pair.set_value((jnp.ones((3,)), jnp.ones((3,))))
    with pytest.raises(ValueError, match=r"parameter pair was given shape \(3,\) \(3,\), but it has shape \(8,\) \(3,\)"):
        trainer.evaluate(loader())


def test_a_second_trainer_built_on_the_module_is_no_write_for_the_first_but_a_write_before_it_is():
    module = Two()
    first = Trainer(module, optax.sgd(0.1), max_steps=1)
    zeros = jax.tree.map(jnp.zeros_like, first.state.params)
    first.state = first.state.replace(params=zeros)
    second = Trainer(module, optax.sgd(0.1), max_steps=1)  # puts its copies of the module's weights into it
    first.evaluate(loader())
    assert second.step == 0  # alive: what it left is its own (a freed one's weights would be the module's)
    assert float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(first.state.params))) == 0.0

    module = Two()
    first = Trainer(module, optax.sgd(0.1), max_epochs=1)
    nnx.update(module, nnx.state(Two(7), nnx.Param))  # a write, then another Trainer built on the module
    second = Trainer(module, optax.sgd(0.1), max_epochs=1)
    first.fit(loader())
    second.fit(loader())
    expected = trained_from(Two(7))
    assert_same(params(first.state.params), expected)
    assert_same(params(second.state.params), expected)


def test_a_fitted_trainer_is_freed_when_its_last_reference_goes(tmp_path):
    """Its compiled steps held bound methods of it (a cycle): a sweep kept dead trainers and their device arrays
    until Python's cycle collector ran."""
    import gc
    import weakref

    from recipes.common import standard_callbacks

    gc.collect()
    gc.disable()
    try:
        tx = OptimConfig(learning_rate=1e-2).build(total_steps=8)  # LearningRateMonitor reads its rate
        trainer = Trainer(Two(), tx, max_epochs=2, workdir=tmp_path,
                          callbacks=standard_callbacks(str(tmp_path), log_every=2, progress=False, tensorboard=False))
        trainer.fit(loader(), eval_data=ArrayLoader(DATA, 16, shuffle=False, drop_remainder=False))
        trainer.evaluate(loader())
        trainer.predict(DATA["x"])
        _ = trainer.model
        ref = weakref.ref(trainer)
        del trainer
        assert ref() is None
    finally:
        gc.enable()


def test_losses_and_steps_that_are_no_bound_methods_are_called_as_they_are():
    """Holding the trainer's methods weakly refused a staticmethod or a function set on the instance."""
    def mean_square(model, batch):
        return jnp.mean(model(batch["x"]) ** 2)

    class Static(Trainer):
        compute_loss = staticmethod(mean_square)

        @staticmethod
        def predict_step(model, batch):
            return model(batch["x"]) * 2

    trainer = Static(Two(), optax.sgd(0.1), max_steps=2)
    trainer.fit(loader())
    assert trainer.predict(loader()).shape == (64, 3)
    instance = Trainer(Two(), optax.sgd(0.1), max_steps=2)
    instance.compute_loss = mean_square
    instance.fit(loader())
    assert instance.step == 2 and np.isfinite(instance.history[-1]["loss"])


def test_a_tuple_valued_variable_is_each_trainers_own_and_a_kept_snapshot_written_back_is_taken():
    module = Odd()
    first = Trainer(module, optax.sgd(0.1), max_steps=2)
    first.fit(loader())
    mine = first.state.params["pair"].get_value()
    second = Trainer(module, optax.adam(1e-2), max_steps=2)
    second.fit(loader())  # leaves its own pair in the module
    first.evaluate(loader())
    for a, b in zip(first.state.params["pair"].get_value(), mine):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    module = Two()
    trainer = Trainer(module, optax.sgd(0.0), max_steps=1)
    kept = jax.tree.map(lambda x: x, nnx.state(module, nnx.Param))  # the trainer's copies, as built
    nnx.update(module, jax.tree.map(jnp.zeros_like, kept))
    trainer.evaluate(loader())
    nnx.update(module, kept)  # written back: taken again
    trainer.evaluate(loader())
    assert_same(params(trainer.state.params), params(kept))


def test_a_restore_discards_a_pending_write_for_its_trainer_only_and_a_write_after_it_is_taken():
    """A restore claimed whatever the module held as its trainer's own: another Trainer of the module then
    skipped the write too, and the same arrays written again after the restore were ignored."""
    module = Two()
    first, second = Trainer(module, optax.sgd(0.1), max_epochs=1), Trainer(module, optax.sgd(0.1), max_epochs=1)
    kept = jax.tree.map(jnp.copy, first.state)
    written = nnx.state(Two(7), nnx.Param)
    nnx.update(module, written)
    first.state = kept  # a restore: the write is discarded for the first only
    second.fit(loader())
    assert_same(params(second.state.params), trained_from(Two(7)))
    nnx.update(module, written)  # the same arrays, written again after the restore
    first.fit(loader())
    assert_same(params(first.state.params), trained_from(Two(7)))


def test_a_snapshot_written_back_is_the_newest_write_for_every_trainer_of_the_module():
    """A value one live Trainer had left was no write for any, though another Trainer had written since."""
    module = Two()
    first, second = Trainer(module, optax.sgd(0.1), max_epochs=1), Trainer(module, optax.sgd(0.1), max_epochs=1)
    snapshot = jax.tree.map(lambda x: x, nnx.state(second.model, nnx.Param))  # the second's arrays, as lent
    nnx.update(module, nnx.state(Two(7), nnx.Param))
    first.evaluate(loader())  # takes that write (the second keeps it pending)
    nnx.update(module, snapshot)  # written back: the newest write, for both
    first.fit(loader())
    second.fit(loader())
    expected = trained_from(Two())
    assert_same(params(first.state.params), expected)
    assert_same(params(second.state.params), expected)


def test_a_variable_replaced_by_a_new_object_is_seen_by_a_restore_and_by_a_second_trainer():
    """Restores and a new Trainer used the variables of the last walk: a restore wrote into the replaced
    (detached) variable, so the replacement won over it; a Trainer built after it left the first without it."""
    module = Two()
    trainer = Trainer(module, optax.sgd(0.1), max_epochs=1)
    snapshot = jax.tree.map(jnp.copy, trainer.state)
    module.out.kernel = nnx.Param(jnp.zeros((8, 3)))
    trainer.state = snapshot  # the restore wins, and the module shows it at once
    np.testing.assert_array_equal(module.out.kernel[...], snapshot.params["out"]["kernel"][...])
    trainer.evaluate(loader())
    np.testing.assert_array_equal(trainer.state.params["out"]["kernel"][...], snapshot.params["out"]["kernel"][...])

    module = Two()
    first = Trainer(module, optax.sgd(0.0), max_epochs=1)
    module.out = nnx.Linear(8, 3, rngs=nnx.Rngs(5))  # a new layer of the same class: taken by name
    new = np.array(module.out.kernel[...])
    second = Trainer(module, optax.sgd(0.0), max_epochs=1)
    first.evaluate(loader())
    for each in (first, second):
        np.testing.assert_array_equal(each.state.params["out"]["kernel"][...], new)


def test_a_write_another_trainer_takes_first_survives_that_trainers_donation():
    """The other Trainers kept the very array written, which may be the first Trainer's own (a layer copied
    from one it lent) or end up in its state (a state assigned from the module): its next step donated it."""
    module = Two()
    first, second = Trainer(module, optax.sgd(0.1), max_epochs=1), Trainer(module, optax.sgd(0.1), max_epochs=1)
    lent = first.model
    lent.b.kernel.set_value(lent.a.kernel.get_value())  # first's own array, in layer b too
    lent.b.bias.set_value(lent.a.bias.get_value())
    clean = Two()
    clean.b.kernel.set_value(clean.a.kernel.get_value())
    clean.b.bias.set_value(clean.a.bias.get_value())
    expected = trained_from(clean)
    first.fit(loader())
    second.fit(loader())
    assert_same(params(first.state.params), expected)
    assert_same(params(second.state.params), expected)

    module = Two()
    first, second = Trainer(module, optax.sgd(0.1), max_epochs=1), Trainer(module, optax.sgd(0.1), max_epochs=1)
    module.out.kernel.set_value(jnp.full((8, 3), 0.1))
    first.state = first.state.replace(params=nnx.state(module, nnx.Param))  # the written array is first's now
    first.fit(loader())
    second.fit(loader())
    clean = Two()
    clean.out.kernel.set_value(jnp.full((8, 3), 0.1))
    assert_same(params(second.state.params), trained_from(clean))


def test_a_state_assigned_from_the_module_copies_another_trainers_rng_streams_too():
    """unshared knew only the weights another Trainer put into the module, not its RNG streams' arrays."""

    class Dropping(nnx.Module):
        def __init__(self, rngs):
            self.lin, self.drop = nnx.Linear(8, 3, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.lin(x))

    module = Dropping(nnx.Rngs(0))
    first, second = Trainer(module, optax.sgd(0.1), max_epochs=1), Trainer(module, optax.sgd(0.1), max_epochs=1)
    first.state = first.state.replace(params=nnx.state(module, nnx.Param), model_state=nnx.state(module, nnx.Not(nnx.Param)))
    first.fit(loader())
    second.fit(loader())  # its RNG key was donated by first's first step
    assert second.step == first.step == 4
