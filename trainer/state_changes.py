"""What a train step's call of the model may change in its state: values it sows are dropped (the call's own),
and the structure the compiled step carries is checked (a variable filled from ``None``, another shape, an
integer made a float are refused by name; a float stays its float dtype, an integer its integer dtype)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.state import is_sown


def without_sown(before: Any, after: Any) -> Any:
    """The model state after a call, less what the call sowed (``is_sown``; an ``nnx.Intermediate`` it added):
    the call's own, not state to carry (the trainer's state holds none: ``TrainState.create``). An
    ``Intermediate`` the model holds that the loss popped (``nnx.pop(model, nnx.Intermediate)``) keeps its value."""
    held = dict(nnx.to_flat_state(before))
    flat = nnx.to_flat_state(after)
    kept = [(path, v) for path, v in flat if not (isinstance(v, nnx.Intermediate) and (path not in held or is_sown(v)))]
    found = {path for path, _ in kept}
    popped = [(path, v) for path, v in held.items() if isinstance(v, nnx.Intermediate) and path not in found]
    return after if len(kept) == len(flat) and not popped else nnx.from_flat_state(kept + popped)


def check_same_structure(before: Any, after: Any) -> None:
    """Refuses a step that changed the model state's structure (a variable holding ``None`` filled, one of
    another shape, an integer made a float), naming each: the compiled step carries a state of one structure
    (and casts a float to its float dtype, an integer to its integer dtype)."""
    def described(tree: Any) -> dict[str, tuple]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        name = lambda path: jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")  # noqa: E731
        return {name(path): (tuple(x.shape), f"{x.dtype}{list(x.shape)}", x.dtype) for path, x in flat}

    if jax.tree.structure(before) == jax.tree.structure(after) and all(
            a.shape == b.shape and _same_kind(a.dtype, b.dtype) for a, b in zip(jax.tree.leaves(before),
                                                                                  jax.tree.leaves(after))):
        return
    was, now = described(before), described(after)
    text = lambda described: described[1] if described else "None"  # noqa: E731
    changed = [f"{name} ({text(was.get(name))} -> {text(now.get(name))})" for name in sorted({*was, *now})
               if name not in was or name not in now or was[name][0] != now[name][0]
               or not _same_kind(was[name][2], now[name][2])]
    raise ValueError(f"the model changed its state's structure when called in the train step: {', '.join(changed[:4])}. "
                     "The compiled step carries one structure from step to step: give such a variable an array of "
                     "its final shape and dtype in __init__ (not None), or keep per-call values out of the model "
                     "(self.sow(nnx.Intermediate, ...) values are dropped after each step).")


def _same_kind(a: Any, b: Any) -> bool:
    """Dtypes the carried state casts between without loss of kind: float to float, integer to integer."""
    kind = lambda d: "f" if jnp.issubdtype(d, jnp.floating) else "i" if jnp.issubdtype(d, jnp.integer) else str(d)  # noqa: E731
    return a == b or kind(a) == kind(b)
