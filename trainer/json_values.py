"""Values as JSON keeps them: the run's config and callbacks' states in checkpoints and exports.

A config is written leniently (anything else as its ``str``); a callback's state strictly, since a value
JSON cannot keep would come back as a string.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np


def jsonable(value: Any, where: str | None = None) -> Any:
    """``value`` as JSON can hold it: arrays (numpy, JAX) and tuples as lists. Lenient (``where`` None,
    a config): keys and other values as ``str``. Strict (a callback state, named by ``where``): a key
    that is no string or a value JSON cannot keep (a set, bytes, an object) is refused by name, since
    it would come back as a string."""
    if isinstance(value, Mapping):
        if where is not None:
            for k in value:
                if not isinstance(k, str):
                    raise TypeError(f"{where} has the key {k!r}, a {type(k).__name__}: checkpoints keep states as "
                                    "JSON, whose keys are strings; use str keys.")
        return {str(k): jsonable(v, where and f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, where and f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if where is not None:
        raise TypeError(f"{where} holds a {type(value).__name__} ({value!r:.60}), which a checkpoint (JSON) cannot "
                        "keep: give numbers, strings, lists, dicts or arrays (a set as a sorted list).")
    return str(value)
