"""Checkpoint files: orbax's ``CheckpointManager`` plus what it lacks (checksums, fallback, clear errors).

A checkpoint step holds two orbax items under one atomic commit: ``state``, the train state as
flat numbered arrays, and ``meta``, a JSON document with everything else (step, data position,
callback states, config, environment fingerprint) and, for every array, its pytree path, shape,
dtype and CRC32 computed at save time. Restoring checks the structure against the current model
(a clear error on mismatch), verifies every checksum, and falls back to the previous step when the
newest cannot be restored.
"""

from __future__ import annotations

import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

FORMAT = 1
TMP_MARKER = ".orbax-checkpoint-tmp"
STEP_PREFIX = "step"  # step folders are step_<N>: a foreign integer-named folder is never one of ours


def orbax_checkpoint():
    """``orbax.checkpoint``, imported on first use: a run that saves nothing skips its ~26 MiB and import time."""
    import orbax.checkpoint

    return orbax.checkpoint


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the current model / optimizer."""


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def flatten(tree: Any) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Host arrays named ``leaf_00000``... and their descriptions (path, shape, dtype, crc32)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays, described = {}, []
    host = jax.device_get([jax.random.key_data(x) if _is_key(x) else x for _, x in leaves])
    for i, ((path, leaf), value) in enumerate(zip(leaves, host)):
        value = np.asarray(value, order="C")
        name = f"leaf_{i:05d}"
        arrays[name] = value
        described.append({"name": name, "path": jax.tree_util.keystr(path), "shape": list(value.shape),
                          "dtype": str(value.dtype), "crc32": crc32(value),
                          "key_impl": str(jax.random.key_impl(leaf)) if _is_key(leaf) else None})
    return arrays, described


def crc32(value: np.ndarray) -> int:
    """CRC32 of a C-contiguous array's bytes, read in place (``tobytes`` would copy the array first)."""
    return zlib.crc32(value.reshape(-1).view(np.uint8))


