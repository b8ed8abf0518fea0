"""The benchmark suite: every variant of every workload, interleaved, as a markdown table and JSON.

    python -m benchmarks.suite                      # all workloads and variants (~25 min on 2 cores)
    python -m benchmarks.suite --workloads mlp --variants hand trainer_bare trainer_k10 --repeats 3

Each variant runs in its own worker process (``benchmarks/worker.py``), started one at a time so
compilations do not overlap; then the coordinator asks each in turn for a timed chunk of steps,
``--repeats`` rounds, rotating the order every round, so machine noise hits all variants alike.
Reported per variant: steps/s (median, min-max over rounds), the ratio to the hand-written loop
(median and min-max of the per-round ratios, each against the hand loop's chunk of that round),
compile seconds (first execution minus its steps at the median rate), peak RSS, and for the
hand loop the achieved GFLOP/s (XLA's flop count of the step times the rate). Then issue 6's
targets as per-round ratios of two variants (``benchmarks/targets.py``).
Peers (Keras, PyTorch, Lightning) need ``pip install -e ".[bench]"``; missing ones are skipped.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import targets, workloads
from benchmarks.worker import VARIANTS

CHUNK = {"mnist_cnn": 20, "transformer": 10, "mlp": 2000}  # steps per timed chunk: ~1-5 s each here
PEER_MODULES = {"keras": "keras", "keras_k10": "keras", "torch": "torch", "lightning": "lightning"}
FLAG_SETS = {  # "variant+name" runs the variant with these XLA_FLAGS (measured in HISTORY.md)
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "xnnfusion": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "onednnfusion": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "fastmath": "--xla_cpu_enable_fast_math=true",
    "eigen1": "--xla_cpu_multi_thread_eigen=false",
    "avx2": "--xla_cpu_max_isa=AVX2",
    "vw512": "--xla_cpu_prefer_vector_width=512",
    "xnngraph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fastrt": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "tiling": "--xla_cpu_experimental_enable_tiling_propagation=true",
}
DEFAULT_VARIANTS = ("hand", "hand_scan10", "trainer_bare", "trainer_default", "trainer_k10", "keras",
                    "keras_k10", "torch", "lightning")


class Worker:
    """One variant's process and its line protocol."""

    def __init__(self, workload: str, variant: str, chunk: int, warmup: int, env: dict, log_dir: Path):
        self.variant = variant
        self.log = open(log_dir / f"{workload}-{variant}.log", "w")
        base, _, flags = variant.partition("+")
        if flags:
            env = dict(env, XLA_FLAGS=" ".join([env.get("XLA_FLAGS", ""), FLAG_SETS[flags]]).strip())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker", workload, base, "--chunk", str(chunk), "--warmup", str(warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, bufsize=1)
        self.first = self.ready = None

    def wait_ready(self) -> None:
        if self.ready is None:
            self.first = self.expect("first")
            self.ready = self.expect("ready")

    def expect(self, event: str) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.variant} exited (rc={self.proc.wait()}); see {self.log.name}")
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printed to stdout
            if message.get("event") == "error":
                raise RuntimeError(f"worker {self.variant}: {message['message']}")
            if message.get("event") == event:
                return message

    def timed(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self.expect("timed")

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        done = self.expect("done")
        self.proc.wait(timeout=60)
        self.log.close()
        return done


def known_variant(name: str) -> str:
    base, _, flags = name.partition("+")
    if base not in VARIANTS or (flags and flags not in FLAG_SETS):
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: choose from {sorted(VARIANTS)}, optionally "
                                         f"+ one of {sorted(FLAG_SETS)} (e.g. hand+onednn)")
    return name


def available(variant: str) -> bool:
    module = PEER_MODULES.get(variant.partition("+")[0])
    return module is None or importlib.util.find_spec(module) is not None


