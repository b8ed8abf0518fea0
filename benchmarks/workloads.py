"""The three benchmark workloads: the same host numpy batches and model shapes for every variant.

- ``mnist_cnn``: the MNIST recipe's CNN (random shifts, dropout 0.25) at batch 128 on the bundled
  digits, AdamW with the recipe's warmup + cosine schedule.
- ``transformer``: the transformer recipe's model (2 layers, width 128, 4 heads, context 128,
  dropout 0.05, tied head) at batch 32 on the bundled corpus, AdamW + clipping as in the recipe.
- ``mlp``: a tiny MLP (64 -> 128 -> 128 -> 10, ReLU) at batch 32 on fixed random data, Adam: the
  smallest step of the three, where the per-call overhead weighs most (on a GPU most of the step; on
  the 2-core CPU ~30% of a bare single step, XLA's products the rest: ``HISTORY.md``, sitting 15).

``NUM_BATCHES`` batches are built once and replayed, one pass per epoch: 30 for the CNN and the
transformer (the MNIST recipe's epoch is 31), 600 for the MLP, whose steps are so short that
30-step epochs would measure epoch ends (a host read of the epoch's metrics), not steps.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

NUM_BATCHES = {"mnist_cnn": 30, "transformer": 30, "mlp": 600}  # one epoch; multiples of the fused chunk (10)
WORKLOADS = ("mnist_cnn", "transformer", "mlp")
BATCH_SIZE = {"mnist_cnn": 128, "transformer": 32, "mlp": 32}
MLP_SIZES = (64, 128, 128, 10)
TRANSFORMER = dict(context=128, layers=2, width=128, heads=4, dropout=0.05)
TOTAL_STEPS = 100_000  # schedule length: the learning rate stays in its warm, sane range throughout


def scratch_dir(prefix: str) -> str:
    """A fresh folder for a run's logs and checkpoints: under the suite's scratch folder
    (``BENCH_SCRATCH``, removed when the suite ends) when the suite started this process."""
    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_SCRATCH"))


def batches(workload: str, num_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """``num_batches`` host batches: ``{"image", "label"}`` or ``{"tokens", "targets"}``.

    Under the suite, read from the ``.npz`` files the coordinator wrote (``BENCH_DATA``), so that
    a PyTorch worker does not import JAX just to build its data.
    """
    folder = os.environ.get("BENCH_DATA")
    if folder and os.path.exists(os.path.join(folder, f"{workload}.npz")):
        with np.load(os.path.join(folder, f"{workload}.npz")) as saved:
            keys = sorted({name.split("/", 1)[1] for name in saved.files})
            count = len(saved.files) // len(keys)
            return [{k: saved[f"{i}/{k}"] for k in keys} for i in range(min(count, num_batches or count))]
    return build_batches(workload, num_batches)


def save_batches(workload: str, folder: str) -> None:
    """Writes ``batches(workload)`` to ``<folder>/<workload>.npz`` for the workers."""
    arrays = {f"{i}/{k}": v for i, batch in enumerate(build_batches(workload)) for k, v in batch.items()}
    np.savez(os.path.join(folder, f"{workload}.npz"), **arrays)
    if workload == "transformer":
        with open(os.path.join(folder, "vocab_size.txt"), "w") as f:
            f.write(str(vocab_size()))


def build_batches(workload: str, num_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    size = BATCH_SIZE[workload]
    num_batches = num_batches or NUM_BATCHES[workload]
    if workload == "mnist_cnn":
        from recipes.datasets import load_mnist_bundled

        train, _ = load_mnist_bundled(seed=0)
        x, y = train["image"], train["label"]
        reps = -(-num_batches * size // len(x))
        x, y = np.concatenate([x] * reps), np.concatenate([y] * reps)
        return [{"image": x[i * size:(i + 1) * size], "label": y[i * size:(i + 1) * size]} for i in range(num_batches)]
    if workload == "transformer":
        from recipes.text import CharVocab, TextWindows, default_corpus

        text = default_corpus()
        tokens = CharVocab.from_text(text).encode(text)
        windows = TextWindows(tokens, context=TRANSFORMER["context"], batch_size=size, seed=0)
        it = windows.iterator(0)
        return [next(it) for _ in range(num_batches)]
    if workload == "mlp":
        rng = np.random.default_rng(0)
        w = rng.normal(size=(MLP_SIZES[0], MLP_SIZES[-1]))
        out = []
        for _ in range(num_batches):
            x = rng.normal(size=(size, MLP_SIZES[0])).astype(np.float32)
            out.append({"image": x, "label": np.argmax(x @ w, axis=1).astype(np.int32)})
        return out
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}.")


def vocab_size() -> int:
    """The transformer's vocabulary: the bundled corpus's characters plus the unknown id."""
    folder = os.environ.get("BENCH_DATA")
    if folder and os.path.exists(os.path.join(folder, "vocab_size.txt")):
        with open(os.path.join(folder, "vocab_size.txt")) as f:
            return int(f.read())
    from recipes.text import CharVocab, default_corpus

    return len(CharVocab.from_text(default_corpus()))


def jax_model(workload: str, seed: int = 0):
    """The flax.nnx model of ``workload`` (the recipes' own classes)."""
    from flax import nnx

    rngs = nnx.Rngs(seed)
    if workload == "mnist_cnn":
        from recipes.mnist import CNN

        return CNN(rngs=rngs)
    if workload == "transformer":
        from recipes.transformer import CharTransformer

        return CharTransformer(vocab_size(), rngs=rngs, **TRANSFORMER)
    return MLP(rngs=rngs)


def jax_optimizer(workload: str):
    """The optax optimizer of ``workload`` (the recipes' configs)."""
    if workload == "mnist_cnn":
        from recipes.mnist import MnistOptim

        return MnistOptim().build(total_steps=TOTAL_STEPS)
    if workload == "transformer":
        from recipes.transformer import TransformerOptim

        return TransformerOptim().build(total_steps=TOTAL_STEPS)
    from trainer.optim import OptimConfig

    return OptimConfig(optimizer="adam", learning_rate=1e-3, schedule="constant").build(TOTAL_STEPS)


def jax_loss(workload: str):
    """``(model, batch) -> (loss, metrics)``: the recipes' loss (cross-entropy on integer labels + accuracy)."""
    from trainer import losses

    return losses.default_loss


def _mlp_class():
    from flax import nnx

    class _MLP(nnx.Module):
        """64 -> 128 -> 128 -> 10 with ReLU."""

        def __init__(self, *, rngs: nnx.Rngs):
            a, b, c, d = MLP_SIZES
            self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs), nnx.Linear(b, c, rngs=rngs), nnx.Linear(c, d, rngs=rngs)])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.relu(layer(x))
            return self.layers[-1](x)

    return _MLP


def MLP(*, rngs):  # noqa: N802 - a constructor
    return _mlp_class()(rngs=rngs)
