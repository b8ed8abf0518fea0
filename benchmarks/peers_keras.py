"""The Keras 3 peers (JAX backend): the benchmark workloads trained with ``model.fit``.

``run(workload, pacer, steps_per_execution)`` is what ``benchmarks/worker.py`` calls for the
``keras`` (1) and ``keras_k10`` (10) variants; it never returns (the pacer exits the process).
Needs ``pip install -e ".[bench]"``.

The models mirror ``recipes/mnist.py`` (``CNN``, ``RandomShift``), ``recipes/transformer.py``
(``CharTransformer``, ``Block``) and the MLP of ``benchmarks/workloads.py``: the same layer shapes,
activations, dropout rates and Flax's initialisers (LeCun normal kernels, zero biases, normal
embeddings with std 1/sqrt(width), LayerNorm epsilon 1e-6, tanh-approximated GELU as ``nnx.gelu``).
The optimisers mirror ``MnistOptim`` / ``TransformerOptim`` (AdamW, linear warmup from 0 then cosine
decay over ``workloads.TOTAL_STEPS``, global-norm clipping for the transformer) and ``optax.adam(1e-3)``
for the MLP, with optax's epsilon (1e-8, Keras's default is 1e-7).

What Keras does on the JAX backend (read in keras 3.15 ``keras/src/backend/jax/trainer.py`` and
``keras/src/callbacks/callback_list.py``), and so how this file paces it:

- ``steps_per_execution=k`` is *not* a fused loop (no ``lax.scan``): ``train_function`` calls the
  jitted single step ``k`` times from Python, and the callbacks' batch hooks run once per execution
  (``on_train_batch_begin(begin_step)`` / ``on_train_batch_end(end_step, logs)``).
- ``CallbackList.on_train_batch_end`` converts the logs to Python floats (``pythonify_logs``), which
  blocks until the step has finished. Keras runs it on a thread pool (async dispatch) unless some
  user callback overrides ``on_train_batch_end`` / ``on_batch_end`` without ``async_safe = True``;
  then it runs in the training thread, and Keras syncs after *every* execution. So a Keras user
  without batch-level callbacks (``verbose=0``, or the progress bar, which is dispatched async too)
  gets no per-step sync; one with such a callback gets one each execution.
- Hence the pacing callback hooks ``on_train_batch_begin`` by default: it runs synchronously in the
  training thread (the loop cannot run ahead of a waiting pacer), yet it leaves the async dispatch
  of ``on_train_batch_end`` as it is for a callback-free user. At the begin of execution ``j`` it
  reports the steps of execution ``j - 1`` (and at the first execution of a new epoch those of the
  previous epoch's last one, after Keras's epoch-end work). ``pace_on="batch_end"`` paces from
  ``on_train_batch_end`` instead (the literal recipe, which makes Keras sync every execution).
- ``sync`` blocks on the arrays of ``model._jax_state``: the trainer stores the new state
  (trainable, non-trainable, optimizer and metrics variables) there right after each execution "so
  that callbacks can force a state sync"; the model's ``keras.Variable`` objects are only refreshed
  from it at epoch ends. (It is a Keras TrackedDict of TrackedLists, not a pytree: see ``_sync``.)

Data: the workload's 30 batches concatenated into ``x`` / ``y`` arrays and fitted with
``batch_size`` and ``shuffle=False`` (the plain Keras idiom; one "epoch" is the 30 batches, so Keras
does its epoch-end work, state write-back and metric reset, every 30 steps).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import keras
import numpy as np
from keras import layers, ops

from benchmarks import workloads
from benchmarks.protocol import Pacer

# The recipes' optimizer settings (recipes/mnist.py MnistOptim, recipes/transformer.py
# TransformerOptim), copied so that this worker need not import flax and the recipes' callbacks.
OPTIM = {
    "mnist_cnn": dict(learning_rate=3e-3, warmup_steps=31, end_learning_rate=0.0, weight_decay=1e-4, clip_norm=None),
    "transformer": dict(learning_rate=3e-3, warmup_steps=100, end_learning_rate=1e-4, weight_decay=0.1, clip_norm=1.0),
}
MLP_LEARNING_RATE = 1e-3
EPSILON = 1e-8  # optax's Adam epsilon
LN_EPSILON = 1e-6  # flax's LayerNorm epsilon
KERNEL_INIT = "lecun_normal"  # flax's default for Linear, Conv and attention kernels (biases: zeros in both)


class RandomShift(layers.Layer):
    """Translates each training image by up to ``max_shift`` pixels (zero fill); identity in inference.

    The same computation as the recipe's ``RandomShift``: pad by ``max_shift`` and crop each image
    back at a random offset (``ops.vectorized_map`` of ``ops.slice``, i.e. ``jax.vmap`` of
    ``lax.dynamic_slice`` on this backend). Chosen over ``layers.RandomTranslation``, which builds an
    affine transform per image and resamples with interpolation: far more work for integer shifts.
    """

    def __init__(self, max_shift: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_shift = max_shift
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training or self.max_shift == 0:
            return images
        s = self.max_shift
        n, h, w, c = images.shape
        offsets = keras.random.randint((n, 2), 0, 2 * s + 1, seed=self.seed_generator, dtype="int32")
        padded = ops.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
        crop = lambda args: ops.slice(args[0], (args[1][0], args[1][1], 0), (h, w, c))
        return ops.vectorized_map(crop, (padded, offsets))

    def compute_output_shape(self, input_shape):
        return input_shape


def cnn(dropout: float = 0.25, max_shift: int = 2, seed: int = 0) -> keras.Model:
    """The recipe's CNN: random shift, conv 32 / conv 64 (3x3, same, ReLU, 2x2 avg-pool), dense 256, dropout, dense 10."""
    conv = dict(kernel_size=3, padding="same", activation="relu", kernel_initializer=KERNEL_INIT)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        RandomShift(max_shift, seed=seed),
        layers.Conv2D(32, **conv),
        layers.AveragePooling2D(2),
        layers.Conv2D(64, **conv),
        layers.AveragePooling2D(2),
        layers.Flatten(),
        layers.Dense(256, activation="relu", kernel_initializer=KERNEL_INIT),
        layers.Dropout(dropout, seed=seed),
        layers.Dense(10, kernel_initializer=KERNEL_INIT),
    ], name="cnn")


