"""Export for inference: what is written, that it predicts the same, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
from flax import nnx

from conftest import TinyMLP
from trainer import ArrayLoader, Trainer
from trainer.checkpoint_store import CheckpointError
from trainer import load_model, read_model_info  # the package exports both


def trained(data, tmp_path):
    trainer = Trainer(TinyMLP(dropout=0.2, rngs=nnx.Rngs(0)), optax.adam(1e-2), max_steps=6,
                      config={"hidden": 16})
    trainer.fit(ArrayLoader(data, 16))
    return trainer, trainer.save_model(tmp_path / "export")


def test_export_round_trip_predicts_the_same(data, tmp_path):
    trainer, path = trained(data, tmp_path)
    info = read_model_info(path)
    assert info["config"] == {"hidden": 16} and info["model_class"].endswith("TinyMLP")
    assert all("rngs" not in d["path"] for d in info["leaves"])  # only what inference needs
    abstract = nnx.eval_shape(lambda: TinyMLP(dropout=0.2, rngs=nnx.Rngs(5)))
    loaded = load_model(path, abstract)
    loaded.eval()
    trainer.model.eval()
    np.testing.assert_array_equal(np.asarray(loaded(data["x"])), np.asarray(trainer.model(data["x"])))
    assert loaded is abstract  # filled in place
    concrete = TinyMLP(dropout=0.2, rngs=nnx.Rngs(7))
    load_model(path, concrete)  # the return value need not be used
    concrete.eval()
    np.testing.assert_array_equal(np.asarray(concrete(data["x"])), np.asarray(trainer.model(data["x"])))


def test_loading_into_another_architecture_names_the_path(data, tmp_path):
    _, path = trained(data, tmp_path)
    with pytest.raises(CheckpointError, match=r"export in .* does not fit the current model at \['l1'\]\['bias'\].value: stored float32\[16\], expected float32\[32\]"):
        load_model(path, TinyMLP(hidden=32, rngs=nnx.Rngs(0)))


def test_damaged_export_fails_its_checksum(data, tmp_path):
    _, path = trained(data, tmp_path)
    info = json.loads((path / "model.json").read_text())
    info["leaves"][0]["crc32"] ^= 1
    (path / "model.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_model(path, TinyMLP(rngs=nnx.Rngs(0)))


def test_a_damaged_weights_folder_or_model_json_is_a_checkpoint_error(data, tmp_path):
    _, path = trained(data, tmp_path)
    files = sorted((f for f in (path / "weights").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    for f in files[-3:]:  # the largest: the array data and orbax's metadata
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"export the model again"):
        load_model(path, TinyMLP(rngs=nnx.Rngs(0)))
    (path / "model.json").write_text('{"format": 1, "leaves": [')
    with pytest.raises(CheckpointError, match=r"model.json is damaged \(not JSON"):
        load_model(path, TinyMLP(rngs=nnx.Rngs(0)))


def test_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a model export .* nor a training checkpoint"):
        load_model(tmp_path, TinyMLP(rngs=nnx.Rngs(0)))


def test_an_export_path_under_a_file_is_a_clear_error_and_the_process_can_exit(tmp_path):
    import subprocess
    import sys

    (tmp_path / "afile").write_text("not a folder")
    script = ("import sys; sys.path.insert(0, 'tests'); from conftest import TinyMLP; from flax import nnx; "
              "from trainer.export import save_model; "
              f"save_model(TinyMLP(rngs=nnx.Rngs(0)), {str(tmp_path / 'afile' / 'sub')!r})")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    # orbax's writer threads, left open by a failed save, kept such a process from ever exiting
    assert out.returncode == 1 and "cannot export the model to" in out.stderr and "Not a directory" in out.stderr


def test_numpy_values_in_the_config_are_exported_as_numbers(data, tmp_path):
    """The export wrote ``str(np.float32(1e-3))``: a loader rebuilding the model from it got "0.001" and "16"."""
    config = {"lr": np.float32(1e-3), "width": np.int64(16), "sizes": (np.int32(8), 3), "name": "mlp"}
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1, config=config)
    info = read_model_info(trainer.save_model(tmp_path / "export"))
    assert info["config"] == {"lr": pytest.approx(1e-3), "width": 16, "sizes": [8, 3], "name": "mlp"}
    assert isinstance(info["config"]["width"], int) and isinstance(info["config"]["lr"], float)


def test_load_model_with_its_arguments_swapped_says_their_order(data, tmp_path):
    trainer = Trainer(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=1)
    path = trainer.save_model(tmp_path / "export")
    with pytest.raises(TypeError, match=r"load_model\(path, model\) takes the export's folder, then the nnx.Module to "
                                        r"fill; got a TinyMLP and a PosixPath"):
        load_model(TinyMLP(rngs=nnx.Rngs(1)), path)


def test_reading_a_checkpoints_structure_traces_its_rng_keys_once():
    """expected_leaves traced key_data anew for each key at each load_model or resume: JAX kept every trace
    (~11 MiB at its cache's 2,048 entries, pushing other functions out)."""
    pjit = pytest.importorskip("jax._src.pjit")
    cache = getattr(pjit, "_infer_params_cached", None)
    if not hasattr(cache, "cache_info"):
        pytest.skip("this JAX keeps no such cache")
    from trainer.checkpoint_arrays import expected_leaves

    state = nnx.state(nnx.Dropout(0.1, rngs=nnx.Rngs(0)))
    expected_leaves(state)
    before = cache.cache_info().currsize
    for _ in range(50):
        expected_leaves(state)
    assert cache.cache_info().currsize - before < 5
