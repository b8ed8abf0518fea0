"""``trainer.settings``: config fields that declare the values they accept."""

import dataclasses

import pytest

from trainer.optim import OptimConfig
from trainer.settings import Bounds, bounds_of, setting, setting_problems


@dataclasses.dataclass
class Inner:
    rate: float = setting(0.5, at_least=0, below=1)


@dataclasses.dataclass
class Outer:
    count: int = setting(3, at_least=1)
    scale: float | None = setting(None, above=0)
    kind: str = setting("a", choices=("a", "b"))
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_problems_name_each_field_outside_its_bounds_nested_included():
    assert setting_problems(Outer()) == []
    found = setting_problems(Outer(count=0, scale=0.0, kind="c", inner=Inner(rate=1.0)))
    assert [(name, value) for name, value, _ in found] == [("count", 0), ("scale", 0.0), ("kind", "c"), ("rate", 1.0)]
    assert [b.requirement() for _, _, b in found] == ["must be >= 1", "must be > 0", "must be one of ['a', 'b']",
                                                      "must be in [0, 1)"]


@pytest.mark.parametrize("bounds, accepted, refused", [
    (Bounds(at_least=0, below=1), [0, 0.5, None], [-0.1, 1, float("nan")]),
    (Bounds(above=0, at_most=2), [1e-9, 2], [0, 2.5]),
    (Bounds(choices=("x",)), ["x"], ["y"]),
])
def test_bounds_accept_their_range_and_its_closed_ends_only(bounds, accepted, refused):
    assert all(bounds.accepts(v) for v in accepted)
    assert not any(bounds.accepts(v) for v in refused)


def test_a_subclass_that_changes_a_default_keeps_the_base_bounds():
    @dataclasses.dataclass
    class Tuned(OptimConfig):
        learning_rate: float = 3e-3

    assert bounds_of(Tuned, "learning_rate") == bounds_of(OptimConfig, "learning_rate")
    assert [name for name, _, _ in setting_problems(Tuned(learning_rate=-1.0, momentum=1.0))] == [
        "learning_rate", "momentum"]


def test_a_range_refuses_non_finite_values_saying_they_are_not_finite():
    bounds = Bounds(at_least=0)
    assert bounds.accepts(1e308) and bounds.accepts(10 ** 400)  # large, but finite
    for value in (float("inf"), float("-inf"), float("nan")):
        assert not bounds.accepts(value)
        assert bounds.refusal(value) == "is not finite; it must be >= 0"
    assert Bounds(above=0).refusal(-1.0) == "must be > 0"
    assert [name for name, _, _ in setting_problems(OptimConfig(weight_decay=float("inf")))] == ["weight_decay"]
