"""ArrayLoader: every example once per epoch, reshuffled by (seed, epoch), exact positions."""

from __future__ import annotations

import re

import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TinyMLP
from trainer import ArrayLoader, Trainer


def ids_of(iterator):
    return np.concatenate([b["id"] for b in iterator])


@pytest.fixture
def arrays():
    return {"id": np.arange(100), "x": np.arange(100, dtype=np.float32)[:, None] * 2}


def test_every_example_once_per_epoch(arrays):
    loader = ArrayLoader(arrays, 10, seed=1)
    for epoch in range(3):
        assert sorted(ids_of(loader.iterator(epoch))) == list(range(100))


def test_batches_keep_rows_together(arrays):
    batch = next(iter(ArrayLoader(arrays, 10, seed=1)))
    np.testing.assert_array_equal(batch["x"][:, 0], batch["id"] * 2)


def test_order_differs_between_epochs_and_repeats_for_same_seed(arrays):
    a, b = ArrayLoader(arrays, 10, seed=1), ArrayLoader(arrays, 10, seed=1)
    assert not np.array_equal(ids_of(a.iterator(0)), ids_of(a.iterator(1)))
    np.testing.assert_array_equal(ids_of(a.iterator(1)), ids_of(b.iterator(1)))
    assert not np.array_equal(ids_of(a.iterator(0)), ids_of(ArrayLoader(arrays, 10, seed=2).iterator(0)))


def test_set_state_of_get_state_continues_the_same_sequence(arrays):
    loader = ArrayLoader(arrays, 10, seed=4)
    it = loader.iterator(epoch=2)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = ids_of(it)
    other = loader.iterator()
    other.set_state(state)
    np.testing.assert_array_equal(ids_of(other), rest)
    assert state == {"epoch": 2, "position": 3, "seed": 4, "num_examples": 100, "batch_size": 10}


def test_state_from_other_data_is_refused(arrays):
    state = ArrayLoader(arrays, 10, seed=4).iterator().get_state()
    with pytest.raises(ValueError, match="seed=4 but this loader has seed=5"):
        ArrayLoader(arrays, 10, seed=5).iterator().set_state(state)


def test_remainder_is_dropped_or_kept(arrays):
    assert len(ArrayLoader(arrays, 30)) == 3
    kept = ArrayLoader(arrays, 30, shuffle=False, drop_remainder=False)
    assert len(kept) == 4 and [len(b["id"]) for b in kept] == [30, 30, 30, 10]


def test_plain_iteration_is_one_fresh_pass(arrays):
    loader = ArrayLoader(arrays, 10, seed=1)
    np.testing.assert_array_equal(ids_of(loader), ids_of(loader))


@pytest.mark.parametrize("args, message", [
    (({"x": np.zeros((0, 2))}, 4), "empty dataset"),
    (({"x": np.zeros((5, 2))}, 8), "batch_size=8 is larger than the dataset"),
    (({"x": np.zeros((5, 2))}, 0), "batch_size=0"),
    (({"x": np.zeros((5, 2)), "y": np.zeros(4)}, 2), r"share their first \(example\) axis"),
])
def test_bad_loader_input_is_refused(args, message):
    with pytest.raises(ValueError, match=message):
        ArrayLoader(*args)


def test_lists_are_arrays_and_bad_columns_are_named():
    x = np.zeros((10, 3), np.float32)
    loader = ArrayLoader({"x": x, "label": [0, 1] * 5}, 4, shuffle=False)  # a list of numbers: one array
    assert next(iter(loader))["label"].tolist() == [0, 1, 0, 1]
    first = next(iter(ArrayLoader([x, np.arange(10)], 4, shuffle=False)))  # a list of arrays: a pytree
    assert [a.shape for a in first] == [(4, 3), (4,)]
    for column, found in ((None, "['label']: no first axis"), ([0, 1], "['label']: 2"), ("abc", "['label']: no first axis")):
        with pytest.raises(ValueError, match=re.escape(f"share their first (example) axis; found {found}, ['x']: 10")):
            ArrayLoader({"x": x, "label": column}, 4)
    with pytest.raises(ValueError, match="batch_size=True must be a positive integer"):
        ArrayLoader({"x": x}, True)


@pytest.mark.parametrize("seed", [-1, 2 ** 63, None, 1.7, True, "3"])
def test_a_seed_that_is_no_integer_in_0_to_2_pow_63_is_refused_when_built(arrays, seed):
    with pytest.raises(ValueError, match=re.escape(f"seed={seed!r} must be an integer in [0, 2**63)")):
        ArrayLoader(arrays, 10, seed=seed)


def test_the_largest_seed_and_numpy_integers_are_accepted(arrays):
    assert ArrayLoader(arrays, 10, seed=2 ** 63 - 1).seed == 2 ** 63 - 1
    assert len(ids_of(ArrayLoader(arrays, 10, seed=2 ** 63 - 1))) == 100
    assert type(ArrayLoader(arrays, 10, seed=np.int64(3)).seed) is int


