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


def test_two_processes_train_and_resume_with_the_default_checkpoints_and_say_what_is_not_process_aware(tmp_path):
    """2 processes joined by jax.distributed (the multi-process audit): a background checkpoint write crashed or
    hung them (orbax's barrier on the worker thread met the step's collectives out of order), as a prefetch
    thread did; they now write on the loop, with no thread, and say once what is not yet process-aware."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).with_name("processes_script.py")
    runs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(
                                 os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                 TEST_PORT=str(port), TEST_RANK=str(rank))) for rank in (0, 1)]
    try:
        done = [run.communicate(timeout=240) for run in runs]  # a hang ends itself at 180 s, its stacks on stderr
    finally:
        for run in runs:
            run.kill()
    for run, (_, err) in zip(runs, done):
        assert run.returncode == 0, err[-3000:]
    outs = [json.loads(out.strip().splitlines()[-1]) for out, _ in done]
    for out in outs:
        assert out["devices"] == 4 and out["steps"] == [6, 12] and out["prefetch"] == 0
        assert len(out["warned"]) == 1 and "process-aware" in out["warned"][0]
        assert "prefetch=2 with 2 processes" in out["refused"]
    assert outs[0]["params"] == outs[1]["params"] and outs[0]["digest"] == outs[1]["digest"]
