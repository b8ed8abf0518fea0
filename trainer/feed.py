"""From an epoch's host batches to *executions*: what one call of the compiled step consumes.

With ``steps_per_execution=K`` the trainer runs ``K`` batches stacked on a new leading axis in one
compiled ``lax.scan``. Chunks are aligned to the global step: a chunk starts only at a step that is
a multiple of ``K`` and only when ``K`` batches of the same shapes follow (in the epoch and before
``max_steps``); other batches run as single steps. So every step that is a multiple of ``K`` ends an execution,
and any callback interval that is a multiple of ``K`` still lands exactly on a hook.

This runs on the host, ahead of the device (in the prefetch thread when there is one): it skips
the batches the trainer must never train on, checks labels while they are still numpy, drops or
pads a ragged batch, and stacks chunks.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterator

import jax
import numpy as np

from trainer.data import batch_shapes, batch_size_of, describe_shapes, host_batch, pad_batch
from trainer.user_warnings import warn

RAGGED = ("drop", "pad")
MASK_KEY = "mask"


@dataclasses.dataclass
class Execution:
    """``steps`` batches for one dispatch: one batch, or ``steps`` stacked (leading axis) when ``stacked``."""

    batch: Any
    steps: int
    stacked: bool
    positions: list[int]  # epoch position of each batch trained on
    end_position: int  # epoch position after the last batch consumed (skipped ones included)
    sizes: list[int]  # real examples in each batch
    shape_change: str | None = None  # set when its shapes differ from the first batch's: what changed


@dataclasses.dataclass
class FeedPlan:
    """What the host side needs to cut an epoch into executions."""

    epoch: int
    position: int  # first epoch position the iterator yields
    step: int  # optimizer steps done before the first execution
    steps_per_execution: int = 1
    max_steps: int | None = None
    skip: frozenset = frozenset()  # (epoch, position) never to train on
    ragged: str = "drop"
    full_size: int | None = None  # the batch size every execution is compiled for
    full_size_is_hint: bool = False  # nothing compiled yet: full_size is a checkpoint's, a larger first batch wins
    check: Callable[[Any, str], None] | None = None  # host check of a batch (labels), may raise
    shapes: "CompiledShapes" = dataclasses.field(default_factory=lambda: CompiledShapes())  # kept across epochs
    batch_statistics: bool = False  # the model keeps batch statistics (BatchNorm): padding rows count in them


def stack(batches: list[Any]) -> Any:
    """Batches stacked on a new leading axis (numpy on the host; jax arrays stay on their device)."""
    def one(*leaves):
        if all(type(x) is np.ndarray for x in leaves):
            return np.asarray(leaves)  # np.stack's checks cost twice the copy for small batches
        if all(isinstance(x, np.ndarray) for x in leaves):  # memmaps and other subclasses
            return np.stack(leaves)
        import jax.numpy as jnp

        return jnp.stack(leaves)

    return jax.tree.map(one, *batches)


def with_mask(batch: Any, mask: np.ndarray) -> Any:
    """``batch`` (a dict) with ``batch["mask"]``: which rows are real examples."""
    if not isinstance(batch, dict):
        raise TypeError(f"ragged_batches='pad' needs dict batches (to add a {MASK_KEY!r} key); got "
                        f"{type(batch).__name__}. Use ragged_batches='drop' or dict batches.")
    if MASK_KEY in batch:
        raise ValueError(f"the batch already has a {MASK_KEY!r} key, which ragged_batches='pad' writes; rename it.")
    return {**batch, MASK_KEY: mask}


@dataclasses.dataclass
class CompiledShapes:
    """The shapes (``batch_shapes``) of the first batch, which the step was compiled for, and the
    others met since: each of those compiles the step again, so each is warned about once."""

    first: tuple | None = None
    first_described: str | None = None
    others: dict = dataclasses.field(default_factory=dict)  # other shapes -> their description
    split_chunk: bool = False  # a chunk was cut short by a batch of other shapes (said once)
    warned_padding: bool = False  # a padded batch met batch statistics (said once)

    def change(self, batch: Any, where: str) -> tuple[tuple, str | None]:
        """``batch``'s shapes, and ``None`` when they are the first batch's, else what changed."""
        shapes = batch_shapes(batch)
        if self.first is None:
            self.first, self.first_described = shapes, describe_shapes(batch)
        if shapes == self.first:
            return shapes, None
        described = self.others.get(shapes)
        if described is None:  # described once per set of shapes: bucketed data meets each again and again
            described = self.others[shapes] = describe_shapes(batch)
            warn(f"{where} has shapes {described}, unlike the first batch's {self.first_described} "
                 "(only the batch size of an epoch's last batch may differ): the step compiles again "
                 "for them. Give every batch the same shapes (pad variable-length inputs to one "
                 "length) to compile once.", stacklevel=3)
        return shapes, (f"{where} has shapes {described}, unlike the first batch's {self.first_described}")


def _peek_last(batches: Iterator[Any]) -> tuple[Iterator[Any], bool]:
    """``batches`` unchanged, and whether it is exhausted (the batch just taken was the last)."""
    try:
        following = next(batches)
    except StopIteration:
        return batches, True
    return itertools.chain([following], batches), False


def executions(batches: Iterator[Any], plan: FeedPlan) -> Iterator[Execution]:
    """Cuts ``batches`` (the epoch from ``plan.position``) into executions, see the module docstring."""
    k, step, position = plan.steps_per_execution, plan.step, plan.position
    pending: list[tuple[int, Any, int, str | None]] = []  # (position, batch, real size, shape change)
    pending_shapes = None
    warned = False

    def single(item) -> Execution:
        pos, batch, size, change = item
        return Execution(batch, 1, False, [pos], pos + 1, [size], change)

    while plan.max_steps is None or step + len(pending) < plan.max_steps:
        try:
            batch = host_batch(next(batches))
        except StopIteration:
            break
        pos, position = position, position + 1
        if (plan.epoch, pos) in plan.skip:
            continue  # a batch that produced non-finite values: consumed, never trained on
        size = batch_size_of(batch)
        if not size:
            continue  # an empty batch (a slice past the data's end) holds nothing to train on
        if plan.full_size_is_hint and plan.full_size is not None and size < plan.full_size:
            batches, last = _peek_last(batches)  # a resume's first batch: the epoch's smaller last one, or
            if not last:  # batches smaller than the checkpointed run's: they set the size now
                plan.full_size = None
        if plan.full_size is None or (plan.full_size_is_hint and size > plan.full_size):
            plan.full_size = size  # the size the step is compiled for (a resume restores the run's)
        plan.full_size_is_hint = False
        full = plan.full_size
        if size > full:
            raise ValueError(f"batch {pos} of epoch {plan.epoch} has {size} examples, more than the first "
                             f"batch ({full}); only the last batch of an epoch may differ (be smaller).")
        where = f"step {step + len(pending) + 1} (epoch {plan.epoch}, batch {pos})"
        if plan.check is not None:
            plan.check(batch, where)
        shapes, change = plan.shapes.change(batch, where)
        if plan.ragged == "pad":
            if size < full and plan.batch_statistics and not plan.shapes.warned_padding:
                plan.shapes.warned_padding = True
                warn(f"{where} is padded from {size} to {full} rows (ragged_batches='pad'), and the model keeps "
                     "batch statistics (BatchNorm): the padding rows count in them in training (the mask reaches "
                     "the loss, not the layers). Use ragged_batches='drop' for such a model, or batches that "
                     "divide the data.", stacklevel=2)
            padded, mask = pad_batch(batch, full)
            batch = with_mask(padded, mask)
        elif size < full:
            if not warned:
                warn(f"dropped a batch of {size} rows, fewer than the first batch's {full} (usually an epoch's "
                     "last): a second shape would compile the step again. Trainer(ragged_batches='pad') "
                     "trains on it padded and masked instead.", stacklevel=2)
                warned = True
            continue
        if pending and shapes != pending_shapes:  # a chunk cannot stack two shapes: what it holds runs
            if not plan.shapes.split_chunk:  # as single steps, and chunks start again at the next multiple of K
                plan.shapes.split_chunk = True
                warn(f"{where} has shapes {describe_shapes(batch)}, unlike the {len(pending)} batch(es) "
                     f"before it in a chunk of steps_per_execution={k}: those run as single steps, as "
                     f"will the batches up to the next step that is a multiple of {k}. Give batches of "
                     f"one shape in runs of {k} (bucketed lengths: whole chunks per bucket) to keep "
                     "every step fused.", stacklevel=2)
            for item in pending:
                step += 1
                yield single(item)
            pending = []
        aligned = k > 1 and step % k == 0 and (plan.max_steps is None or step + k <= plan.max_steps)
        if not pending and not aligned:
            step += 1
            yield single((pos, batch, size, change))
            continue
        if not pending:
            pending_shapes = shapes
        pending.append((pos, batch, size, change))
        if len(pending) == k:
            step += k
            yield Execution(stack([b for _, b, _, _ in pending]), k, True, [p for p, _, _, _ in pending],
                            pos + 1, [n for _, _, n, _ in pending], next((c for *_, c in pending if c), None))
            pending = []
    for item in pending:  # the epoch ended before a full chunk: single steps
        step += 1
        yield single(item)
    yield Execution(None, 0, False, [], position, [])  # the end: where the iterator stopped
