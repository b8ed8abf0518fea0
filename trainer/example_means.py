"""Evaluation averages each example's metrics alone (exact on a padded last batch). A metric that is no mean
over examples (an F1, a loss divided by the batch's total weight) then reads otherwise than the whole-batch
value training logs, in silence: checked once per Trainer, on its first evaluated batch, for a loss of the
user's own (the library's are means over examples)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer import losses
from trainer.state import reseed_streams
from trainer.step import split_loss_output
from trainer.sums import compute_sums
from trainer.user_warnings import warn

if TYPE_CHECKING:
    from trainer.trainer import Trainer


def whole_batch_loss(trainer: "Trainer") -> Callable[[Any, Any], tuple[Any, dict]]:
    """``(state, batch) -> (loss, metrics)``: the loss on a whole batch in eval mode, as training calls it."""
    def whole(state: Any, batch: Any) -> tuple[Any, dict]:
        model = state.merge(trainer.graphdef)
        model.eval()
        return split_loss_output(trainer.compute_loss(model, batch), "the loss function")

    return whole


def library_loss(trainer: "Trainer") -> bool:
    """Whether ``trainer`` trains with one of ``trainer.losses``'s losses, as it stands (no ``compute_loss``
    override): means over examples that weigh by a batch's mask."""
    from trainer.trainer import Trainer

    return type(trainer).compute_loss is Trainer.compute_loss and bool(
        getattr(trainer.loss_fn or losses.default_loss, "weighs_by_mask", False))


def evaluates_own_loss(trainer: "Trainer") -> bool:
    """Whether the default ``compute_metrics`` evaluates a loss of the user's own (a ``loss_fn`` or a
    ``compute_loss`` override), not one of ``trainer.losses``'s."""
    from trainer.trainer import Trainer

    return type(trainer).compute_metrics is Trainer.compute_metrics and not library_loss(trainer)


def warn_if_not_example_means(trainer: "Trainer", batch: Any, sums: Any, prefix: str) -> None:
    """After the first batch of ``trainer``'s first evaluation (``sums`` holds that batch alone): warns of each
    metric whose mean over the examples differs from its value on the whole batch (one compile, once).

    The whole batch is also run with the model's RNG streams reseeded: a metric that then changes (a loss
    that samples, a VAE's, in eval mode too) differs by chance, not by its form, and is left out. A metric's
    tolerance is 0.1%, or 10 of its dtype's steps (bfloat16's rounding)."""
    if trainer._example_means_checked or not evaluates_own_loss(trainer):
        return
    trainer._example_means_checked = True
    whole = whole_batch_loss(trainer)

    def twice(state: Any, batch: Any) -> tuple[dict, dict]:
        loss, metrics = whole(state, batch)
        model = state.merge(trainer.graphdef)
        reseed_streams(model, seed=1)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        loss_again, metrics_again = whole(state.replace(params=params, model_state=rest), batch)
        return {"loss": loss, **metrics}, {"loss": loss_again, **metrics_again}

    values, again = jax.device_get(jax.jit(twice)(trainer.state, batch))
    means = compute_sums(jax.device_get(sums))
    differ = [f"{name!r} {means[name]:.4g} (the mean over its examples) against {float(value):.4g} (the batch's)"
              for name, value in values.items() if name in means and np.ndim(value) == 0
              and _close(value, again[name]) and not _close(value, means[name])]
    if differ:
        named = f" ({prefix!r})" if prefix else ""
        warn(f"the evaluation{named} computes each example's metrics alone and averages them, and on its first "
             f"batch {'; '.join(differ)}. Such a metric is no mean over examples (an F1, a loss divided by the "
             "batch's total weight): return per-example parts from a compute_metrics override (true and false "
             "positives, weighted losses and weights) and combine their means in finish_metrics (README: "
             "'A metric that is no mean over examples').", stacklevel=3)


def _close(value: Any, other: Any) -> bool:
    dtype = np.asarray(value).dtype
    steps = 10 * float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0
    return bool(np.isclose(float(other), float(value), rtol=max(1e-3, steps), atol=1e-6, equal_nan=True))
