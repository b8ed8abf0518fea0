"""Config dataclass fields that carry the values they accept, so a command line can refuse the rest.

A field declared ``max_shift: int = setting(2, at_least=0)`` is an ordinary dataclass field whose
metadata holds its bounds; ``setting_problems(config)`` lists the fields (nested dataclasses
included) whose values fall outside them. ``recipes.config_cli`` turns each into a usage error
naming the flag (``--max-shift -1 must be >= 0``) before anything is built, where the value would
otherwise fail deep inside JAX or a constructor that names a Python argument.
A field's ``Bounds`` sit in its dataclass metadata under ``METADATA_KEY``.

Example::

    @dataclasses.dataclass
    class Config:
        epochs: int = setting(10, at_least=1)
        dropout: float = setting(0.1, at_least=0, below=1, why="the share of activations zeroed")
        policy: str = setting("raise", choices=("raise", "skip"))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

METADATA_KEY = "setting"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What a setting accepts: a closed or open lower / upper bound, or a set of choices. ``None`` is
    always accepted here (whether a field may be ``None`` is its type's business)."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    choices: tuple | None = None
    why: str | None = None

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is within the bounds; a range refuses non-finite numbers (``inf``, ``nan``)."""
        if value is None:
            return True
        if self.choices is not None:
            return value in self.choices
        if not _finite(value):
            return False
        return not ((self.at_least is not None and not value >= self.at_least)
                    or (self.above is not None and not value > self.above)
                    or (self.at_most is not None and not value <= self.at_most)
                    or (self.below is not None and not value < self.below))

    def refusal(self, value: Any) -> str:
        """Why ``value`` is refused: ``must be >= 1``, or ``is not finite; it must be > 0`` for inf / nan."""
        return f"is not finite; it {self.requirement()}" if not _finite(value) else self.requirement()

    def requirement(self) -> str:
        """``must be >= 1``, ``must be in [0, 1)``, ``must be one of ['a', 'b']``."""
        if self.choices is not None:
            return f"must be one of {list(self.choices)}"
        low = (self.at_least, "[") if self.at_least is not None else (self.above, "(") if self.above is not None else None
        high = (self.at_most, "]") if self.at_most is not None else (self.below, ")") if self.below is not None else None
        if low and high:
            return f"must be in {low[1]}{_number(low[0])}, {_number(high[0])}{high[1]}"
        if low:
            return f"must be {'>=' if low[1] == '[' else '>'} {_number(low[0])}"
        if high:
            return f"must be {'<=' if high[1] == ']' else '<'} {_number(high[0])}"
        return "is accepted"


def _finite(value: Any) -> bool:
    """Whether a number is finite; anything that is no real number counts as finite (its bounds decide)."""
    return not isinstance(value, numbers.Real) or isinstance(value, numbers.Integral) or math.isfinite(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def setting(default: Any = dataclasses.MISSING, *, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None, below: float | None = None, choices: Sequence | None = None,
            why: str | None = None) -> Any:
    """A dataclass field with ``default`` that accepts only values within the given bounds (or ``choices``);
    ``why`` says what the value means, for the error message."""
    bounds = Bounds(at_least, above, at_most, below, tuple(choices) if choices is not None else None, why)
    return dataclasses.field(default=default, metadata={METADATA_KEY: bounds})


def bounds_of(cls: type, name: str) -> Bounds | None:
    """The bounds field ``name`` of the dataclass ``cls`` was declared with by ``setting``, if any: a
    subclass that only changes a default (``learning_rate: float = 3e-3``) keeps its base's bounds."""
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and METADATA_KEY in field.metadata:
            return field.metadata[METADATA_KEY]
    return None


def setting_problems(config: Any) -> list[tuple[str, Any, Bounds]]:
    """``(field name, value, bounds)`` for every field of ``config`` (and of the dataclasses it nests)
    whose value its bounds refuse, in declaration order."""
    problems = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            problems += setting_problems(value)
            continue
        bounds = bounds_of(type(config), field.name)
        if bounds is not None and not bounds.accepts(value):
            problems.append((field.name, value, bounds))
    return problems
