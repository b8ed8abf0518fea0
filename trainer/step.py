"""Builds the compiled train / eval / predict functions: pure functions of the split state.

Each is one ``jax.jit`` of a pure function; the model is merged *inside* the trace (free at run
time) and differentiated with ``nnx.value_and_grad`` on ``nnx.Param`` so stateful layers such as
dropout advance their RNG counters legally. Metrics never leave the device here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from trainer.state import TrainState

Metrics = dict[str, jax.Array]
Probe = Callable[[Any, Any, Any], Mapping[str, jax.Array]]
"""An in-step probe: ``(grads, updates, new_params) -> metrics`` traced into the train step."""

COUNT = "count"  # key of the number of steps (train) or examples (eval) in an accumulator


def split_loss_output(out: Any, where: str) -> tuple[jax.Array, Metrics]:
    """``loss`` or ``(loss, metrics)`` -> ``(loss, metrics)``, checking the loss is a scalar."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        loss, metrics = out
    else:
        loss, metrics = out, {}
    if jnp.ndim(loss) != 0:
        raise ValueError(
            f"{where} must return a scalar loss (or (loss, metrics_dict)); got an array of shape "
            f"{jnp.shape(loss)}. Average over the batch, e.g. jnp.mean(per_example_loss)."
        )
    if "loss" in metrics:
        raise ValueError(f"{where} returned a metric named 'loss'; that name is the loss itself.")
    return loss, dict(metrics)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any], Any],
    probes: Sequence[Probe] = (),
) -> tuple[Callable, Callable]:
    """Returns ``(step, accumulating_step)``.

    ``step(state, batch) -> (state, metrics)`` is the uncompiled pure step (for ``eval_shape``);
    ``accumulating_step(state, sums, batch) -> (state, sums, metrics)`` is jitted with the state
    and ``sums`` donated: it also adds the step's metrics to every accumulator in ``sums`` (a dict
    of name -> running sums), so windowed means cost no extra dispatch.
    """

    def step(state: TrainState, batch: Any) -> tuple[TrainState, Metrics]:
        model = state.merge(graphdef)
        model.train()

        def objective(model):
            return split_loss_output(loss_fn(model, batch), "the loss function")

        grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, **metrics}
        for probe in probes:
            metrics.update(probe(grads, updates, params))
        new_state = state.replace(params=params, model_state=model_state, opt_state=opt_state,
                                  step=state.step + 1)
        return new_state, metrics

    def accumulating_step(state, sums, batch):
        state, metrics = step(state, batch)
        sums = {name: accumulate(acc, metrics) for name, acc in sums.items()}
        return state, sums, metrics

    return step, jax.jit(accumulating_step, donate_argnums=(0, 1))


def accumulate(acc: Metrics, metrics: Metrics) -> Metrics:
    """Adds one step's metrics (and 1 to the count) to a running sum."""
    out = {k: acc[k] + metrics[k].astype(acc[k].dtype) for k in metrics}
    out[COUNT] = acc[COUNT] + 1
    return out


def empty_sums(metric_shapes: Mapping[str, Any]) -> Metrics:
    """Zero running sums (float32, plus an int32 count) for metrics of the given shapes."""
    sums = {k: jnp.zeros(v.shape, jnp.float32) for k, v in metric_shapes.items()}
    sums[COUNT] = jnp.zeros((), jnp.int32)
    return sums


def per_example_metrics(loss_fn: Callable[[nnx.Module, Any], Any]) -> Callable[[nnx.Module, Any], Metrics]:
    """Evaluates a batch-mean ``loss_fn`` on each example alone (``vmap``), so padding can be masked.

    For any loss that is a mean over the batch this gives exact per-example values of the loss
    and of every metric it returns.
    """

    def metrics_fn(model: nnx.Module, batch: Any) -> Metrics:
        def one(example):
            single = jax.tree.map(lambda a: a[None], example)
            loss, metrics = split_loss_output(loss_fn(model, single), "the loss function")
            return {"loss": loss, **metrics}

        return jax.vmap(one)(batch)

    return metrics_fn


def make_eval_step(graphdef: nnx.GraphDef, metrics_fn: Callable[[nnx.Module, Any], Metrics]) -> tuple[Callable, Callable]:
    """Returns ``(batch_sums, eval_step)``.

    ``batch_sums(state, batch, mask) -> sums`` is the pure masked sum of one batch's metrics (for
    ``eval_shape``); ``eval_step(state, sums, batch, mask) -> sums`` adds it to running sums,
    jitted with ``sums`` donated. ``metrics_fn`` returns per-example arrays of shape ``[batch]``
    (masked exactly) or scalars (taken as the batch mean, weighted by the real examples).
    """

    def batch_sums(state: TrainState, batch: Any, mask: jax.Array) -> Metrics:
        model = state.merge(graphdef)
        model.eval()
        metrics = metrics_fn(model, batch)
        weight = mask.astype(jnp.float32)
        real = jnp.sum(weight)
        out = {}
        for k, v in metrics.items():
            v = jnp.asarray(v, jnp.float32)
            if v.ndim == 0:
                out[k] = v * real
            elif v.shape == mask.shape:
                out[k] = jnp.sum(v * weight)
            else:
                raise ValueError(
                    f"metric {k!r} has shape {v.shape}; compute_metrics must return a scalar or one "
                    f"value per example (shape {mask.shape})."
                )
        out[COUNT] = real
        return out

    def eval_step(state: TrainState, sums: Metrics, batch: Any, mask: jax.Array) -> Metrics:
        out = batch_sums(state, batch, mask)
        return {k: sums[k] + out[k] for k in out}

    return batch_sums, jax.jit(eval_step, donate_argnums=(1,))


def make_predict_step(graphdef: nnx.GraphDef, predict_fn: Callable[[nnx.Module, Any], Any]) -> Callable:
    """``predict_step(state, batch) -> outputs``, jitted; the model runs in eval mode."""

    def predict_step(state: TrainState, batch: Any) -> Any:
        model = state.merge(graphdef)
        model.eval()
        return predict_fn(model, batch)

    return jax.jit(predict_step)