def mlp() -> keras.Model:
    """64 -> 128 -> 128 -> 10 with ReLU."""
    a, b, c, d = workloads.MLP_SIZES
    return keras.Sequential([
        keras.Input((a,)),
        layers.Dense(b, activation="relu", kernel_initializer=KERNEL_INIT),
        layers.Dense(c, activation="relu", kernel_initializer=KERNEL_INIT),
        layers.Dense(d, kernel_initializer=KERNEL_INIT),
    ], name="mlp")


class Block(layers.Layer):
    """Pre-LayerNorm block: causal multi-head self-attention, then a GELU MLP (4x), each residual."""

    def __init__(self, width: int, heads: int, dropout: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.ln1 = layers.LayerNormalization(epsilon=LN_EPSILON)
        # Flax's MultiHeadAttention(in_features=width): q/k/v/out projections with biases, heads of width // heads.
        self.attention = layers.MultiHeadAttention(num_heads=heads, key_dim=width // heads,
                                                   kernel_initializer=KERNEL_INIT)
        self.ln2 = layers.LayerNormalization(epsilon=LN_EPSILON)
        self.up = layers.Dense(4 * width, kernel_initializer=KERNEL_INIT)
        self.down = layers.Dense(width, kernel_initializer=KERNEL_INIT)
        self.dropout = layers.Dropout(dropout, seed=seed)

    def call(self, x, training=None):
        h = self.ln1(x)
        x = x + self.dropout(self.attention(h, h, use_causal_mask=True, training=training), training=training)
        h = self.down(ops.gelu(self.up(self.ln2(x)), approximate=True))  # nnx.gelu is the tanh approximation
        return x + self.dropout(h, training=training)


class CharTransformer(keras.Model):
    """Decoder-only transformer: ``tokens [B, T] -> logits [B, T, vocab]``, causal, head tied to the token embedding."""

    def __init__(self, vocab: int, *, context: int, layers: int, width: int, heads: int, dropout: float,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        embed_init = keras.initializers.RandomNormal(stddev=width ** -0.5, seed=seed)  # flax's Embed default
        self.context = context
        self.token_embedding = keras.layers.Embedding(vocab, width, embeddings_initializer=embed_init)
        self.position_embedding = keras.layers.Embedding(context, width, embeddings_initializer=embed_init)
        self.dropout = keras.layers.Dropout(dropout, seed=seed)
        self.blocks = [Block(width, heads, dropout, seed=seed + 1 + i) for i in range(layers)]
        self.ln = keras.layers.LayerNormalization(epsilon=LN_EPSILON)

    def call(self, tokens, training=None):
        length = tokens.shape[-1]
        x = self.token_embedding(tokens) + self.position_embedding(ops.arange(length))
        x = self.dropout(x, training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return ops.matmul(self.ln(x), ops.transpose(self.token_embedding.embeddings))  # tied head


def build_model(workload: str, seed: int = 0) -> keras.Model:
    if workload == "mnist_cnn":
        return cnn(seed=seed)
    if workload == "transformer":
        model = CharTransformer(workloads.vocab_size(), seed=seed, **workloads.TRANSFORMER)
        model(np.zeros((1, workloads.TRANSFORMER["context"]), np.int32))  # builds the weights
        return model
    if workload == "mlp":
        return mlp()
    raise ValueError(f"unknown workload {workload!r}; choose from {workloads.WORKLOADS}.")


def build_optimizer(workload: str) -> keras.optimizers.Optimizer:
    """AdamW with linear warmup from 0 then cosine decay (as optax.warmup_cosine_decay_schedule), or Adam."""
    if workload == "mlp":
        return keras.optimizers.Adam(MLP_LEARNING_RATE, epsilon=EPSILON)
    o = OPTIM[workload]
    peak, warmup = o["learning_rate"], o["warmup_steps"]
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=workloads.TOTAL_STEPS - warmup, alpha=o["end_learning_rate"] / peak,
        warmup_target=peak, warmup_steps=warmup)
    return keras.optimizers.AdamW(schedule, weight_decay=o["weight_decay"], epsilon=EPSILON,
                                  global_clipnorm=o["clip_norm"])


def arrays(workload: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The workload's batches as ``x``, ``y`` arrays (in batch order) and the batch size."""
    batches = workloads.batches(workload)
    x_key, y_key = ("tokens", "targets") if workload == "transformer" else ("image", "label")
    x = np.concatenate([b[x_key] for b in batches])
    y = np.concatenate([b[y_key] for b in batches])
    return x, y, workloads.BATCH_SIZE[workload]


class PacerCallback(keras.callbacks.Callback):
    """Hands each finished execution to the pacer (see the module docstring for the hook chosen)."""

    def __init__(self, pacer: Pacer, pace_on: str = "batch_begin"):
        super().__init__()
        if pace_on not in ("batch_begin", "batch_end"):
            raise ValueError(f"pace_on={pace_on!r}: choose 'batch_begin' or 'batch_end'.")
        self.pacer = pacer
        self.pending = 0  # steps dispatched but not yet handed to the pacer (batch_begin mode)
        self.last_end = -1  # end step of the last execution in this epoch
        if pace_on == "batch_end":
            self.on_train_batch_end = self._batch_end  # an instance override: Keras dispatches it in this thread
        else:
            self.on_train_batch_begin = self._batch_begin

    def _sync(self) -> None:
        # Keras's attribute tracking turns ``_jax_state`` into a TrackedDict of TrackedLists, which
        # are no pytrees: ``jax.block_until_ready(model._jax_state)`` would return at once. Flatten by hand.
        state = getattr(self.model, "_jax_state", None) or {}
        arrays = [a for group in state.values() if group for a in group]
        if not arrays:  # no step dispatched since the state went back into the variables
            arrays = [v.value for v in self.model.variables]
        jax.block_until_ready(arrays)

    def on_epoch_begin(self, epoch, logs=None):
        self.last_end = -1

    def _batch_begin(self, batch, logs=None):
        if self.pending:
            self.pacer.step_done(self.pending, self._sync)
        # This execution runs steps [batch, batch + steps_per_execution) (fewer at an epoch's end).
        spe = self.model.steps_per_execution
        steps = self.params.get("steps")
        self.pending = min(spe, steps - batch) if steps else spe

    def _batch_end(self, batch, logs=None):
        n, self.last_end = batch - self.last_end, batch
        self.pacer.step_done(n, self._sync)


def run(workload: str, pacer: Pacer, steps_per_execution: int = 1, pace_on: str = "batch_begin") -> None:
    """Trains ``workload`` with ``model.fit`` forever; the pacer ends the process."""
    keras.utils.set_random_seed(0)
    model = build_model(workload)
    model.compile(optimizer=build_optimizer(workload),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  steps_per_execution=steps_per_execution)
    x, y, batch_size = arrays(workload)
    pacer.start()
    model.fit(x, y, batch_size=batch_size, epochs=10**9, shuffle=False, verbose=0,
              callbacks=[PacerCallback(pacer, pace_on)])


def _check_schedule() -> None:  # pragma: no cover - a manual check against the recipe's optax schedule
    import optax

    for workload, o in OPTIM.items():
        ref = optax.warmup_cosine_decay_schedule(0.0, o["learning_rate"], o["warmup_steps"], workloads.TOTAL_STEPS,
                                                 end_value=o["end_learning_rate"])
        ours = build_optimizer(workload)._learning_rate  # the schedule itself
        for step in (0, 1, o["warmup_steps"] // 2, o["warmup_steps"], 5000, 60_000, workloads.TOTAL_STEPS):
            a, b = float(ours(step)), float(ref(step))
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9), (workload, step, a, b)
