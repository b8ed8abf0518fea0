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
    assert "the step's arrays, the train state's and the batch's, are not all on the same devices" in out["mismatch_note"]
    for what in ("fit", "evaluate", "eval_data"):  # JAX's own error names an array dimension only
        assert "a batch of 12 rows cannot be split evenly over the devices" in out["indivisible"][what], what
    assert out["indivisible"]["eval_data"].endswith("(at step 0)")  # found when fit starts, not after an epoch
    # a kernel split over the devices keeps its layout through a checkpoint's restore and an export's load
    # and a resumed run trains on as the unbroken one, split or left to jit (the README's data parallel)
    for layout, spec in (("sharded", "P(None, 'data')"), ("replicated", "P()")):
        run = out[layout]
        assert run.pop("resumed_gap") < 1e-6, (layout, run)
        assert run == {"trained": spec, "resumed": spec, "resumed_step": 8, "exported": "one device" if layout ==
                       "replicated" else spec, "same": True}, layout
    for k in ("k1", "k4"):  # single steps, and chunks of 4 (the chunk's batch axis is its axis 1)
        run = out[k]
        assert run["loss_gap"] < 1e-5 and run["param_gap"] < 1e-5, run  # float rounding of the split sums
        assert run["eval_gap"] < 1e-5 and run["predict_gap"] < 1e-5 and run["predict_shape"] == [40, 3], run
        assert run["param_specs"] == ["P()"], run  # replicated parameters: every device holds them whole
    # the override also places evaluate / predict batches: each device computes its share of the rows
    assert out["seen"] == [["evaluate", "P('data',)"], ["predict", "P('data',)"]]
