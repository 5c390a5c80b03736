#!/usr/bin/env bash
# Checkpoint, resume and a killed worker on 2 GPUs (issue 14 item 1): the real training job (Ray Train +
# DeepSpeed ZeRO-2 over NCCL, bf16, compiled blocks) of the base stage at the proof preset, three times on the
# same data and seed:
#   A  uninterrupted, STEPS optimizer steps;
#   B  stopped after HALF steps (--steps-this-run: it checkpoints and exits, as a preempted job would), then
#      the same command again, which resumes from that checkpoint;
#   C  one RayTrainWorker process killed with SIGKILL after a checkpoint, from outside the job (as the OOM
#      killer or a lost node would); Ray Train restarts the worker group from the latest checkpoint.
# benchmarks/resume_compare.py then checks, step by step against A, that B and C log every step once, with A's
# learning rate and samples seen (the data position), and losses within bf16 noise of A's.
#
#   benchmarks/gpu/resume_device.sh          # on a 2-GPU lent machine (nvidia-h200-x2), carrying .whl
set -uo pipefail
STEPS=${STEPS:-40}
HALF=$((STEPS / 2))
EVERY=${EVERY:-10}
OUT=${OUT:-/tmp/resume}
WORK=/tmp/resume_work
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/A" "$WORK/B" "$WORK/C"  # a warm machine's earlier runs would resume finished and "pass"
source benchmarks/gpu/wheels.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$WORK/data/summary.json" ] || python3 pipelines/make_pseudo4d.py --preset proof --output "$WORK/data" \
    --procedural.count 200 > "$OUT/data.log" 2>&1 || { tail -5 "$OUT/data.log"; exit 1; }
# 64 clips per GPU per step, two GPUs: STEPS x 128 clips.
train() {  # train <run folder> [extra flags...]
    local run=$1; shift
    timeout "${RUN_TIMEOUT:-300}" python3 training/train_base.py --preset proof --output "$run" --run-name "$(basename "$run")" \
        --mlflow-uri none --data.grids "$WORK/data" --num-workers 2 --zero-stage 2 \
        --total-samples $((STEPS * 128)) --checkpoint-every "$EVERY" --log-every 1 --max-failures 1 "$@"
}
step_of() {  # the last step a run logged (0 before its first)
    [ -s "$1/metrics.jsonl" ] || { echo 0; return; }
    tail -1 "$1/metrics.jsonl" | python3 -c "import json,sys
try: print(json.loads(sys.stdin.read()).get('step', 0))
except ValueError: print(0)"
}

t0=$(date +%s)
train "$WORK/A" > "$OUT/A.log" 2>&1; rc=$?; echo "[resume] A (uninterrupted): rc $rc in $(( $(date +%s) - t0 ))s"
ray stop --force > /dev/null 2>&1

t0=$(date +%s)
train "$WORK/B" --steps-this-run "$HALF" > "$OUT/B1.log" 2>&1; rc=$?; echo "[resume] B stopped at step $(step_of "$WORK/B"): rc $rc"
ray stop --force > /dev/null 2>&1
train "$WORK/B" > "$OUT/B2.log" 2>&1; rc=$?; echo "[resume] B resumed: rc $rc in $(( $(date +%s) - t0 ))s"
ray stop --force > /dev/null 2>&1

t0=$(date +%s)
train "$WORK/C" > "$OUT/C.log" 2>&1 &
job=$!
killed=""
while kill -0 "$job" 2>/dev/null; do
    sleep 1
    if [ -z "$killed" ] && [ "$(step_of "$WORK/C")" -ge $((HALF + EVERY / 2)) ]; then
        victim=$(pgrep -f "RayTrainWorker" | tail -1)
        if [ -n "$victim" ] && kill -9 "$victim"; then
            killed="$victim at step $(step_of "$WORK/C")"
            echo "[resume] C: killed worker process $killed"
        fi
    fi
done
wait "$job"; rc=$?; echo "[resume] C (worker killed): rc $rc in $(( $(date +%s) - t0 ))s"
ray stop --force > /dev/null 2>&1
for r in A B C; do cp "$WORK/$r/metrics.jsonl" "$OUT/$r.metrics.jsonl" 2>/dev/null; done
python3 benchmarks/resume_compare.py --reference "$WORK/A/metrics.jsonl" --runs "B=$WORK/B/metrics.jsonl,C=$WORK/C/metrics.jsonl" \
    --out "$OUT/resume_compare.json"
rc=$?
grep -a -h -E "Error|error:|Traceback" "$OUT"/*.log | sort | uniq -c | sort -rn | head -8 | cut -c1-250
if [ -z "$killed" ]; then
    echo "[resume] C: no worker was killed (none found, or the run ended first): the recovery was not tested"
    exit 1
fi
exit $rc