def test_data_whose_len_refuses_trains_with_its_length_unknown(data):
    """A torch DataLoader over an IterableDataset has __len__ but raises TypeError from it: fit died
    before training with torch's traceback; the length is now taken as unknown."""
    batches = list(ArrayLoader(data, 16, shuffle=False))

    class NoLength:
        def __iter__(self):
            return iter(batches)

        def __len__(self):
            raise TypeError("object of type 'DS' has no len()")

    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_epochs=2, steps_per_execution=2)
    trainer.fit(NoLength())
    assert trainer.step == 2 * len(batches) and trainer.epoch_length is None


def test_a_second_fit_on_a_stopped_generator_says_it_goes_on_rather_than_starting_again(data):
    """A generator cannot start a fresh pass: the warning said it did; it goes on with what is left."""
    from callbacks import Callback

    class StopAt3(Callback):
        def on_step_end(self, trainer, step, metrics):
            if step == 3:
                trainer.request_stop("enough")

    generator = (batch for batch in list(ArrayLoader(data, 16, shuffle=False)))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=6, prefetch=0, callbacks=[StopAt3()])
    trainer.fit(generator)
    with pytest.warns(UserWarning, match="is a one-pass iterator, so it goes on with the batches it has not given"):
        trainer.fit(generator)
    assert trainer.step == 6


def test_a_second_fit_on_a_used_up_generator_ends_with_a_warning(data):
    """It gave its batches to the first fit: the second finds none, in epoch 0 too, and ends as data
    that ran dry does (it raised 'yielded no batches in epoch 0')."""
    generator = (batch for batch in list(ArrayLoader(data, 16, shuffle=False)))
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=6, prefetch=0)
    trainer.fit(generator)
    trainer.max_steps = 12
    with pytest.warns(RuntimeWarning, match="yielded no batches in epoch 0"):
        trainer.fit(generator)
    assert trainer.step == 6 and trainer.stop_reason.startswith("train_data ran out")


class ForeignTensor:
    """Another library's tensor, as PyTorch's looks to JAX: a shape, a dtype of its own kind, and ``__array__``."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, f"foreign.{array.dtype}"

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


def test_batches_of_another_librarys_tensors_train_evaluate_and_predict_as_numpy_ones(data):
    """A torch DataLoader's tensors reached JAX as they were (its error: "... as an abstract array")."""
    import jax

    numpy_batches = [{k: v[i:i + 32] for k, v in data.items()} for i in range(0, 96, 32)]
    foreign = [{k: ForeignTensor(v) for k, v in b.items()} for b in numpy_batches]
    as_tuples = [(ForeignTensor(b["x"]), ForeignTensor(b["label"])) for b in numpy_batches]
    results = []
    for batches in (numpy_batches, foreign, as_tuples):
        model = TinyMLP(rngs=nnx.Rngs(0))
        trainer = Trainer(model, optax.adam(1e-2), max_epochs=2, steps_per_execution=2)
        history = trainer.fit(batches, eval_data=batches)
        results.append((history, trainer.evaluate(batches), trainer.predict([b[0] if isinstance(b, tuple) else b["x"]
                                                                            for b in batches]),
                        jax.tree.leaves(nnx.state(model, nnx.Param))))
    expected = results[0]
    for history, evaluated, predicted, params in results[1:]:
        assert history == expected[0] and evaluated == expected[1]
        np.testing.assert_array_equal(predicted, expected[2])
        assert all(np.array_equal(a, b) for a, b in zip(params, expected[3]))


def test_a_torch_data_loader_trains_as_its_numpy_arrays_would(data):
    torch = pytest.importorskip("torch")  # an extra of the benchmarks only, never a dependency
    from torch.utils.data import DataLoader, TensorDataset

    tensors = TensorDataset(torch.from_numpy(data["x"]), torch.from_numpy(data["label"]))
    loader = DataLoader(tensors, batch_size=32)
    numpy_batches = [(data["x"][i:i + 32], data["label"][i:i + 32]) for i in range(0, 96, 32)]
    fits = [Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2).fit(d, eval_data=d)
            for d in (loader, numpy_batches)]
    assert fits[0] == fits[1]


@pytest.mark.parametrize("ragged", ["drop", "pad"])
def test_empty_batches_are_skipped_in_fit_and_evaluate(data, ragged, recwarn):
    """A slice past the data's end (0 rows) was "dropped" with a warning about compiling, broke a padded fit on
    its mask, and an evaluation on a metric of shape (0,); it holds nothing, so it is passed over."""
    import jax

    batches = [{k: v[i:i + 32] for k, v in data.items()} for i in range(0, 96, 32)]
    empty = {k: v[:0] for k, v in data.items()}
    results = []
    for fed in (batches, [empty, *batches[:2], empty, batches[2], empty]):
        model = TinyMLP(rngs=nnx.Rngs(0))
        trainer = Trainer(model, optax.adam(1e-2), max_epochs=2, ragged_batches=ragged)
        results.append((trainer.fit(fed, eval_data=fed), trainer.evaluate(fed),
                        jax.tree.leaves(nnx.state(model, nnx.Param)), trainer.step))
    assert results[0][:2] == results[1][:2] and results[0][3] == results[1][3] == 6
    assert all(np.array_equal(a, b) for a, b in zip(results[0][2], results[1][2]))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    inputs = [b["x"] for b in batches]  # and predict, an empty batch first (it set the batch size to 0)
    np.testing.assert_array_equal(trainer.predict([empty["x"], *inputs, empty["x"]]), trainer.predict(inputs))
