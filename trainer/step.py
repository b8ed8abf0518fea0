"""Builds the compiled train / eval / predict functions: pure functions of the split state.

Each is one ``jax.jit`` of a pure function; the model is merged *inside* the trace (free at run
time) and differentiated with ``nnx.value_and_grad`` on ``nnx.Param`` so stateful layers such as
dropout advance their RNG counters legally. Metrics never leave the device here: they are added
up in ``clu.metrics`` objects (``Average``, ``LastValue``) inside the same compiled program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx

from trainer.carry import flat_jit, pack_state, unpack_state
from trainer import conv_grads, dense_grads, threefry
from trainer.feed import MASK_KEY
from trainer.optim import current_learning_rate, global_norm, update as optimizer_update
from trainer.packing import scan_packed
from trainer.state import TrainState
from trainer.state_changes import check_same_structure, without_sown
from trainer.sums import CONTROL_KEYS, Metrics, Sums, merge_steps_packed, to_sums
from trainer.sums import compute_sums, empty_sums, merge_sums, restore_sums  # noqa: F401  (their old home: still importable here)


class StepInfo(NamedTuple):
    """What an in-step probe sees: this step's gradients, updates, new params, new optimizer state, loss.

    On a step the non-finite guard skips, ``updates`` are zeros and ``params`` / ``opt_state`` the kept ones.
    """

    grads: Any
    updates: Any
    params: Any
    opt_state: Any
    loss: jax.Array


Probe = Callable[[StepInfo], Mapping[str, jax.Array]]
"""An in-step probe: ``StepInfo -> metrics``, traced into the train step (no extra dispatch)."""

# Non-finite guard kinds, recorded on the device when training halts.
BAD_LOSS, BAD_GRADS = 1, 2
GUARD_FORMS = ("cond", "select")  # how a guarded step skips its update (``make_train_step``'s ``guard_form``)


def split_loss_output(out: Any, where: str) -> tuple[jax.Array, Metrics]:
    """``loss``, ``(loss, metrics)`` or ``{"loss": loss, **metrics}`` (Lightning's habit) -> ``(loss,
    metrics)``, checking the loss is a scalar and each metric a named array."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        loss, metrics = out
    elif isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError(f"{where} returned a dict without a 'loss' key ({sorted(map(str, out))}); return the loss "
                            "alone, (loss, metrics), or a dict holding 'loss' and the metrics.")
        loss, metrics = out["loss"], {k: v for k, v in out.items() if k != "loss"}
    elif isinstance(out, (tuple, list)):
        kinds = ", ".join(type(x).__name__ for x in out)
        raise TypeError(f"{where} returned a {type(out).__name__} of ({kinds}); return the loss alone, or "
                        "(loss, metrics) with metrics a dict of name -> scalar.")
    else:
        loss, metrics = out, {}
    if jnp.ndim(loss) != 0:
        raise ValueError(
            f"{where} must return a scalar loss (or (loss, metrics_dict)); got an array of shape "
            f"{jnp.shape(loss)}. Average over the batch, e.g. jnp.mean(per_example_loss)."
        )
    if "loss" in metrics:
        raise ValueError(f"{where} returned a metric named 'loss'; that name is the loss itself.")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise TypeError(f"{where} returned a metric named {name!r}, a {type(name).__name__}; metric names are strings.")
        if value is None or isinstance(value, (Mapping, str)):
            raise TypeError(f"{where} returned metric {name!r} = {value!r:.60}; each metric is a number or an array.")
        if jnp.ndim(value) != 0:  # training averaged it into one number in silence, evaluation refused it
            raise ValueError(f"{where} returned metric {name!r} of shape {jnp.shape(value)}; each metric is a scalar "
                             "(a batch mean). Return a vector's parts under names of their own "
                             f"({name}/0, {name}/1, ...).")
    return loss, dict(metrics)


def init_guard() -> dict[str, jax.Array]:
    """Device state of the non-finite guard (see ``make_train_step``'s ``halt_after``).

    Built on the host and transferred: as ``jnp`` calls each would compile a program of its own.
    """
    return jax.device_put({"nonfinite_total": np.zeros((), np.int32), "consecutive": np.zeros((), np.int32),
                           "halted": np.zeros((), bool), "halt_step": np.full((), -1, np.int32),
                           "halt_kind": np.zeros((), np.int32), "halt_lr": np.full((), np.nan, np.float32)})


