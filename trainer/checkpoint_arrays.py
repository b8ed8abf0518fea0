"""A checkpoint's arrays: flattened to named host arrays with their descriptions (path, shape, dtype, CRC32),
small ones joined per dtype for orbax, and back: checked against the current model's structure, verified,
unflattened and placed as the arrays they replace. ``trainer.checkpoint_store`` writes and reads them."""

from __future__ import annotations

import math
import zlib
from typing import Any, Mapping

import jax
import numpy as np

from trainer.packing import is_prng_key as _is_key


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the current model / optimizer."""


def flatten(tree: Any, checksums: bool = True) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Host arrays named ``leaf_00000``... and their descriptions (path, shape, dtype, crc32).

    ``checksums=False`` leaves ``crc32`` at ``None`` for ``fill_checksums`` to compute later (off the loop).
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, described = {}, []
    host = jax.device_get([jax.random.key_data(x) if _is_key(x) else x for _, x in leaves])
    for i, ((path, leaf), value) in enumerate(zip(leaves, host)):
        value = np.asarray(value, order="C")
        name = f"leaf_{i:05d}"
        arrays[name] = value
        described.append({"name": name, "path": jax.tree_util.keystr(path), "shape": list(value.shape),
                          "dtype": str(value.dtype), "crc32": crc32(value) if checksums else None,
                          "key_impl": str(jax.random.key_impl(leaf)) if _is_key(leaf) else None})
    return arrays, described


def fill_checksums(arrays: Mapping[str, np.ndarray], described: list[dict[str, Any]]) -> None:
    """Computes the ``crc32`` that ``flatten(..., checksums=False)`` left out, in place."""
    for d in described:
        if d["crc32"] is None:
            d["crc32"] = crc32(arrays[d["name"]])


def pack_small(arrays: Mapping[str, np.ndarray], described: list[dict[str, Any]],
               max_bytes: int = 1 << 20) -> dict[str, np.ndarray]:
    """What orbax writes: arrays of at most ``max_bytes`` joined into one buffer per dtype
    (``packed_<dtype>``; each one's description gains ``packed: [buffer, offset]``), larger ones alone.

    Orbax's save spends Python time on every array, holding the GIL the train loop needs: the
    transformer's 124 state arrays (5 MB) kept a loop-like thread 1.5x slower while written,
    against 1.13x for one buffer (2-core CPU); on a GPU the transformer's saves cost 19-28% of its
    steps before, 6% after.
    """
    stored: dict[str, np.ndarray] = {}
    parts: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    for d in described:
        value = arrays[d["name"]]
        if value.nbytes > max_bytes:
            stored[d["name"]] = value
            continue
        buffer = f"packed_{value.dtype}"
        d["packed"] = [buffer, sizes.get(buffer, 0)]
        parts.setdefault(buffer, []).append(value.reshape(-1))
        sizes[buffer] = sizes.get(buffer, 0) + value.size
    stored.update({buffer: np.concatenate(part) for buffer, part in parts.items()})
    return stored


def stored_shapes(described: list[dict[str, Any]]) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every array orbax holds for ``described`` (what ``pack_small`` wrote)."""
    shapes: dict[str, jax.ShapeDtypeStruct] = {}
    for d in described:
        dtype = np.dtype(d["dtype"])
        if "packed" not in d:
            shapes[d["name"]] = jax.ShapeDtypeStruct(tuple(d["shape"]), dtype)
            continue
        buffer, offset = d["packed"]
        end = offset + math.prod(d["shape"])
        if buffer in shapes and shapes[buffer].shape[0] >= end:
            continue
        shapes[buffer] = jax.ShapeDtypeStruct((end,), dtype)
    return shapes


def unpack_small(stored: Mapping[str, np.ndarray], described: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Every leaf's array by its name, cut out of the buffers ``pack_small`` joined."""
    arrays = {}
    for d in described:
        if "packed" not in d:
            arrays[d["name"]] = np.asarray(stored[d["name"]])
            continue
        buffer, offset = d["packed"]
        size = math.prod(d["shape"])
        arrays[d["name"]] = np.asarray(stored[buffer][offset:offset + size]).reshape(d["shape"])
    return arrays


def crc32(value: np.ndarray) -> int:
    """CRC32 of a C-contiguous array's bytes, read in place (``tobytes`` would copy the array first)."""
    return zlib.crc32(value.reshape(-1).view(np.uint8))


_key_data = jax.jit(jax.random.key_data)
"""One traced function for every key's shape: ``eval_shape`` of the bare function traced anew at each call (a
``load_model`` or a resume), each kept in JAX's cache of 2,048 (~11 MiB, pushing other functions out)."""


def expected_leaves(tree: Any) -> list[dict[str, Any]]:
    """Path, shape and dtype of every leaf of ``tree`` as ``flatten`` would store it (no copy)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = jax.eval_shape(_key_data, leaf) if _is_key(leaf) else leaf
        if not hasattr(shape, "shape"):  # a Python number in a variable: stored as JAX holds it (int32, float32)
            shape = jax.ShapeDtypeStruct((), jax.dtypes.canonicalize_dtype(np.result_type(leaf)))
        out.append({"path": jax.tree_util.keystr(path), "shape": list(shape.shape), "dtype": str(shape.dtype)})
    return out


def check_structure(source: str, stored: list[dict], expected: list[dict], what: str,
                    advice: str = "Restore into the model and optimizer it was saved from (same architecture and "
                                  "optimizer chain).") -> None:
    """Raises ``CheckpointError`` naming the source (``checkpoint step 4``), the path, stored and expected."""
    stored_paths = [d["path"] for d in stored]
    expected_paths = [d["path"] for d in expected]
    if stored_paths != expected_paths:
        missing = [p for p in expected_paths if p not in stored_paths]
        extra = [p for p in stored_paths if p not in expected_paths]
        differences = [f"the current {what} has {missing[:5]}, which it lacks" if missing else "",
                       f"it has {extra[:5]}, which the current {what} lacks" if extra else ""]
        raise CheckpointError(
            f"{source} does not fit the current {what}: {'; '.join(d for d in differences if d) or 'its arrays come in another order'}"
            f". {advice}"
        )
    for s, e in zip(stored, expected):
        if s["shape"] != e["shape"] or s["dtype"] != e["dtype"]:
            raise CheckpointError(
                f"{source} does not fit the current {what} at {s['path']}: stored "
                f"{s['dtype']}{s['shape']}, expected {e['dtype']}{e['shape']}. Build the model with the "
                "sizes and dtypes it was saved with."
            )


def unflatten(template: Any, arrays: Mapping[str, np.ndarray], described: list[dict]) -> Any:
    """The restored arrays in the pytree structure of ``template`` (PRNG keys re-wrapped)."""
    values = []
    for d in described:
        value = arrays[d["name"]]
        values.append(jax.random.wrap_key_data(value, impl=d["key_impl"]) if d["key_impl"] else value)
    return jax.tree.unflatten(jax.tree.structure(template), values)


def place_like(template: Any, tree: Any) -> Any:
    """``tree``'s arrays on the devices, each with the sharding of ``template``'s array in its place where
    that array was placed on purpose (committed: a sharded model stays sharded after a restore; or an
    abstract one with a sharding); the others uncommitted on the default device, as ``jax.device_put``
    leaves them, so that jit still moves them next to the batch (data parallel). Always copies: a JAX
    array given (a weight written into the model) is not the one the next step donates."""
    def put(like: Any, value: Any) -> Any:
        sharding = getattr(like, "sharding", None)
        placed = like.committed if isinstance(like, jax.Array) else sharding is not None
        if placed:
            return jax.device_put(value, sharding, may_alias=False)
        if isinstance(value, jax.Array) and value.committed:  # device_put would keep it where it is, committed
            value = np.asarray(value)
        return jax.device_put(value, may_alias=False)

    return jax.tree.map(put, template, tree)


def verify_checksums(source: str, arrays: Mapping[str, np.ndarray], described: list[dict]) -> None:
    for d in described:
        value = np.asarray(arrays[d["name"]], order="C")
        if crc32(value) != d["crc32"]:
            raise CheckpointError(f"{source}: array {d['path']} fails its checksum (the file is damaged).")
