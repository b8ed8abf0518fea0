"""What a step's traced program holds decides how the trainer compiles it: these read its jaxpr.

Kept apart from ``trainer.step`` (which builds the programs): the scan's unroll, whether a fused
chunk checks its guard once, and the equation walks that ``trainer.build``, ``trainer.threefry``
and ``trainer.dense_grads`` use to look for convolutions, random draws and layer products.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax


def scan_unroll(jaxpr: Any) -> int | bool:
    """How far to unroll the fused ``lax.scan`` of a step with this jaxpr: fully for convolutions on CPU.

    Measured on XLA:CPU (``benchmarks/HISTORY.md``): inside a rolled loop the MNIST CNN's step ran
    10x slower (its convolution gradients), while unrolled it matches single steps; a transformer or
    an MLP runs as fast rolled and compiles 3-6x faster, so everything else stays rolled.
    """
    if jax.default_backend() != "cpu":
        return 1

    return True if any_equation(jaxpr, lambda eqn: eqn.primitive.name == "conv_general_dilated") else 1


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of ``jaxpr`` (a closed jaxpr or not) and of the jaxprs nested in it, depth first."""
    for eqn in (jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr).eqns:
        yield eqn
        for sub in _subjaxprs(eqn):
            yield from equations(sub)


def any_equation(jaxpr: Any, predicate: Callable[[Any], bool]) -> bool:
    """Whether any equation of ``jaxpr``, or of a jaxpr nested in it, satisfies ``predicate``."""
    return any(predicate(eqn) for eqn in equations(jaxpr))


CHUNK_GUARD_MAX_PARAMS = 100_000


def use_chunk_guard(unroll: int | bool, num_params: int) -> bool:
    """Whether a guarded fused chunk checks for non-finite steps once, rerunning itself guarded if one was.

    On XLA:CPU the guard's per-step ``lax.cond`` costs a fixed ~20-40 us: 10% of the tiny MLP's
    fused step (26k parameters), nothing measurable on the transformer's (426k). The chunk check
    costs a second compiled scan (transformer: +4 s compile, +70 MiB peak RSS) and a packed copy of
    the state kept between chunks (``trainer.carry``), so it is used only on CPU, for rolled scans
    of models up to ``CHUNK_GUARD_MAX_PARAMS`` parameters.
    """
    return (jax.default_backend() == "cpu" and not isinstance(unroll, bool) and unroll == 1
            and num_params <= CHUNK_GUARD_MAX_PARAMS)


def _subjaxprs(eqn: Any):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
