"""The JAX variants of the suite: the hand-written loops and the Trainer (see ``benchmarks/worker.py``).

``run_hand``: what an expert writes by hand: a pure function of the params pytree, the rest of
the model state and the optax state, one ``jax.jit`` with donation, fed the same host numpy
batches; with ``steps_per_execution=K`` a hand-written ``lax.scan`` over K stacked batches
(unrolled for the CNN, as the Trainer does on CPU, where a rolled loop is 10x slower), stacking
the K host batches of each chunk in the loop as any loop over a stream of batches must.

``run_trainer``: ``Trainer`` on the same batches (a list: one pass is an epoch), with no callbacks
or with the recipe's default callbacks minus evaluation and text sampling, which are work of
their own and not part of a training step (no peer does them either).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from benchmarks import workloads
from benchmarks.protocol import Pacer


def _flops(compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        return float(analysis["flops"])
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def run_hand(workload: str, pacer: Pacer, steps_per_execution: int = 1, over_leaves: bool = False) -> None:
    """The hand-written loop; ``over_leaves``: jitted over the flat leaves of (params, rest, optimizer
    state) instead of the ``nnx.State`` pytrees, whose flattening in Python every call an expert
    would notice in a profile of a tiny model (``hand_leaves``)."""
    model = workloads.jax_model(workload)
    tx, loss_fn = workloads.jax_optimizer(workload), workloads.jax_loss(workload)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    batches = workloads.batches(workload)

    def train_step(params, rest, opt_state, batch):
        model = nnx.merge(graphdef, params, rest)
        model.train()
        grad_fn = nnx.value_and_grad(lambda m: loss_fn(m, batch), argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
        (loss, metrics), grads = grad_fn(model)  # RNG counters advance in the model, as in any nnx code
        _, _, rest_new = nnx.split(model, nnx.Param, ...)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest_new, opt_state, {"loss": loss, **metrics}

    k = steps_per_execution
    unroll = True if workload == "mnist_cnn" and jax.default_backend() == "cpu" else 1

    def scanned(params, rest, opt_state, chunk):
        def body(carry, batch):
            *carry, metrics = train_step(*carry, batch)
            return tuple(carry), metrics

        (params, rest, opt_state), metrics = jax.lax.scan(body, (params, rest, opt_state), chunk, unroll=unroll)
        return params, rest, opt_state, metrics

    fn = train_step if k == 1 else scanned
    treedef = jax.tree.structure((params, rest, opt_state))
    if over_leaves:
        def flat(leaves, chunk):
            *carry, metrics = fn(*jax.tree.unflatten(treedef, leaves), chunk)
            return treedef.flatten_up_to(tuple(carry)), metrics

        step = jax.jit(flat, donate_argnums=0)
        args = (treedef.flatten_up_to((params, rest, opt_state)),)
    else:
        step = jax.jit(fn, donate_argnums=(0, 1, 2))
        args = (params, rest, opt_state)
    stacked = lambda i: jax.tree.map(lambda *xs: np.stack(xs), *batches[i:i + k])  # noqa: E731
    pacer.start()  # the compilation below counts, as the Trainer's does
    if k == 1:
        pacer.extra["flops_per_step"] = _flops(step.lower(*args, batches[0]).compile())

    def checksum():  # every variant runs the same steps on the same batches: compare XLA flags by it
        params = (jax.tree.unflatten(treedef, args[0]) if over_leaves else args)[0]
        leaves = jax.tree.leaves(jax.device_get(params))
        return {"param_abs_sum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))}

    pacer.final = checksum
    i = 0
    while True:  # the host batches of a chunk are stacked in the loop, as a stream of batches needs
        chunk = batches[i] if k == 1 else stacked(i)
        if over_leaves:
            leaves, metrics = step(*args, chunk)
            args = (leaves,)
        else:
            params, rest, opt_state, metrics = step(*args, chunk)
            args = (params, rest, opt_state)
        i = (i + k) % len(batches)
        pacer.step_done(k, sync=lambda: jax.block_until_ready(args))


def default_callbacks(workload: str, workdir: str) -> list:
    """The recipe's default callbacks for ``workload`` (without evaluation and text samples)."""
    from recipes.common import standard_callbacks

    if workload == "mnist_cnn":
        from recipes.mnist import MnistConfig, default_callbacks as mnist_defaults

        test = {k: v[:100] for k, v in workloads.batches(workload, 1)[0].items()}
        return mnist_defaults(MnistConfig(workdir=workdir), test)
    if workload == "transformer":
        from recipes.transformer import TransformerConfig
        from trainer import Checkpoint

        config = TransformerConfig(workdir=workdir)
        return [*standard_callbacks(workdir, log_every=config.log_every, progress=config.progress),
                Checkpoint(every_n_steps=config.eval_every, every_n_epochs=None, max_to_keep=2)]
    return standard_callbacks(workdir, log_every=50, progress=True)


def force_chunk_guard() -> None:
    """Every rolled fused chunk of this process checks its guard once a chunk (``trainer.jaxprs.use_chunk_guard``
    allows it on CPU only, up to ``CHUNK_GUARD_MAX_PARAMS``): to measure it on a GPU and on larger models."""
    from trainer import build

    build.use_chunk_guard = lambda unroll, num_params: not isinstance(unroll, bool) and unroll == 1


def force_guard_form(form: str) -> None:
    """Every train step this process builds guards each step in ``form`` (``make_train_step``'s
    ``guard_form``; the Trainer's is ``"cond"``): to compare the select with it on a GPU."""
    import functools

    from trainer import build

    build.make_train_step = functools.partial(build.make_train_step, guard_form=form)


def run_trainer(workload: str, pacer: Pacer, callbacks: str = "default", steps_per_execution: int = 1,
                prefetch: int | str = "auto", chunk_guard: bool = False, guard_form: str | None = None,
                unbounded: bool = False) -> None:
    from trainer import Callback, Checkpoint, Trainer

    if chunk_guard:
        force_chunk_guard()
    if guard_form:
        force_guard_form(guard_form)

    class Pace(Callback):
        def on_step_end(self, trainer, step, metrics):
            pacer.step_done(trainer.execution_steps, sync=lambda: jax.block_until_ready(trainer.state))

    workdir = workloads.scratch_dir(f"bench-{workload}-")
    chosen = default_callbacks(workload, workdir) if callbacks == "default" else []
    for callback in chosen:  # intervals in seconds count this variant's running time, not the others'
        if isinstance(callback, Checkpoint):
            callback.clock = pacer.running_clock
    trainer = Trainer(workloads.jax_model(workload), workloads.jax_optimizer(workload), max_epochs=10**9,
                      callbacks=[*chosen, Pace()], workdir=workdir if chosen else None,
                      steps_per_execution=steps_per_execution, prefetch=prefetch,  # the default loss, as the recipes
                      **({"dispatch_ahead": None} if unbounded else {}))
    batches = workloads.batches(workload)
    pacer.final = lambda: {"prefetch_in_use": trainer.prefetch_in_use, "compile_seconds_trainer": trainer.compile_seconds}
    pacer.start()
    trainer.fit(batches)
