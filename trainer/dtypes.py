"""Which dtypes hold numbers: numpy's ``dtype.kind`` calls ``bfloat16`` and the float8 types ``'V'`` (raw
bytes), as it does strings' records, so a check by kind missed them (a NaN in bfloat16 parameters was saved)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating type, ``bfloat16`` and float8 included."""
    return bool(jnp.issubdtype(np.dtype(dtype), jnp.floating))


def is_real_number(dtype: Any) -> bool:
    """Whether ``dtype`` holds booleans, integers or real floats (``bfloat16``, float8 and int4 included; not
    complex, strings, objects or raw bytes)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "b" or bool(jnp.issubdtype(dtype, jnp.integer)) or is_floating(dtype)


def holds_numbers(dtype: Any) -> bool:
    """Whether JAX can take arrays of ``dtype``: numbers of any kind, complex included."""
    dtype = np.dtype(dtype)
    return is_real_number(dtype) or dtype.kind == "c"