def _all_finite(tree: Any) -> jax.Array:
    """True when every value is finite: one sum of squares (a NaN or inf anywhere makes it non-finite).

    ``trainer.optim.global_norm``, the expression ``GradNormMonitor`` takes the root of, so with both
    XLA computes the sum once (common subexpressions are merged).
    """
    return jnp.isfinite(global_norm(tree, squared=True))


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


class TrainSteps(NamedTuple):
    """The train step in its three forms (jitting is lazy: nothing compiles until first called).

    ``pure(state, batch) -> (state, metrics)``: the step itself (for ``eval_shape``).
    ``single``: ``(state, sums, batch) -> (state, sums, metrics)``, also merging the step's metrics
    into every accumulator of ``sums``; jitted over flat leaves (``trainer.carry.flat_jit``: called
    with the tree definitions and leaves of ``state`` and ``sums``, which are donated).
    ``fused``: the same over batches stacked on a leading axis, in one ``lax.scan``; each metric
    comes back stacked, one value per step. With the chunk guard it also takes and returns the
    state packed (``keeps_start``: ``trainer.carry.Carry.run`` supplies it).
    """

    pure: Callable
    single: Callable
    fused: Callable


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any], Any],
    probes: Sequence[Probe] = (),
    halt_after: int | None = None,
    reductions: Mapping[str, str] | None = None,
    unroll: int | bool = 1,
    chunk_guard: bool = False,
    matmul_kernel_grads: bool = False,
    unrolled_threefry: bool = False,
    guard_form: str = "cond",
    weigh_by_mask: bool = False,
) -> TrainSteps:
    """The train step of ``loss_fn`` with ``tx``, as ``TrainSteps``.

    ``unroll``: ``lax.scan``'s unroll for the fused form (``True``: the whole chunk; XLA:CPU runs
    convolution gradients much slower inside a rolled loop).

    ``chunk_guard``: with a guard, a fused chunk first runs without the per-step conditional and
    is rerun guarded only when one of its steps was not finite (see ``trainer.jaxprs.use_chunk_guard``).

    ``matmul_kernel_grads``: the eligible ``nnx.Conv`` layers compute their kernel gradients as matrix
    products (``trainer.conv_grads``), dense layers on sequences as one 2-D product
    (``trainer.dense_grads``); faster on XLA:CPU, float rounding differs.

    ``unrolled_threefry``: the compiled forms hash their random draws with JAX's unrolled threefry
    (``trainer.threefry``); the same bits, faster on XLA:CPU for large draws.

    ``guard_form``: how a guarded step skips a non-finite update: ``"cond"`` (the Trainer's), a
    conditional around the update, which runs in place; ``"select"``, the update computed and the
    old values selected back: no conditional (XLA:GPU reads a conditional's predicate on the host),
    but XLA copies the parameters and optimizer state for it every step. The same steps, bit for
    bit on CPU.

    ``weigh_by_mask``: batches carry a boolean ``batch["mask"]`` of real rows (``ragged_batches="pad"``);
    each step's metrics count in the running means by its real rows, so a padded last batch counts
    as the examples it holds (the per-example mean), not as a whole batch.

    ``halt_after``: with a guard (``state.guard``), a step whose loss or gradients are not finite
    changes nothing (params, optimizer and model state keep their values) and is counted in
    ``nonfinite_total``; after ``halt_after`` such steps in a row the guard halts: every later step
    is a no-op too, and the halting step, its cause and learning rate are kept for the host to read.
    """
    if guard_form not in GUARD_FORMS:
        raise ValueError(f"guard_form={guard_form!r}: use one of {GUARD_FORMS}.")
    reductions = dict(reductions or {})

    def step(state: TrainState, batch: Any, per_step_guard: bool | str = True) -> tuple[TrainState, Metrics]:
        # per_step_guard: True, the guard in ``guard_form``; "cond", a conditional skips a non-finite
        # step's update; "select", the update is computed and the old values selected back (fewer
        # kernels, slower on CPU: a chunk's rare rerun; no host round trip on a GPU); False, no guard
        # (a fused chunk's first pass, which reports whether each step was finite).
        if per_step_guard is True:
            per_step_guard = guard_form
        model = state.merge(graphdef)
        model.train()
        if matmul_kernel_grads:  # on this trace's own copy of the model
            use_matmul_kernel_grads(model)

        def objective(model):
            return split_loss_output(loss_fn(model, batch), "the loss function")

        grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
        (loss, metrics), grads = grad_fn(model)
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        model_state = without_sown(state.model_state, model_state)
        check_same_structure(state.model_state, model_state)
        guarded = halt_after is not None and state.guard is not None

        def apply(params, opt_state):
            updates, opt_state = optimizer_update(tx, grads, opt_state, params, loss)
            return optax.apply_updates(params, updates), opt_state, updates, _lr(opt_state)

        if guarded:
            loss_ok, grads_ok = jnp.isfinite(loss), _all_finite(grads)
        if not guarded or not per_step_guard:  # without the guard, or a fused chunk's first pass
            params, opt_state, updates, _ = apply(params, state.opt_state)
        else:
            ok = loss_ok & grads_ok & ~state.guard["halted"]

            def keep(params, opt_state):  # the learning rate this step would have used, for the report
                _, would_be = optimizer_update(tx, grads, opt_state, params, loss)  # XLA keeps only what _lr reads of it
                return params, opt_state, jax.tree.map(jnp.zeros_like, params), _lr(would_be)

            if per_step_guard == "select":
                new_params, new_opt_state, new_updates, lr = apply(params, state.opt_state)
                params, opt_state = _select(ok, new_params, params), _select(ok, new_opt_state, state.opt_state)
                updates = _select(ok, new_updates, jax.tree.map(jnp.zeros_like, new_updates))
            else:
                # A conditional, not a select of new and old: the update then runs in place on the
                # donated buffers (a select made XLA copy params and optimizer state every step).
                params, opt_state, updates, lr = jax.lax.cond(ok, apply, keep, params, state.opt_state)
            model_state = _select(ok, model_state, state.model_state)
        metrics = {"loss": loss, **metrics}
        if weigh_by_mask:
            metrics["_weight"] = jnp.sum(batch[MASK_KEY].astype(jnp.int32))
        info = StepInfo(grads, updates, params, opt_state, loss)
        for probe in probes:
            metrics.update(probe(info))
        new = state.replace(params=params, model_state=model_state, opt_state=opt_state, step=state.step + 1)
        if not guarded:
            return new, metrics
        if not per_step_guard:  # its state is kept only when every step of the chunk was finite:
            # then the guard's run of bad steps ends at 0, all else in the guard stays as it was
            guard = dict(state.guard, consecutive=jnp.zeros_like(state.guard["consecutive"]))
            # a float (1 or 0), so that it leaves the loop in the same row as the float metrics
            return new.replace(guard=guard), dict(metrics, _ok=(loss_ok & grads_ok).astype(jnp.float32))
        return _guarded(state.guard, new, metrics, loss_ok, grads_ok, lr)

    def _lr(opt_state: Any) -> jax.Array:
        lr = current_learning_rate(opt_state)
        return jnp.full((), jnp.nan, jnp.float32) if lr is None else jnp.asarray(lr, jnp.float32)

    def _guarded(guard: dict, new: TrainState, metrics: Metrics, loss_ok: jax.Array, grads_ok: jax.Array,
                 lr: jax.Array):
        bad = ~(loss_ok & grads_ok) & ~guard["halted"]
        ok = ~bad & ~guard["halted"]
        consecutive = jnp.where(bad, guard["consecutive"] + 1, jnp.where(guard["halted"], guard["consecutive"], 0))
        halt_now = bad & (consecutive >= halt_after)
        guard = {
            "nonfinite_total": guard["nonfinite_total"] + bad.astype(jnp.int32),
            "consecutive": consecutive,
            "halted": guard["halted"] | halt_now,
            "halt_step": jnp.where(halt_now, new.step, guard["halt_step"]),
            "halt_kind": jnp.where(halt_now, jnp.where(loss_ok, 0, BAD_LOSS) + jnp.where(grads_ok, 0, BAD_GRADS),
                                   guard["halt_kind"]),
            "halt_lr": jnp.where(halt_now, lr, guard["halt_lr"]),
        }
        # a halted guard's steps (the halting one too) change nothing: the step count stays the updates applied
        state = new.replace(guard=guard, step=jnp.where(guard["halted"], new.step - 1, new.step))
        metrics = dict(metrics, nonfinite_total=guard["nonfinite_total"], _valid=ok)
        return state, metrics

    def accumulating_step(state, sums, batch):
        state, metrics = step(state, batch)
        one_step = jax.tree.map(lambda x: x[None], to_sums(metrics, reductions))
        sums = merge_steps_packed(sums, one_step)  # as a chunk merges: two fused adds, not one per metric and reader
        for key in CONTROL_KEYS:
            metrics.pop(key, None)
        return state, sums, metrics

    def fused_steps(layout, arrays, packed, sums, batches, *start):
        # The state comes and goes as the carry holds it between calls, its scalars packed
        # (``trainer.packing.scan_packed``): unpacked, each would be a buffer of the loop, sliced out
        # before it and concatenated back after it, a small kernel each.
        # ``start`` (with the chunk guard): the state this chunk starts from, packed by dtype.
        guard = layout.join(arrays, packed).guard  # traced slices of the packed scalars (unused ones are dropped)
        if start and guard is not None:
            carry, metrics = _chunk_guarded_scan(layout, (arrays, packed), guard, batches, start[0])
            start = (pack_state(*carry),)
        else:
            carry, metrics = scan_packed(step, layout, (arrays, packed), batches, unroll=unroll)
        # The running sums are merged after the loop, step by step in order: bitwise what K single
        # steps add up, but one fused pass instead of a dozen tiny ops in every iteration (on
        # XLA:CPU those cost the tiny MLP 10-20% of its step).
        per_step = jax.vmap(lambda m: to_sums(m, reductions))(metrics)
        sums = merge_steps_packed(sums, per_step)
        for key in CONTROL_KEYS:
            metrics.pop(key, None)
        return (carry, sums, metrics, *start)

    def _chunk_guarded_scan(layout, carry, guard, batches, start):
        # The chunk runs unguarded first, in place on the donated state, noting whether each step's
        # loss and gradients were finite; only when one was not (or the guard had halted) is it rerun
        # with the guard in every step, from ``start``: the same state, packed by the previous chunk
        # (``trainer.carry``). When every step is finite both passes give the same state, bitwise
        # (tested). Rerun from the donated state itself, XLA copied each of its buffers in before the
        # loop and back out of a conditional after it: ~50 small kernels, 20% of the tiny MLP's chunk.
        fast, fast_metrics = scan_packed(lambda s, b: step(s, b, per_step_guard=False), layout, carry, batches,
                                         unroll=unroll)
        oks = fast_metrics.pop("_ok") > 0
        fast_metrics = dict(fast_metrics, nonfinite_total=jnp.broadcast_to(guard["nonfinite_total"], oks.shape),
                            _valid=jnp.ones_like(oks))

        def rerun(loop):  # rare (0 or 1 trips): its steps select rather than branch, for a smaller program
            _, again, trip = loop  # trip (0) shifts the slices of ``start``, which XLA would otherwise hoist
            begin = unpack_state(*carry, start, shift=trip)
            new, metrics = scan_packed(functools.partial(step, per_step_guard="select"), layout, begin, batches,
                                       unroll=unroll)
            return (tuple(new), metrics), jnp.zeros_like(again), trip + 1

        again = ~(jnp.all(oks) & ~guard["halted"])
        (carry, metrics), _, _ = jax.lax.while_loop(lambda loop: loop[1], rerun,
                                                    ((tuple(fast), fast_metrics), again, jnp.int32(0)))
        return carry, metrics

    single = flat_jit(accumulating_step)
    fused = flat_jit(fused_steps, packed_state=True, keeps_start=chunk_guard and halt_after is not None)
    if unrolled_threefry:
        single, fused = threefry.unrolled_calls(single), threefry.unrolled_calls(fused)
    return TrainSteps(step, single, fused)


