"""Run by ``test_trainer_devices.py`` as 2 processes joined by ``jax.distributed`` on localhost (2 host devices
each): a data-parallel fit with the default checkpointing, then a resume. Prints one JSON line of what the
test asserts. argv: workdir."""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import warnings

import jax

faulthandler.dump_traceback_later(180, exit=True)  # a hang prints every thread's stack and exits, before the test's
# timeout kills the process (SIGKILL, which faulthandler cannot catch)
jax.distributed.initialize(coordinator_address=f"localhost:{os.environ['TEST_PORT']}", num_processes=2,
                           process_id=int(os.environ["TEST_RANK"]))

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import TinyMLP, make_data  # noqa: E402

from callbacks import Checkpoint  # noqa: E402
from trainer import ArrayLoader, Trainer  # noqa: E402

MESH = Mesh(np.array(jax.devices()), ("data",))


class DataParallel(Trainer):
    def place_batch(self, batch, *, stacked=False):
        return jax.device_put(batch, NamedSharding(MESH, P(None, "data") if stacked else P("data")))


def fit(epochs: int, resume: bool) -> tuple[Trainer, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DataParallel(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=epochs, workdir=sys.argv[1],
                               callbacks=[Checkpoint(every_n_steps=2, max_to_keep=2)])  # async_save by default
        trainer.fit(ArrayLoader(make_data(), 16), resume=resume)
    return trainer, [str(w.message) for w in caught]


first, said = fit(1, False)
resumed, _ = fit(2, True)
params = [np.asarray(leaf.addressable_data(0)) for leaf in jax.tree.leaves(nnx.state(resumed.model, nnx.Param))]
try:
    DataParallel(TinyMLP(rngs=nnx.Rngs(0)), optax.adam(1e-2), max_epochs=1, prefetch=2)
    refused = ""
except ValueError as err:
    refused = str(err)
print(json.dumps({"devices": jax.device_count(), "steps": [first.step, resumed.step], "prefetch": first.prefetch,
                  "warned": [w for w in said if "not yet process-aware" in w], "refused": refused,
                  "digest": float(sum(np.sum(np.abs(p), dtype=np.float64) for p in params)),
                  "params": [p.tolist() for p in params[:1]]}), flush=True)