def run_workload(workload: str, variants: list[str], repeats: int, env: dict, log_dir: Path,
                 chunk_scale: float = 1.0, parallel_start: bool = False) -> list[dict]:
    chunk = max(10, int(CHUNK[workload] * chunk_scale) // 10 * 10)
    warmup = max(30, min(chunk, 2000))  # past the first epoch end, where Keras compiles its epoch-end work
    print(f"[{workload}] starting {', '.join(variants)}", file=sys.stderr, flush=True)
    workers = [Worker(workload, variant, chunk, warmup, env, log_dir) for variant in variants] if parallel_start else []
    for variant in ([] if parallel_start else variants):
        workers.append(Worker(workload, variant, chunk, warmup, env, log_dir))
    for worker in workers:
        worker.wait_ready()
    times: dict[str, list[float]] = {w.variant: [] for w in workers}
    for r in range(repeats):
        order = workers[r % len(workers):] + workers[:r % len(workers)]
        for worker in order:
            message = worker.timed()
            times[worker.variant].append(message["steps"] / message["seconds"])
        print(f"[{workload}] round {r + 1}/{repeats}: " + ", ".join(
            f"{v} {rates[-1]:.1f}" for v, rates in times.items()), file=sys.stderr, flush=True)
    rows = []
    hand = times.get("hand")
    for worker in workers:
        done = worker.stop()
        rates = times[worker.variant]
        median = statistics.median(rates)
        first = worker.first
        row = {
            "workload": workload, "variant": worker.variant, "steps_per_sec": median,
            "steps_per_sec_min": min(rates), "steps_per_sec_max": max(rates), "rates": rates,
            "compile_seconds": max(0.0, first["seconds"] - first["steps"] / median),
            "peak_rss_mb": done["peak_rss_mb"], "chunk_steps": chunk, "total_steps": done.get("steps"),
            "param_abs_sum": done.get("param_abs_sum"), "prefetch_in_use": done.get("prefetch_in_use"),
        }
        if hand:
            ratios = [a / b for a, b in zip(rates, hand)]
            row.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        if worker.ready.get("flops_per_step"):
            row["gflops_per_sec"] = worker.ready["flops_per_step"] * median / 1e9
            row["gflop_per_step"] = worker.ready["flops_per_step"] / 1e9
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| workload | variant | steps/s median (min-max) | ratio to hand (min-max) | compile s | peak RSS MiB | GFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})" if "ratio" in r else "-"
        gflops = f"{r['gflops_per_sec']:.1f}" if "gflops_per_sec" in r else ""
        lines.append(f"| {r['workload']} | {r['variant']} | {r['steps_per_sec']:.2f} ({r['steps_per_sec_min']:.2f}-"
                     f"{r['steps_per_sec_max']:.2f}) | {ratio} | {r['compile_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {gflops} |")
    return "\n".join(lines)


def machine() -> dict:
    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(workloads.WORKLOADS), choices=workloads.WORKLOADS)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), type=known_variant,
                        help=f"from {sorted(VARIANTS)}; 'name+flags' adds XLA flags, flags from {sorted(FLAG_SETS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per variant")
    parser.add_argument("--json", default="benchmarks/results.json", help="where the JSON goes")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--data", default=None, help="a folder of batches written before (save_batches); default: build them")
    parser.add_argument("--chunk-scale", type=float, default=1.0, help="multiply the steps per timed chunk (e.g. 50 on a GPU)")
    parser.add_argument("--parallel-start", action="store_true",
                        help="start the workers together (on a machine with cores to spare: compile times overlap)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants if available(v)]
    skipped = sorted(set(args.variants) - set(variants))
    if skipped:
        print(f"skipping {skipped}: not installed (pip install -e '.[bench]')", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        data = args.data or scratch
        env = dict(os.environ, BENCH_DATA=data, BENCH_SCRATCH=scratch, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
        log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
        for workload in args.workloads:
            if not os.path.exists(os.path.join(data, f"{workload}.npz")):
                workloads.save_batches(workload, data)
            rows += run_workload(workload, variants, args.repeats, env, log_dir, args.chunk_scale, args.parallel_start)
    judged = targets.judge(rows)
    table = markdown(rows) + "\n\nIssue 6's targets (per-round ratios):\n\n" + targets.markdown(judged)
    print(table)
    report = {"machine": machine(), "command": "python -m benchmarks.suite " + " ".join(argv or sys.argv[1:]),
              "repeats": args.repeats, "skipped": skipped, "rows": rows, "targets": judged}
    Path(args.json).write_text(json.dumps(report, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print(f"wrote {args.json}; worker logs in {log_dir}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
