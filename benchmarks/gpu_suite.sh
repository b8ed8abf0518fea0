#!/bin/bash
# The benchmark suite on a lent GPU machine in one call (the `device` tool): each workload under its
# own timeout, tables and JSON under $OUT. That machine has jax, flax, optax, orbax and torch but no
# network: carry the rest as wheels in .whl/ (git-ignored), fetched here once with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     clu==0.0.12 ml-collections tensorboardX==2.6.5 crc32c keras==3.15.1 namex optree mlxtend==0.25.0
# and run as: run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=600) (the suite took ~260 s on an
# H200 in sitting 18 with two variants fewer; with the two device profiles at the end, ~450 s: untested on a GPU so far;
# each part has its own timeout: 560 s in all, 40 s for the import check). The tables come back as $OUT/*.md; JSON and
# worker logs as $OUT/raw.tgz (the tool returns at most 8 files).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false KERAS_BACKEND=jax
OUT=${OUT:-/tmp/gpu-suite}; RAW=/tmp/gpu-suite-raw; mkdir -p "$OUT" "$RAW"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
timeout 40 python3 -c "import jax, flax, optax, keras, trainer, callbacks, benchmarks.worker; print(jax.__version__, flax.__version__, optax.__version__, keras.__version__, jax.devices())" || exit 2
# trainer_*_select_guard: the per-step guard a select, not the conditional (XLA:GPU reads a conditional's predicate
# on the host: a sync every step, unless the runtime keeps it on the device; sitting 19)
V="hand hand_scan10 trainer_bare trainer_default trainer_k10 trainer_bare_k10 trainer_k10_chunk_guard trainer_default_select_guard trainer_k10_select_guard keras"
run() {  # name, timeout in seconds, suite arguments
  local name=$1 limit=$2; shift 2
  timeout -k 5 "$limit" python3 -m benchmarks.suite "$@" --parallel-start --json "$RAW/$name.json" --markdown "$OUT/$name.md" > "$RAW/$name.log" 2>&1
  echo "$name rc=$? at $(date +%T)"; pkill -f benchmarks.worker; tar czf "$OUT/raw.tgz" -C "$RAW" .
}
# trainer_*_unbounded: dispatch_ahead=None, the loop as far ahead as JAX lets it (the default 4: sitting 20, CPU only)
run mlp 140 --workloads mlp --variants $V keras_k10 trainer_default_unbounded trainer_k10_unbounded --chunk-scale 2 --repeats 4
run cnn 120 --workloads mnist_cnn --variants $V --chunk-scale 50 --repeats 5
run transformer 170 --workloads transformer --variants $V --chunk-scale 50 --repeats 5
# where the MLP's fused chunk spends with each form of the guard (conditional, select, checked once a chunk),
# and the CNN's against the hand-written scan's (0.58x in the third and fifth runs; the CNN moves 4 MB of
# images a chunk, the others under 0.2 MB): device kernels, copies and idle time a step
timeout -k 5 60 python3 -m benchmarks.device_profile --workload mlp --steps 2000 \
  trainer_bare_k10 trainer_k10 trainer_k10_select_guard trainer_k10_chunk_guard > "$OUT/profile_mlp.md" 2>&1; echo "profile_mlp rc=$?"
timeout -k 5 70 python3 -m benchmarks.device_profile --workload mnist_cnn --steps 200 \
  hand_scan10 trainer_bare_k10 trainer_k10 > "$OUT/profile_cnn.md" 2>&1; echo "profile_cnn rc=$?"
for name in mlp cnn transformer; do cat "$OUT/$name.md" 2>/dev/null || tail -5 "$RAW/$name.log"; done
head -8 "$OUT/profile_mlp.md" "$OUT/profile_cnn.md"
