"""CPU tuning: JAX's threefry hash lowered unrolled for a train step that draws many random words.

Every ``jax.random`` draw with the default keys (dropout's masks among them) runs the threefry2x32
hash. On CPU, JAX lowers it as a rolled loop of five iterations to compile faster, and XLA:CPU runs
each iteration as its own kernels over the whole array: ~8 ns a word on the 2-core CPU, ~22 ms of
the transformer recipe's 160 ms step (2.6M words of dropout masks). Unrolled (JAX's own lowering
on GPU and TPU) the hash is one kernel and the step ran 1.07x faster; the bits are the same.

The unrolled hash's results pass an ``optimization_barrier``, so each array of words is computed
once (fused into its consumers it measured 1.05x, behind the barrier 1.08x). The swap of the
lowering rule is scoped to the calls that may compile the train step (``unrolled_calls``): other
programs in the process keep JAX's CPU lowering. It reaches into ``jax._src``; where that layout
changes, ``available()`` is false and nothing is swapped.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator

from jax import lax

try:
    from jax._src.interpreters import mlir as _mlir
    from jax._src.random import threefry2x32 as _threefry

    _PRIMITIVE = _threefry.threefry2x32_p
    _CPU_RULES = _mlir._platform_specific_lowerings["cpu"]

    def _unrolled_hash(key1, key2, x1, x2):
        words = _threefry._threefry2x32_lowering(key1, key2, x1, x2, use_rolled_loops=False)
        return lax.optimization_barrier(tuple(words))

    _UNROLLED = _mlir.LoweringRuleEntry(_mlir.lower_fun(_unrolled_hash, multiple_results=True), False)
except (ImportError, AttributeError, KeyError, TypeError):  # pragma: no cover - another jax layout
    _PRIMITIVE = _CPU_RULES = _UNROLLED = None

# Below this many words a step, the rolled loops cost under ~8 ms and the changed program measured
# about as much the other way (the MNIST CNN: 33k words, 0.96x), so smaller draws keep JAX's lowering.
UNROLL_MIN_WORDS = 1 << 20

_lock = threading.Lock()
_active = 0
_previous: Any = None


def available() -> bool:
    """Whether this jax exposes the CPU lowering rule that ``unrolled_on_cpu`` swaps."""
    return _UNROLLED is not None and _PRIMITIVE in _CPU_RULES


def random_words(eqns: Iterator[Any]) -> int:
    """32-bit words the threefry hash computes for these jaxpr equations (``random_bits`` draws)."""
    total = 0
    for eqn in eqns:
        if eqn.primitive.name == "random_bits" and "fry" in str(eqn.invars[0].aval.dtype):
            total += math.prod(eqn.outvars[0].aval.shape) * max(1, eqn.params["bit_width"] // 32)
        elif eqn.primitive.name == "threefry2x32":
            total += sum(math.prod(v.aval.shape) for v in eqn.outvars)
    return total


@contextlib.contextmanager
def unrolled_on_cpu() -> Iterator[None]:
    """While inside, programs lowered for CPU hash with the unrolled threefry (re-entrant, thread-safe)."""
    global _active, _previous
    if not available():
        yield
        return
    with _lock:
        if _active == 0:
            _previous = _CPU_RULES[_PRIMITIVE]
            _CPU_RULES[_PRIMITIVE] = _UNROLLED
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _CPU_RULES[_PRIMITIVE] = _previous


class unrolled_calls:  # noqa: N801 - used like a function wrapper
    """``fn`` (a jitted function) whose calls, and so its compilations, run under ``unrolled_on_cpu``.

    Other attributes (``lower``, ``_cache_size``) are the wrapped function's.
    """

    def __init__(self, fn: Callable) -> None:
        self.wrapped = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with unrolled_on_cpu():
            return self.wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)