def use_matmul_kernel_grads(model: nnx.Module) -> None:
    """Points the eligible layers of ``model`` at the CPU tuning's kernel-gradient products.

    ``nnx.Conv`` at ``trainer.conv_grads.conv_general_dilated``, ``nnx.Linear`` / ``nnx.LinearGeneral``
    at ``trainer.dense_grads.dot_general``. Meant for the copy of the model merged inside the train
    step's trace, never the user's own.
    """
    for module in conv_grads.eligible_convs(model):
        module.conv_general_dilated = conv_grads.conv_general_dilated
    for module in dense_grads.eligible_denses(model):
        module.dot_general = dense_grads.dot_general


WEIGHT_KEY = "_weight"  # per_example_metrics' weight of each example, when its loss averages over a batch's "mask"


def per_example_metrics(loss_fn: Callable[[nnx.Module, Any], Any],
                        weigh_by_mask: bool = False) -> Callable[[nnx.Module, Any], Metrics]:
    """Evaluates a batch-mean ``loss_fn`` on each example alone (``vmap``), so padding can be masked.

    For any loss that is a mean over the batch this gives exact per-example values of the loss
    and of every metric it returns. ``weigh_by_mask``: the loss averages over what a batch's own
    ``"mask"`` marks (``losses.supervised``: real rows, or real positions of padded sequences), so each
    example counts by what its mask marks, and the evaluation's means are the loss's over the whole data.
    """

    def metrics_fn(model: nnx.Module, batch: Any) -> Metrics:
        graphdef, state = nnx.split(model)  # each example's own copy: what the model changes when called (an
        # RNG stream it forks, nnx.RNN; a sow; a transform inside it) stays inside the vmap's trace

        def one(example):
            single = jax.tree.map(lambda a: a[None], example)
            loss, metrics = split_loss_output(loss_fn(nnx.merge(graphdef, state, copy=True), single), "the loss function (called by compute_metrics "
                                              "on each example alone, as a batch of 1)")
            if weigh_by_mask and isinstance(example, Mapping) and MASK_KEY in example:
                metrics = {**metrics, WEIGHT_KEY: jnp.sum(jnp.asarray(example[MASK_KEY]).astype(jnp.int32))}
            return {"loss": loss, **metrics}

        return jax.vmap(one)(batch)

    return metrics_fn


