"""Times hand-written jax.jit AdamW steps: the machine's yardsticks that the issues scale budgets with.

``python benchmarks/hand_step.py``: the MNIST CNN at batch 128, then a 2-layer, width-128,
context-128 character transformer at batch 32.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recipes.mnist import CNN


def main() -> None:
    from recipes.transformer import CharTransformer

    rng = np.random.default_rng(0)
    cnn = CNN(dropout=0.0, max_shift=0, rngs=nnx.Rngs(0))
    x = rng.random((128, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, 128).astype(np.int32)
    time_steps("MNIST CNN, batch 128", cnn, x, y)
    lm = CharTransformer(100, context=128, layers=2, width=128, heads=4, dropout=0.0, rngs=nnx.Rngs(0))
    tokens = rng.integers(0, 100, (32, 129)).astype(np.int32)
    time_steps("char transformer (2 layers, width 128, context 128), batch 32", lm, tokens[:, :-1], tokens[:, 1:])


def time_steps(name: str, model: nnx.Module, x: np.ndarray, y: np.ndarray, steps: int = 20, repeats: int = 5) -> float:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, loss = step(params, opt_state, x, y)
    loss.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            params, opt_state, loss = step(params, opt_state, x, y)
        loss.block_until_ready()
        times.append((time.perf_counter() - start) / steps * 1000)
    median = statistics.median(times)
    print(f"hand-written jit AdamW step, {name}: median {median:.1f} ms "
          f"(min {min(times):.1f}, max {max(times):.1f}) over {repeats}x{steps} steps")
    return median


if __name__ == "__main__":
    main()
