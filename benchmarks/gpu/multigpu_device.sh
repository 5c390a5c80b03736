#!/usr/bin/env bash
# The real training job (benchmarks/bench_train_loop.py: Ray Train + DeepSpeed + NCCL, bf16, compiled, paper
# preset) on 1 and on 2 GPUs of one lent host, in one call, so the ratio is measured on one machine.
#
#   benchmarks/gpu/multigpu_device.sh "base:1:2 base:2:2 base:2:3"   # stage:workers:zero runs, in order
#
# Carry .whl (benchmarks/gpu/build_wheels.sh). Each run's full log and JSON summary land in $OUT.
set -uo pipefail
RUNS=${1:-"base:1:2 base:2:2 base:2:3 4d:1:2 4d:2:2"}
STEPS=${STEPS:-30}
OUT=${OUT:-/tmp/multigpu}
mkdir -p "$OUT"
source benchmarks/gpu/wheels.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for run in $RUNS; do
    IFS=: read -r stage workers zero <<< "$run"
    name="${stage}_w${workers}_z${zero}"
    t0=$(date +%s)
    timeout "${RUN_TIMEOUT:-280}" python3 benchmarks/bench_train_loop.py --stage "$stage" --workers "$workers" \
        --zero "$zero" --steps "$STEPS" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "[multigpu] $name: rc $rc in $(( $(date +%s) - t0 ))s"
    grep -a -E '^\[train' "$OUT/$name.log" | tail -2 | cut -c1-240
    # the JSON summary the benchmark prints last
    sed -n '/^{/,/^}/p' "$OUT/$name.log" | tr -d '\n' | sed 's/  */ /g'; echo
    [ $rc -ne 0 ] && grep -a -E 'Error|error|Traceback' "$OUT/$name.log" | tail -8 | cut -c1-300
    ray stop --force > /dev/null 2>&1 || true
done
