"""Export for inference: only the model's parameters and inference state, plus its config.

``Trainer.save_model(path)`` writes ``path/weights`` (orbax) and ``path/model.json`` (what each array
is, its checksum, the run config and the model's class). ``load_model(path, model)`` fills a module
built the same way (concrete, or abstract from ``nnx.eval_shape``) and returns it; recipes wrap this
in a loader that rebuilds the module from the saved config.

Example::

    trainer.save_model("runs/x/export")
    model = load_model("runs/x/export", nnx.eval_shape(lambda: CNN(rngs=nnx.Rngs(0))))
    logits = model(images)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from trainer.checkpoint_arrays import (CheckpointError, check_structure, expected_leaves, flatten, place_like,
                                       unflatten, verify_checksums)
from trainer.checkpoint_store import orbax_checkpoint
from trainer.json_values import jsonable
from trainer.data import first_line

INFERENCE_STATE = nnx.Not(nnx.Any(nnx.RngState, nnx.Cache, nnx.Intermediate))
"""What inference needs: every variable but the RNG streams, decoding caches and sown values (parameters, batch
statistics...): a model built afresh has no caches or sown values, and their batch size is the caller's."""


def save_model(model: nnx.Module, path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> Path:
    """Writes the model's inference state and ``config`` to the folder ``path`` (replacing it)."""
    path = Path(path).absolute()
    try:  # a bad path fails here, clearly, before orbax's writer threads start
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot export the model to {path}: {err.strerror or err}. Choose a folder that can "
                      "be created (its parents must be folders, writable).") from err
    arrays, leaves = flatten(nnx.state(model, INFERENCE_STATE))
    checkpointer = orbax_checkpoint().StandardCheckpointer()
    try:
        checkpointer.save(path / "weights", arrays, force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()  # its threads would otherwise keep a failed process from exiting
    model_class = f"{type(model).__module__}:{type(model).__qualname__}"
    (path / "model.json").write_text(json.dumps({"format": 1, "model_class": model_class, "leaves": leaves,
                                                  "config": jsonable(config or {})}))
    return path


def read_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model.json`` of an export (its config and model class)."""
    info_path = Path(path) / "model.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{path} is neither a model export (no model.json; write one with trainer.save_model) "
                                "nor a training checkpoint (a step_<N> folder, a checkpoints folder or a run's workdir).")
    try:
        info = json.loads(info_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{info_path} is damaged (not JSON: {err}); export the model again.") from err
    if not isinstance(info, dict) or not isinstance(info.get("leaves"), list):
        raise CheckpointError(f"{info_path} is damaged (no list of arrays under 'leaves'); export the model again.")
    return info


def load_model(path: str | os.PathLike, model: nnx.Module) -> nnx.Module:
    """Loads an export into ``model`` (built like the saved one), in place, and returns it.

    ``path`` may also be a training checkpoint: a ``step_<N>`` folder (``Checkpoint.best_path``, the best
    by its monitor), or a checkpoints folder or run's workdir (its newest good checkpoint); the model's
    parameters and other state (RNG streams included) are taken from it, the optimizer state left.

    Raises:
      CheckpointError: the module's structure differs (names the path and both shapes), an array
        fails its checksum, or ``model.json`` or the weights are damaged.
    """
    if isinstance(path, nnx.Module) or not isinstance(model, nnx.Module):
        raise TypeError(f"load_model(path, model) takes the export's folder, then the nnx.Module to fill; got a "
                        f"{type(path).__name__} and a {type(model).__name__}.")
    path = Path(path).absolute()
    if not (path / "model.json").exists() and _is_checkpoint(path):
        return _load_checkpoint(path, model)
    info = read_model_info(path)
    _, state, _ = nnx.split(model, INFERENCE_STATE, ...)
    check_structure(f"the export in {path}", info["leaves"], expected_leaves(state), "model")
    abstract = {d["name"]: jax.ShapeDtypeStruct(tuple(d["shape"]), d["dtype"]) for d in info["leaves"]}
    checkpointer = orbax_checkpoint().StandardCheckpointer()
    try:
        arrays = checkpointer.restore(path / "weights", abstract)
    except Exception as err:  # noqa: BLE001 - orbax / tensorstore errors of a damaged folder, named plainly
        raise CheckpointError(f"the export in {path} cannot be read, its weights folder damaged or incomplete "
                              f"({type(err).__name__}: {first_line(err)[:300]}); export the model again.") from err
    finally:
        checkpointer.close()
    verify_checksums(f"the export in {path}", arrays, info["leaves"])
    nnx.update(model, place_like(state, unflatten(state, arrays, info["leaves"])))
    _fill_abstract_rng_streams(model)
    return model


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a training checkpoint's step folder, a checkpoints folder, or a run's workdir."""
    return (path / "meta").is_dir() or any(path.glob("step_*/meta")) or any(path.glob("checkpoints/step_*/meta"))


def _load_checkpoint(path: Path, model: nnx.Module) -> nnx.Module:
    """``load_model`` from a training checkpoint: its ``params`` and ``model_state`` into ``model``."""
    from trainer.resume import find_store
    from trainer.state import TrainState, is_sown

    store, step = find_store(None, path, read_only=True)
    try:
        found = store.restore_newest(step=step)
    finally:
        store.close()
    if found is None:
        raise CheckpointError(f"{path} holds no readable checkpoint; pass a step_<N> folder or an export.")
    step, meta, arrays = found
    _, params, _, model_state = nnx.split(model, nnx.Param, lambda _, v: is_sown(v), ...)  # sown: none saved
    template = TrainState(params=params, model_state=model_state, opt_state=None, step=None)
    described = [d for d in meta["leaves"] if d["path"].startswith((".params", ".model_state"))]
    check_structure(f"checkpoint step {step} in {store.directory}", described, expected_leaves(template), "model",
                    "Load it into a model built as the one it was saved from.")
    restored = place_like(template, unflatten(template, arrays, described))
    nnx.update(model, restored.params, restored.model_state)
    return model


def _fill_abstract_rng_streams(model: nnx.Module) -> None:
    """An ``nnx.eval_shape`` module's RNG streams, which no export holds, get keys of seed 0 and counts of 0:
    a layer that draws even in eval mode (``nnx.RNN``'s carry) could not run on placeholders."""
    streams = nnx.state(model, nnx.RngState)
    if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(streams)):
        return

    def concrete(x: Any) -> Any:
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            return jax.random.split(key, x.shape) if x.shape else key
        return jnp.zeros(x.shape, x.dtype)

    nnx.update(model, jax.tree.map(concrete, streams))
