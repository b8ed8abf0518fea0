"""Run by ``test_trainer_devices.py`` in a subprocess with 8 host devices (XLA_FLAGS set before jax is
imported): the same tiny run on one device and data-parallel over 8 through a ``place_batch`` override.
Prints one JSON line of what the test asserts."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import TinyMLP, make_data  # noqa: E402

from trainer import ArrayLoader, Trainer  # noqa: E402

MESH = Mesh(np.array(jax.devices()), ("data",))
seen: list[tuple[str, str]] = []


class DataParallel(Trainer):
    """Shards the batch axis over the 8 devices: axis 0 of a batch, axis 1 of a stacked chunk."""

    def place_batch(self, batch, *, stacked=False):
        return jax.device_put(batch, NamedSharding(MESH, P(None, "data") if stacked else P("data")))

    def compute_metrics(self, model, batch):
        jax.debug.inspect_array_sharding(batch["x"], callback=lambda s: seen.append(("evaluate", str(s.spec))))
        return super().compute_metrics(model, batch)

    def predict_step(self, model, batch):
        jax.debug.inspect_array_sharding(batch["x"], callback=lambda s: seen.append(("predict", str(s.spec))))
        return super().predict_step(model, batch)


def run(cls, k: int) -> dict:
    data = make_data(n=160)
    trainer = cls(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=2, steps_per_execution=k)
    history = trainer.fit(ArrayLoader(data, 16, seed=0))  # 10 batches an epoch: K=4 leaves 2 single steps
    held_out = ArrayLoader(make_data(n=40, seed=1), 16, shuffle=False, drop_remainder=False)  # 16, 16, 8 (padded)
    return {"losses": [h["loss"] for h in history], "params": [np.asarray(x) for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))],
            "eval": trainer.evaluate(held_out)["loss"], "predict": trainer.predict(held_out),
            "sharding": [str(getattr(x.sharding, "spec", "one device")) for x in jax.tree.leaves(nnx.state(trainer.model, nnx.Param))]}


def gap(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


def kernel_sharded_model() -> TinyMLP:
    """The first layer's kernel split over the devices by its output axis (tensor-parallel, as a model
    too large for one device would be)."""
    model = TinyMLP(rngs=nnx.Rngs(0))
    model.l1.kernel.set_value(jax.device_put(model.l1.kernel.get_value(), NamedSharding(MESH, P(None, "data"))))
    return model


def spec(array) -> str:
    return str(getattr(array.sharding, "spec", "one device"))


def layouts_survive_a_resume_and_an_export(make_model) -> dict:
    """A checkpoint restored (``fit(resume=True)``) and trained on, and an export loaded, keep the model's
    own placement: a kernel split over the devices stays split; arrays left uncommitted on the default
    device stay so (jit moves them next to the sharded batch)."""
    import tempfile

    from trainer import Checkpoint
    from trainer.export import load_model

    folder = tempfile.mkdtemp()
    data = ArrayLoader(make_data(n=160), 16, seed=0)
    first = DataParallel(make_model(), optax.adam(1e-2), max_steps=4,
                         callbacks=[Checkpoint(f"{folder}/checkpoints", every_n_steps=4)])
    first.fit(data)
    first.save_model(f"{folder}/export")
    resumed = DataParallel(make_model(), optax.adam(1e-2), max_steps=8,
                           callbacks=[Checkpoint(f"{folder}/checkpoints", every_n_steps=4)])
    resumed.fit(data, resume=True)  # restores step 4 and trains on to 8
    unbroken = DataParallel(make_model(), optax.adam(1e-2), max_steps=8)
    unbroken.fit(data)
    loaded = load_model(f"{folder}/export", make_model())
    return {"trained": spec(first.model.l1.kernel.get_value()), "resumed": spec(resumed.state.params["l1"]["kernel"]),
            "resumed_step": resumed.step, "exported": spec(loaded.l1.kernel.get_value()),
            "resumed_gap": gap(jax.tree.leaves(nnx.state(resumed.model, nnx.Param)),
                               jax.tree.leaves(nnx.state(unbroken.model, nnx.Param))),
            "same": bool(np.array_equal(np.asarray(first.model.l1.kernel.get_value()), np.asarray(loaded.l1.kernel.get_value())))}


def devices_that_do_not_meet_are_named() -> str:
    """Parameters on device 5, batches on devices 0-3: the error's note names what to do."""
    model = TinyMLP(rngs=nnx.Rngs(0))
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[5]))
    try:
        DataParallel(model, optax.sgd(0.1), max_steps=1).fit(ArrayLoader(make_data(n=32), 16))
    except ValueError as err:
        return "\n".join(getattr(err, "__notes__", []))
    return "no error"


def indivisible_batches_are_named() -> dict:
    """Batches of 12 rows over 8 devices: fit, eval_data (at the start of fit, before any step) and
    evaluate of arrays say which batch size would do."""
    notes = {}
    eval_data = ArrayLoader(make_data(n=48), 12, shuffle=False, drop_remainder=False)
    for what, call in (("fit", lambda t: t.fit(ArrayLoader(make_data(n=48), 12))),
                       ("evaluate", lambda t: t.evaluate(make_data(n=48), batch_size=12)),
                       ("eval_data", lambda t: t.fit(ArrayLoader(make_data(n=48), 16), eval_data=eval_data))):
        trainer = DataParallel(TinyMLP(rngs=nnx.Rngs(0)), optax.sgd(0.1), max_steps=3, prefetch=0)
        try:
            call(trainer)
            notes[what] = "no error"
        except ValueError as err:
            notes[what] = "\n".join(getattr(err, "__notes__", [])) + f" (at step {trainer.step})"
    return notes


out = {"devices": jax.device_count(), "sharded": layouts_survive_a_resume_and_an_export(kernel_sharded_model),
       "indivisible": indivisible_batches_are_named(),
       "replicated": layouts_survive_a_resume_and_an_export(lambda: TinyMLP(rngs=nnx.Rngs(0))),
       "mismatch_note": devices_that_do_not_meet_are_named()}
for k in (1, 4):
    one, eight = run(Trainer, k), run(DataParallel, k)
    out[f"k{k}"] = {"loss_gap": gap(one["losses"], eight["losses"]), "param_gap": gap(one["params"], eight["params"]),
                    "eval_gap": abs(one["eval"] - eight["eval"]), "predict_gap": gap([one["predict"]], [eight["predict"]]),
                    "predict_shape": list(eight["predict"].shape), "param_specs": sorted(set(eight["sharding"]))}
out["seen"] = sorted(set(seen))
print(json.dumps(out))
