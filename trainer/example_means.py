"""Evaluation averages each example's metrics alone (exact on a padded last batch). A metric that is no mean
over examples (an F1, a loss divided by the batch's total weight) then reads otherwise than the whole-batch
value training logs, in silence: checked once per Trainer, on its first evaluated batch, for a loss of the
user's own (the library's are means over examples)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np

from trainer import losses
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


def evaluates_own_loss(trainer: "Trainer") -> bool:
    """Whether the default ``compute_metrics`` evaluates a loss of the user's own (a ``loss_fn`` or a
    ``compute_loss`` override), not one of ``trainer.losses``'s."""
    from trainer.trainer import Trainer

    if type(trainer).compute_metrics is not Trainer.compute_metrics:
        return False
    library = getattr(trainer.loss_fn or losses.default_loss, "weighs_by_mask", False)
    return not (library and type(trainer).compute_loss is Trainer.compute_loss)


def warn_if_not_example_means(trainer: "Trainer", batch: Any, sums: Any, prefix: str) -> None:
    """After the first batch of ``trainer``'s first evaluation (``sums`` holds that batch alone): warns of each
    metric whose mean over the examples differs from its value on the whole batch (one compile, once)."""
    if trainer._example_means_checked or not evaluates_own_loss(trainer):
        return
    trainer._example_means_checked = True
    loss, metrics = jax.jit(whole_batch_loss(trainer))(trainer.state, batch)
    whole = jax.device_get({"loss": loss, **metrics})
    means = compute_sums(jax.device_get(sums))
    differ = [f"{name!r} {means[name]:.4g} (the mean over its examples) against {float(value):.4g} (the batch's)"
              for name, value in whole.items() if name in means and np.ndim(value) == 0
              and not np.isclose(means[name], float(value), rtol=1e-3, atol=1e-6, equal_nan=True)]
    if differ:
        named = f" ({prefix!r})" if prefix else ""
        warn(f"the evaluation{named} computes each example's metrics alone and averages them, and on its first "
             f"batch {'; '.join(differ)}. Such a metric is no mean over examples (an F1, a loss divided by the "
             "batch's total weight): return per-example parts from a compute_metrics override (true and false "
             "positives, weighted losses and weights) and combine their means in finish_metrics (README: "
             "'A metric that is no mean over examples').", stacklevel=3)
