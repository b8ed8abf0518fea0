"""Where a variant's steps go on the device: one profiled chunk of steps per variant, in its own process.

``python -m benchmarks.device_profile --workload mnist_cnn hand_scan10 trainer_bare_k10`` runs each
suite variant (``benchmarks/worker.py``) in a process of its own, lets it warm up, then records one
chunk of ``--steps`` steps with ``jax.profiler`` and reports, per step: the wall time, the device's
busy time (the union of its kernels' intervals: the rest is the device waiting for the host), the
kernels' summed time, how many kernels ran, and the costliest kernels. On a GPU the kernels are the
``/device:GPU`` rows of the trace; on a CPU, the thunks XLA runs on its own threads
(``--xla_cpu_enable_xprof_traceme``, set here; a small program that XLA:CPU runs on the calling
thread shows no kernels). The suite says which variant is slower; this says whether its device
works longer or waits.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Sequence

# CPU trace rows that are the runtime's bookkeeping around the kernels, not kernels.
_BOOKKEEPING = ("ThreadpoolListener", "ThunkExecutor", "TaskScheduler", "end: ", "$")


def device_events(events: Sequence[dict]) -> list[dict]:
    """The kernel events of a perfetto trace: on ``/device:`` rows if there are any, else XLA:CPU's thunks."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if devices:
        return [e for e in spans if e["pid"] in devices]
    return [e for e in spans if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")
            and not e["name"].startswith(_BOOKKEEPING)]


def leaf_events(events: Sequence[dict]) -> list[dict]:
    """The events that hold no other event of their row (XLA:CPU's ``while`` thunk spans its body's kernels)."""
    rows: dict[tuple, list[dict]] = collections.defaultdict(list)
    for e in events:
        rows[(e["pid"], e.get("tid"))].append(e)
    leaves = []
    for row in rows.values():
        row.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        for here, after in zip(row, row[1:] + [None]):
            holds = after is not None and after["ts"] + after.get("dur", 0) <= here["ts"] + here.get("dur", 0)
            if not holds:
                leaves.append(here)
    return leaves


def busy_time(events: Iterable[dict]) -> float:
    """Microseconds covered by at least one of the events (overlapping kernels count once)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(events: Sequence[dict], steps: int, top: int = 8) -> dict[str, Any]:
    """Per step: the device's busy and summed kernel microseconds, kernels, and the ``top`` costliest by name.

    Kernels are the innermost events (a loop's span is not counted on top of its body's kernels).
    """
    kernels = leaf_events(device_events(events))
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e["name"]].append(e.get("dur", 0))
    costliest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {"device_busy_us_per_step": busy_time(kernels) / steps,
            "kernel_us_per_step": sum(e.get("dur", 0) for e in kernels) / steps,
            "kernels_per_step": len(kernels) / steps,
            "top_kernels": [{"name": name, "us_per_step": sum(durations) / steps, "per_step": len(durations) / steps}
                            for name, durations in costliest]}


def read_trace(folder: str) -> list[dict]:
    """The events of the perfetto trace ``jax.profiler.trace(folder, create_perfetto_trace=True)`` wrote."""
    path = glob.glob(os.path.join(folder, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def profile_one(workload: str, variant: str, steps: int, warmup: int) -> None:
    """In this process: warm ``variant`` up, profile ``steps`` steps, print the summary as one JSON line."""
    import jax

    from benchmarks.protocol import Pacer
    from benchmarks.worker import VARIANTS

    folder = tempfile.mkdtemp(prefix="device-profile-")
    real_stdout = sys.stdout

    class ProfilingPacer(Pacer):
        def send(self, message: dict[str, Any]) -> None:
            if message["event"] == "ready":  # after the warm-up's sync, before the timed chunk's clock starts
                jax.profiler.start_trace(folder, create_perfetto_trace=True)
            elif message["event"] == "timed":  # after the chunk's sync
                jax.profiler.stop_trace()
                summary = summarize(read_trace(folder), message["steps"])
                summary.update(variant=variant, steps=message["steps"],
                               wall_us_per_step=1e6 * message["seconds"] / message["steps"])
                real_stdout.write(json.dumps(summary) + "\n")
                real_stdout.flush()
            super().send(message)

    module, function, options = VARIANTS[variant]
    pacer = ProfilingPacer(steps, warmup, stdin=io.StringIO("run\nstop\n"), stdout=io.StringIO())
    sys.stdout = io.StringIO()  # the variant's own printing (progress, logs) stays out of the report line
    __import__(module, fromlist=[function])
    getattr(sys.modules[module], function)(workload, pacer, **options)


def run(workload: str, variants: Sequence[str], steps: int, warmup: int) -> list[dict]:
    """Each variant's summary, each profiled in a fresh process (so each owns its device and compiles alone)."""
    env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""),
                                                "--xla_cpu_enable_xprof_traceme=true"]).strip())
    results = []
    for variant in variants:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "benchmarks.device_profile", "--one", variant, "--workload",
                               workload, "--steps", str(steps), "--warmup", str(warmup)],
                              capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"{variant} gave no profile (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results.append(dict(json.loads(lines[-1]), process_seconds=time.perf_counter() - started))
    return results


def table(results: Sequence[dict]) -> str:
    """Markdown: one row per variant, then each variant's costliest kernels."""
    lines = ["| variant | wall us/step | device busy us/step | kernel us/step | kernels/step |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['wall_us_per_step']:.1f} | {r['device_busy_us_per_step']:.1f} | "
                     f"{r['kernel_us_per_step']:.1f} | {r['kernels_per_step']:.1f} |")
    for r in results:
        lines += ["", f"{r['variant']}, costliest kernels (us/step, calls/step):"]
        lines += [f"- {k['us_per_step']:.1f} us, {k['per_step']:.1f}x: {k['name'][:100]}" for k in r["top_kernels"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help="suite variants (benchmarks/worker.py)")
    parser.add_argument("--workload", default="mnist_cnn", choices=["mnist_cnn", "transformer", "mlp"])
    parser.add_argument("--steps", type=int, default=200, help="profiled steps (a multiple of the variants' K)")
    parser.add_argument("--warmup", type=int, default=40, help="steps run before the profile")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: profile this variant
    parser.add_argument("--json", default=None, help="also write the summaries here")
    args = parser.parse_args(argv)
    if args.one:
        profile_one(args.workload, args.one, args.steps, args.warmup)
        return
    results = run(args.workload, args.variants, args.steps, args.warmup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    import jax

    print(f"{args.workload}, {args.steps} profiled steps a variant, {jax.devices()[0].device_kind}")
    print(table(results))


if __name__ == "__main__":
    main()
