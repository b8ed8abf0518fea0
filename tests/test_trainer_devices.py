"""More than one device on CPU: 8 host devices in a subprocess (``XLA_FLAGS`` must be set before jax
is imported), data-parallel through a ``place_batch`` override, against the same run on one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_data_parallel_over_8_devices_matches_one_device_and_shards_evaluation_and_prediction():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("devices_script.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    assert "the train state's arrays and the batch are on different devices: Trainer.place_batch" in out["mismatch_note"]
    # a kernel split over the devices keeps its layout through a checkpoint's restore and an export's load
    assert out["sharded"] == {"trained": "P(None, 'data')", "resumed": "P(None, 'data')", "resumed_step": 4,
                              "exported": "P(None, 'data')", "same": True}
    for k in ("k1", "k4"):  # single steps, and chunks of 4 (the chunk's batch axis is its axis 1)
        run = out[k]
        assert run["loss_gap"] < 1e-5 and run["param_gap"] < 1e-5, run  # float rounding of the split sums
        assert run["eval_gap"] < 1e-5 and run["predict_gap"] < 1e-5 and run["predict_shape"] == [40, 3], run
        assert run["param_specs"] == ["P()"], run  # replicated parameters: every device holds them whole
    # the override also places evaluate / predict batches: each device computes its share of the rows
    assert out["seen"] == [["evaluate", "P('data',)"], ["predict", "P('data',)"]]
