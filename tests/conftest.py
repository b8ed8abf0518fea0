"""Shared tiny fixtures: a small MLP with dropout and a separable 3-class dataset."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx


class TinyMLP(nnx.Module):
    def __init__(self, din: int = 8, hidden: int = 16, classes: int = 3, dropout: float = 0.0, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.l1(x))))


def make_data(n: int = 96, din: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, din)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    return {"x": x, "label": y}


@pytest.fixture
def data() -> dict[str, np.ndarray]:
    return make_data()


@pytest.fixture
def model() -> TinyMLP:
    return TinyMLP(rngs=nnx.Rngs(0))
