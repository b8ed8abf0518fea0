"""Running metric sums kept inside the compiled step: ``clu.metrics`` accumulators, merged on device.

A step's metrics become ``Average`` (masked by the step's ``_valid``) or ``LastValue`` accumulators;
every reader (the epoch, each logger's window) holds its own, merged inside the train step and read
on the host only at its interval (``compute_sums``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from trainer.packing import groups, pack, specs_of, unpack

Metrics = dict[str, jax.Array]
Sums = dict[str, clu_metrics.Metric]


CONTROL_KEYS = ("_valid", "_weight")  # how a step's metrics count, never metrics themselves
PARTIAL_EPOCH = "partial_epoch"  # the history row of an epoch that fit left unfinished
EPOCH_SUMS = "epoch"  # the reader of the epoch's means (``Trainer.add_metric_sums``); loggers' windows are others


def to_sums(metrics: Metrics, reductions: Mapping[str, str]) -> Sums:
    """One step's metrics as clu metrics: ``Average`` (masked by ``_valid``, weighted by ``_weight``,
    the real rows of a padded batch, where the step gives it) or ``LastValue``."""
    valid = metrics.get("_valid", jnp.array(True))
    weight = metrics.get("_weight")
    out = {}
    for k, v in metrics.items():
        if k in CONTROL_KEYS:
            continue
        v = jnp.asarray(v, jnp.float32)
        if reductions.get(k, "last" if k.endswith("_total") else "mean") == "last":
            out[k] = clu_metrics.LastValue.from_model_output(v[None])
        elif weight is None:
            out[k] = clu_metrics.Average.from_model_output(v[None], mask=valid[None])
        else:
            count = jnp.where(valid, weight, 0).astype(jnp.int32)
            total = jnp.where(valid, v * count.astype(jnp.float32), 0.0)  # a skipped step's NaN times 0 is NaN
            out[k] = clu_metrics.Average(total=total, count=count)
    return out


def merge_sums(acc: Sums, new: Sums) -> Sums:
    return {k: acc[k].merge(new[k]) for k in new}


def merge_steps_packed(sums: Mapping[str, Sums], per_step: Sums) -> dict[str, Sums]:
    """Every accumulator of ``sums`` merged with the stacked steps of ``per_step``, one step after another.

    Bitwise what ``merge_sums`` step by step gives (each total and count is added to in step order;
    a ``LastValue`` ends as the last step's), but on the sums' scalars packed one array per dtype,
    as the carry packs them between calls (``trainer.packing``): XLA then merges them in a few
    fused passes instead of a small kernel for every metric and reader (on XLA:CPU each kernel costs
    launch time every call and ~1 MiB of memory while compiling).
    """
    leaves, treedef = jax.tree.flatten(sums)
    if not leaves:
        return dict(sums)
    steps = treedef.flatten_up_to({name: {k: per_step[k] for k in acc} for name, acc in sums.items()})
    is_last = jax.tree.leaves(jax.tree.map(lambda m: jax.tree.map(lambda _: isinstance(m, clu_metrics.LastValue), m),
                                           sums, is_leaf=lambda x: isinstance(x, clu_metrics.Metric)))
    specs = specs_of(leaves)
    packed = pack(specs, leaves)
    stacked = jax.vmap(lambda xs: pack(specs, xs))(steps)  # one [steps, scalars] array per dtype
    masks = [np.array([b for b, (_, d) in zip(is_last, specs) if d == dtype]) for dtype in groups(specs)]
    for i in range(stacked[0].shape[0]):
        packed = [jnp.where(m, s[i], a + s[i]) for a, s, m in zip(packed, stacked, masks)]
    return jax.tree.unflatten(treedef, unpack(specs, packed))


def empty_sums(metric_shapes: Mapping[str, Any], reductions: Mapping[str, str] | None = None) -> Sums:
    """Zeroed accumulators for metrics of the given names."""
    # Shapes traced, zeros made on the host: run eagerly, ``to_sums``'s ops compiled a program each
    # (~10 compilations, ~1 MiB of resident memory apiece on XLA:CPU).
    def traced():
        zeros = {k: jnp.zeros((), jnp.float32) for k in metric_shapes if k not in CONTROL_KEYS}
        return to_sums(dict(zeros, _valid=jnp.array(False)), reductions or {})

    shapes = jax.eval_shape(traced)
    return jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def restore_sums(template: Sums, saved: Mapping[str, Sequence[float]]) -> Sums:
    """Accumulators of ``template``'s kinds holding saved ``[total, count]`` pairs (others stay zero)."""
    out = dict(template)
    for k, (total, count) in saved.items():
        if k in out:
            out[k] = type(out[k])(total=jnp.asarray(total, jnp.float32), count=jnp.asarray(count, jnp.int32))
    return out


def compute_sums(sums: Sums) -> dict[str, float]:
    """Host floats from (host) accumulators; metrics with no valid step are left out."""
    return {k: float(m.total / m.count) for k, m in sums.items() if int(m.count) > 0}


def snapshot_means(snapshot: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The means of a ``sums_snapshot`` (``{metric: [total, count]}``); metrics with no valid step left out."""
    return {k: total / count for k, (total, count) in snapshot.items() if count > 0}


def restarted_sums(sums: Mapping[str, Any], metric_shapes: Mapping[str, Any], reductions: Mapping[str, str],
                   saved: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, Sums]:
    """Every reader's accumulators back to zero, those of ``saved`` readers holding their saved
    ``[total, count]`` pairs (an epoch resumed from a checkpoint)."""
    out = {name: empty_sums(metric_shapes, reductions) for name in sums}
    for name, pairs in saved.items():
        if pairs and name in out:
            out[name] = restore_sums(out[name], pairs)
    return out


def sums_snapshot(sums: Sums | None) -> dict[str, list[float]] | None:
    """Device accumulators as host ``{metric: [total, count]}`` (for checkpoints), or ``None``."""
    if sums is None:
        return None
    return {k: [float(m.total), int(m.count)] for k, m in jax.device_get(sums).items()}


def restart_trainer_sums(trainer: Any) -> None:
    """Every accumulator ``trainer`` registered back to zero, then the epoch's and the loggers' windows'
    from where a checkpoint left them (used up). Before the step is built (no metric shapes yet) the
    build does it."""
    if trainer._metric_shapes is not None:
        saved = {**(trainer.restored_window_sums or {}), EPOCH_SUMS: trainer.restored_epoch_sums or {}}
        trainer._sums = restarted_sums(trainer._sums, trainer._metric_shapes, trainer.metric_reductions, saved)
        trainer.restored_epoch_sums = trainer.restored_window_sums = None
