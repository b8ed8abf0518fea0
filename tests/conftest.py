"""Shared tiny fixtures: a small MLP with dropout and a separable 3-class dataset."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# One persistent compilation cache for the test session, fresh each run (no entry outlives it) and
# inherited by the tests' subprocesses: the same small programs (the tiny MLP's step, a resumed
# run's step) compile once instead of once per test (the checkpoint tests: 119 -> 76 s). Set before
# jax is imported, which reads it then; XLA keys entries by the program and its options.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _compilation_cache = tempfile.mkdtemp(prefix="nnx-trainer-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _compilation_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _compilation_cache, ignore_errors=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

if jax.config.jax_compilation_cache_dir is None:  # jax was imported before this file (a plugin)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class TinyMLP(nnx.Module):
    def __init__(self, din: int = 8, hidden: int = 16, classes: int = 3, dropout: float = 0.0, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def make_data(n: int = 96, din: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, din)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    return {"x": x, "label": y}


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return make_data()


@pytest.fixture
def model() -> TinyMLP:
    return TinyMLP(rngs=nnx.Rngs(0))


def layer_grads(layer: nnx.Module, attribute: str, function, x: np.ndarray, g: np.ndarray):
    """``layer(x)``, and the gradients (input, kernel) of ``sum(layer(x) * g)``, with ``layer.<attribute>``
    (its convolution or product) set to ``function`` on a copy merged inside the trace, as the train step does."""
    import jax.numpy as jnp

    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def f(x, params):
        copy = nnx.merge(graphdef, params, rest)
        setattr(copy, attribute, function)
        return copy(x)

    y, vjp = jax.vjp(f, jnp.asarray(x), params)
    dx, dparams = vjp(jnp.asarray(g))
    return y, dx, dparams["kernel"][...]


def fit_with_and_without_cpu_tuning(make_model, data: dict, capsys, steps: int = 8, between=None) -> dict:
    """``{tuning: (trainer, model, stderr)}`` for 8 Adam steps of a fresh ``make_model()`` with
    ``cpu_tuning`` on and then off, on the same batches; ``between()`` is called between the two."""
    import optax

    from trainer import ArrayLoader, Trainer

    runs = {}
    for tuning in (True, False):
        model = make_model()
        trainer = Trainer(model, optax.adam(1e-2), max_steps=steps, cpu_tuning=tuning)
        trainer.fit(ArrayLoader(data, 8, seed=0))
        runs[tuning] = (trainer, model, capsys.readouterr().err)
        if tuning and between is not None:
            between()
    return runs