def expected_leaves(tree: Any) -> list[dict[str, Any]]:
    """Path, shape and dtype of every leaf of ``tree`` as ``flatten`` would store it (no copy)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf) else leaf
        out.append({"path": jax.tree_util.keystr(path), "shape": list(shape.shape), "dtype": str(shape.dtype)})
    return out


def check_structure(source: str, stored: list[dict], expected: list[dict], what: str) -> None:
    """Raises ``CheckpointError`` naming the source (``checkpoint step 4``), the path, stored and expected."""
    stored_paths = [d["path"] for d in stored]
    expected_paths = [d["path"] for d in expected]
    if stored_paths != expected_paths:
        missing = [p for p in expected_paths if p not in stored_paths]
        extra = [p for p in stored_paths if p not in expected_paths]
        raise CheckpointError(
            f"{source} does not fit the current {what}: it lacks {missing[:5]} and has "
            f"{extra[:5]} that the current one does not. Restore into the model and optimizer it was "
            "saved from (same architecture and optimizer chain)."
        )
    for s, e in zip(stored, expected):
        if s["shape"] != e["shape"] or s["dtype"] != e["dtype"]:
            raise CheckpointError(
                f"{source} does not fit the current {what} at {s['path']}: stored "
                f"{s['dtype']}{s['shape']}, expected {e['dtype']}{e['shape']}. Build the model with the "
                "sizes it was saved with."
            )


def unflatten(template: Any, arrays: Mapping[str, np.ndarray], described: list[dict]) -> Any:
    """The restored arrays in the pytree structure of ``template`` (PRNG keys re-wrapped)."""
    values = []
    for d in described:
        value = arrays[d["name"]]
        values.append(jax.random.wrap_key_data(value, impl=d["key_impl"]) if d["key_impl"] else value)
    return jax.tree.unflatten(jax.tree.structure(template), values)


def verify_checksums(source: str, arrays: Mapping[str, np.ndarray], described: list[dict]) -> None:
    for d in described:
        value = np.asarray(arrays[d["name"]], order="C")
        if crc32(value) != d["crc32"]:
            raise CheckpointError(f"{source}: array {d['path']} fails its checksum (the file is damaged).")


class CheckpointStore:
    """An orbax ``CheckpointManager`` in ``directory`` with retention, checksums and fallback.

    Args:
      directory: the folder of step folders.
      max_to_keep: newest checkpoints kept.
      monitor / mode / keep_best: also keep the ``keep_best`` best by the metric ``monitor``.
      async_save: write in the background (``wait()`` before relying on a save).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, monitor: str | None = None,
                 mode: str = "min", keep_best: int | None = None, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clean_temporary()
        ocp = orbax_checkpoint()
        from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

        keep: list = [policies.LatestN(n=max_to_keep)]
        if monitor is not None and keep_best:
            keep.append(policies.BestN(get_metric_fn=lambda m: m[monitor], reverse=(mode == "min"), n=keep_best,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, step_prefix=STEP_PREFIX,
            preservation_policy=policies.AnyPreservationPolicy(keep))
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def clean_temporary(self) -> list[Path]:
        """Removes folders a killed save left behind (orbax's temporary names)."""
        removed = [p for p in self.directory.iterdir() if TMP_MARKER in p.name]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def save(self, step: int, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> None:
        ocp = orbax_checkpoint()
        args = ocp.args.Composite(state=ocp.args.StandardSave(dict(arrays)), meta=ocp.args.JsonSave(dict(meta)))
        if step in self.manager.all_steps():  # a run resumed from an older step passes this one again
            self.manager.wait_until_finished()
            self.manager.delete(step)
        self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=True)

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self.manager.wait_until_finished()

    def folder(self, step: int) -> Path:
        return self.directory / f"{STEP_PREFIX}_{step}"

    def steps(self) -> list[int]:
        """Step numbers of the ``step_<N>`` folders, newest first (not all need be good checkpoints)."""
        prefix = STEP_PREFIX + "_"
        found = [p.name[len(prefix):] for p in self.directory.iterdir() if p.is_dir() and p.name.startswith(prefix)]
        return sorted((int(n) for n in found if n.isdigit()), reverse=True)

    def read_meta(self, step: int) -> dict | None:
        """The meta document of ``step``; ``None`` for a folder that holds no checkpoint of ours."""
        folder = self.folder(step)
        if not (folder / "meta").is_dir() or not (folder / "state").is_dir():
            return None
        try:
            ocp = orbax_checkpoint()
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # a damaged meta file: treated as no checkpoint by the caller's fallback
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None

    def read_arrays(self, step: int, described: list[dict]) -> dict[str, np.ndarray]:
        abstract = {d["name"]: jax.ShapeDtypeStruct(tuple(d["shape"]), np.dtype(d["dtype"])) for d in described}
        ocp = orbax_checkpoint()
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        arrays = {k: np.asarray(v) for k, v in restored["state"].items()}
        verify_checksums(f"checkpoint step {step}", arrays, described)
        return arrays

    def restore_newest(self, check: Any = None, step: int | None = None) -> tuple[int, dict, dict] | None:
        """``(step, meta, arrays)`` of the newest good checkpoint (or of ``step``), else ``None``.

        ``check(step, meta)`` may raise to refuse a checkpoint for good (a structure mismatch);
        a step that cannot be read or fails its checksum is skipped with one warning naming it.
        """
        candidates = [step] if step is not None else self.steps()
        for candidate in candidates:
            meta = self.read_meta(candidate)
            if meta is None:
                if step is not None:
                    raise CheckpointError(f"{self.folder(step)} holds no readable checkpoint.")
                if any(self.folder(candidate).iterdir()):
                    warnings.warn(f"checkpoint step {candidate} in {self.directory} cannot be read "
                                  "(damaged or foreign); trying an older one.", RuntimeWarning, stacklevel=3)
                continue
            if check is not None:
                check(candidate, meta)
            try:
                arrays = self.read_arrays(candidate, meta["leaves"])
            except Exception as err:  # orbax's errors for damaged files rarely say so
                if step is not None:
                    raise CheckpointError(f"checkpoint step {step} cannot be restored: {err}") from err
                warnings.warn(f"checkpoint step {candidate} cannot be restored ({err}); falling back to an "
                              "older one.", RuntimeWarning, stacklevel=3)
                continue
            return candidate, meta, arrays
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
