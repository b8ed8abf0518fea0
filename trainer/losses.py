"""Losses and metrics of the training guide, as small pure functions.

Per-example criteria (``cross_entropy``, ``cross_entropy_onehot``, ``mse``) return one value per
example so that evaluation can mask padded rows; ``supervised`` turns a criterion into the
``loss_fn(model, batch) -> (loss, metrics)`` that :class:`trainer.Trainer` takes.
``INPUT_KEYS`` and ``LABEL_KEYS`` are the dict keys ``batch_inputs`` and ``batch_labels`` look for, in order.

Example::

    from trainer import Trainer, losses
    loss_fn = losses.supervised(losses.mse, l2=1e-4)
    Trainer(model, optax.adam(1e-3), loss_fn=loss_fn, max_epochs=3)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

INPUT_KEYS = ("image", "inputs", "input", "x", "features", "tokens")
LABEL_KEYS = ("label", "labels", "y", "target", "targets")

Batch = Any  # a dict of arrays, a tuple/list (inputs, labels, ...), or one array of inputs


class LossFn(Protocol):
    """What ``Trainer(loss_fn=...)`` takes: ``(model, batch) -> loss`` or ``(loss, metrics)``.

    ``loss`` is a scalar averaged over the batch; ``metrics`` a dict of scalars (batch means).
    """

    def __call__(self, model: nnx.Module, batch: Batch) -> jax.Array | tuple[jax.Array, dict]: ...


class BatchKeyError(KeyError):
    """A batch lacks what the default loss reads (inputs, labels); the message names its keys."""


def _pick(batch: Mapping, keys: Sequence[str], what: str) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    raise BatchKeyError(
        f"the batch has no {what}: it has keys {sorted(batch)}, and the default loss looks for "
        f"one of {list(keys)}. Rename the key, or pass loss_fn=... that reads your batch."
    )


def batch_inputs(batch: Batch) -> Any:
    """The model inputs of a batch: ``batch[0]``, ``batch['image']`` (or another INPUT_KEYS), or the batch."""
    if isinstance(batch, Mapping):
        return _pick(batch, INPUT_KEYS, "inputs")
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def batch_labels(batch: Batch) -> Any:
    """The labels of a batch: ``batch[1]`` or ``batch['label']`` (or another LABEL_KEYS)."""
    if isinstance(batch, dict) or isinstance(batch, Mapping):  # dict first: the ABC check costs 10x
        return _pick(batch, LABEL_KEYS, "labels")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    listed = (" (for arrays x and labels y pass the tuple (x, y) or a dict {'x': x, 'label': y}: a list [x, y] is "
              "read as a list of batches)") if hasattr(batch, "shape") else ""
    raise BatchKeyError(
        f"the batch is a {type(batch).__name__} without labels{listed}; the default loss needs "
        "(inputs, labels) or a dict with a 'label' key. Pass loss_fn=... for unlabelled data."
    )


_AS_UNSIGNED = {np.dtype(f"i{n}"): np.dtype(f"u{n}") for n in (1, 2, 4, 8)}


def check_label_range(labels: Any, num_classes: int, where: str) -> None:
    """Refuses host integer labels outside ``[0, num_classes)`` (on the device they would be silently wrong).

    One pass per batch: read as unsigned, a negative label is larger than any class index, so the
    maximum alone decides (the exact range is computed only for the error message).
    """
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.size:
        unsigned = _AS_UNSIGNED.get(labels.dtype)
        if unsigned is not None:
            bad = np.maximum.reduce(labels.view(unsigned), axis=None) >= num_classes
        else:  # unsigned already, or signed in the other byte order
            bad = labels.max() >= num_classes or (labels.dtype.kind == "i" and labels.min() < 0)
        if bad:
            low, high = labels.min(), labels.max()
            raise ValueError(
                f"labels at {where} lie in [{low}, {high}] but the model gives {num_classes} classes, so "
                f"labels must be in [0, {num_classes}). Fix the labels or the model's output size."
            )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels, one value per example."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def cross_entropy_onehot(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy with one-hot (or soft) labels of the logits' shape, one value per example."""
    return optax.softmax_cross_entropy(logits, labels)


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error, averaged over all but the batch axis: one value per example.

    Targets of the predictions' shape, or of it without a trailing axis of 1 (``[batch]`` targets for
    ``[batch, 1]`` predictions); other shapes are refused (reshaping them would pair the wrong values).
    """
    if jnp.shape(targets) != predictions.shape:
        if _without_trailing_ones(jnp.shape(targets)) != _without_trailing_ones(predictions.shape):
            raise ValueError(f"mse got targets of shape {jnp.shape(targets)} for predictions of shape "
                             f"{predictions.shape}: they must match (a trailing axis of 1 aside). Reshape "
                             "the targets, or the model's output.")
        targets = jnp.reshape(targets, predictions.shape)
    err = jnp.square(predictions - targets)
    return err.reshape(err.shape[0], -1).mean(axis=1) if err.ndim > 1 else err


def _without_trailing_ones(shape: tuple) -> tuple:
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return tuple(shape)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """1.0 where ``argmax(logits)`` equals the label (integer, or one-hot of the logits' shape)."""
    if labels.ndim == logits.ndim:
        labels = jnp.argmax(labels, axis=-1)
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def l2_penalty(model: nnx.Module) -> jax.Array:
    """Half the sum of squares of every ``nnx.Param`` of the model (add ``l2 * l2_penalty``)."""
    params = nnx.state(model, nnx.Param)
    return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


def supervised(
    criterion: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    *,
    l2: float = 0.0,
    with_accuracy: bool | None = None,
) -> LossFn:
    """A ``loss_fn(model, batch) -> (loss, metrics)`` from a per-example criterion.

    Args:
      criterion: ``(predictions, labels) -> per-example loss``, e.g. ``cross_entropy``, ``mse``.
      l2: weight of ``l2_penalty`` added to the loss (0 adds nothing).
      with_accuracy: report ``accuracy``; ``None`` does so when labels are integers and the
        predictions have one more (class) axis of more than one class, or for ``cross_entropy_onehot``.

    Returns:
      A loss function; its metrics are ``accuracy`` (when reported) and ``l2`` (when ``l2 > 0``).
      A dict batch with a boolean ``"mask"`` averages over what it marks real: rows (``[batch]``,
      as ``Trainer(ragged_batches="pad")`` writes) or positions (``[batch, time]``, padded sequences;
      evaluation then weighs each example by its real positions, so ``eval/loss`` is per position too).
    """
    if l2 < 0:
        raise ValueError(f"l2={l2} is negative; use 0 for no penalty or a small positive weight.")

    def loss_fn(model: nnx.Module, batch: Batch):
        labels = batch_labels(batch)
        predictions = model(batch_inputs(batch))
        if not hasattr(predictions, "ndim"):  # optax's own error would be numpy's, from deep inside
            raise TypeError(f"the model returned a {type(predictions).__name__}, but this loss (losses.supervised, "
                            "the default) takes one array of predictions (logits). Pass loss_fn=... that picks them "
                            "out, e.g. lambda model, batch: losses.cross_entropy(model(batch['x'])['logits'], "
                            "batch['label']).mean().")
        mean = _masked_mean(batch.get("mask") if isinstance(batch, Mapping) else None)
        loss = mean(criterion(predictions, labels))
        metrics = {}
        wants = with_accuracy
        if wants is None:
            integer_labels = (jnp.issubdtype(labels.dtype, jnp.integer) and predictions.ndim == labels.ndim + 1
                              and predictions.shape[-1] > 1)  # a class axis (argmax of one value is always 0)
            wants = integer_labels or criterion is cross_entropy_onehot
        if wants:
            metrics["accuracy"] = mean(accuracy(predictions, labels))
        if l2 > 0:
            penalty = l2_penalty(model)
            metrics["l2"] = penalty
            loss = loss + l2 * penalty
        return loss, metrics

    loss_fn.integer_class_labels = criterion is cross_entropy  # the Trainer then checks each batch's labels
    loss_fn.weighs_by_mask = True  # evaluation counts each example by what its "mask" marks real
    return loss_fn


def _masked_mean(mask: jax.Array | None) -> Callable[[jax.Array], jax.Array]:
    """The mean of per-example values ``[batch, ...]`` over what ``mask`` marks real: rows (a ``[batch]``
    mask, ``Trainer(ragged_batches="pad")``'s) or positions (a ``[batch, time]`` mask of padded
    sequences), as ``jnp.mean`` over the real values alone."""
    if mask is None:
        return jnp.mean
    mask = jnp.asarray(mask)
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f"the batch's 'mask' is {mask.dtype}; a mask marks real rows or positions (bool, or 0/1 "
                         "integers). Per-example weights are no mask: pass loss_fn=... that weighs by them (and "
                         "compute_metrics, for evaluation), under a key other than 'mask'.")

    def mean(values: jax.Array) -> jax.Array:
        if values.ndim == 0:  # a criterion that averaged already
            return values
        if mask.shape != values.shape[:mask.ndim]:
            raise ValueError(
                f"the batch's 'mask' has shape {mask.shape}, but the loss gives values of shape {values.shape}: "
                "a mask marks the real examples ([batch]) or the real positions of each ([batch, time]), so "
                "its shape must begin the loss's. Reshape the mask, or pass loss_fn=... that reads it.")
        weights = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)), values.shape)
        weights = weights.astype(jnp.float32)
        return jnp.sum(jnp.where(weights > 0, values, 0.0) * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return mean


default_loss = supervised(cross_entropy)
default_loss.__doc__ = ("The Trainer's loss when none is given: ``supervised(cross_entropy)``, softmax "
                        "cross-entropy on integer labels, plus ``accuracy`` (one-hot labels: "
                        "``supervised(cross_entropy_onehot)``).")
"""The loss a Trainer uses without ``loss_fn``: cross-entropy on integer labels, plus accuracy."""