def make_eval_step(graphdef: nnx.GraphDef, metrics_fn: Callable[[nnx.Module, Any], Metrics]) -> tuple[Callable, Callable]:
    """Returns ``(batch_sums, eval_step)``.

    ``batch_sums(state, batch, mask) -> sums`` is the pure masked ``Average`` of one batch's metrics
    (for ``eval_shape``); ``eval_step(state, sums, batch, mask) -> sums`` merges it into running
    sums, jitted with ``sums`` donated. ``metrics_fn`` returns per-example arrays of shape
    ``[batch]`` (masked exactly) or scalars (taken as the batch mean, weighted by the real examples).
    """

    def batch_sums(state: TrainState, batch: Any, mask: jax.Array) -> Sums:
        model = state.merge(graphdef)
        model.eval()
        metrics = dict(metrics_fn(model, batch))
        weights = mask.astype(jnp.int32) * metrics.pop(WEIGHT_KEY, 1)  # 1 a real row, 0 padding (or its positions)
        out = {}
        for k, v in metrics.items():
            v = jnp.asarray(v, jnp.float32)
            if v.ndim == 0:
                real = jnp.sum(weights)
                out[k] = clu_metrics.Average(total=v * real, count=real)
            elif v.shape == mask.shape:
                total = jnp.sum(jnp.where(weights > 0, v * weights.astype(jnp.float32), 0.0))
                out[k] = clu_metrics.Average(total=total, count=jnp.sum(weights))
            else:
                raise ValueError(
                    f"metric {k!r} has shape {v.shape}; compute_metrics must return a scalar or one "
                    f"value per example (shape {mask.shape}). The default compute_metrics calls the loss "
                    "function on each example alone, so its metrics must be scalars (batch means)."
                )
        return out

    def eval_step(state: TrainState, sums: Sums, batch: Any, mask: jax.Array) -> Sums:
        return merge_sums(sums, batch_sums(state, batch, mask))

    return batch_sums, jax.jit(eval_step, donate_argnums=(1,))


def make_predict_step(graphdef: nnx.GraphDef, predict_fn: Callable[[nnx.Module, Any], Any]) -> Callable:
    """``predict_step(state, batch) -> outputs``, jitted; the model runs in eval mode."""

    def predict_step(state: TrainState, batch: Any) -> Any:
        model = state.merge(graphdef)
        model.eval()
        return predict_fn(model, batch)

    return jax.jit(predict_step)
