"""Times a hand-written jax.jit AdamW step of the MNIST CNN at batch 128 (the machine's yardstick).

The issues scale their wall-time budgets with this step time: ``python benchmarks/hand_step.py``.
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


def main(batch: int = 128, steps: int = 30, repeats: int = 5) -> float:
    model = CNN(dropout=0.0, max_shift=0, rngs=nnx.Rngs(0))
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

    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
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
    print(f"hand-written jit AdamW step, MNIST CNN, batch {batch}: median {median:.1f} ms "
          f"(min {min(times):.1f}, max {max(times):.1f}) over {repeats}x{steps} steps")
    return median


if __name__ == "__main__":
    main()
