#!/usr/bin/env bash
# Issue 15 item 1: the training job's MFU on one lent GPU, beside the bare model step, in one call.
#
#   benchmarks/gpu/mfu_device.sh RUNS_FILE
#
# RUNS_FILE has one run a line, "<name> <script> <args...>", where script is `job`
# (benchmarks/bench_train_loop.py: Ray Train + DeepSpeed + loader + EMA, paper preset), `job@DIR` (the same
# from a copy of an earlier tree, e.g. `mkdir -p DIR && git archive <commit> benchmarks model pipelines training |
# tar -x -C DIR`: before/after in one call) or `bare`
# (benchmarks/bench_model.py: the compiled model step alone, fused AdamW) or `bare@DIR` (the same, run from a
# copy of an earlier tree in DIR, e.g. `mkdir -p DIR && git archive <commit> model benchmarks/bench_model.py pipelines/common
# pipelines/__init__.py | tar -x -C DIR`: a before/after ratio in one call). Lines starting with # are skipped.
# Carry .whl (benchmarks/gpu/build_wheels.sh). $OUT gets results.jsonl (one JSON line a run, the job's phase
# table included), kernels_<run>.txt (the profiled steps' top kernels) and logs.tgz (every log, and each job's
# gaps_<run>.json from benchmarks/trace_gaps.py; the traces themselves stay on the machine):
# few files, as a device call returns at most 8.
set -uo pipefail
RUNS=${1:?runs file}
OUT=${OUT:-/tmp/mfu}
mkdir -p "$OUT"
LOGS=/tmp/mfu_logs; mkdir -p "$LOGS"
source benchmarks/gpu/wheels.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
grep -v '^#' "$RUNS" | while read -r name script args; do
    [ -z "$name" ] && continue
    t0=$(date +%s)
    case $script in
        job|job@*) dir=.; [ "$script" != job ] && dir=${script#job@}
             (cd "$dir" && PYTHONPATH=/tmp/site:$PWD timeout "${RUN_TIMEOUT:-200}" python3 benchmarks/bench_train_loop.py \
                 $args --profile-out "$LOGS/profile_$name") > "$LOGS/$name.log" 2>&1 < /dev/null
             rc=$?
             cp "$LOGS/profile_$name/kernels_rank0.txt" "$OUT/kernels_$name.txt" 2>/dev/null
             # where the GPU idled (benchmarks/trace_gaps.py): the summary here, the table in logs.tgz
             [ -f "$LOGS/profile_$name/trace_rank0.json" ] && python3 benchmarks/trace_gaps.py \
                 "$LOGS/profile_$name/trace_rank0.json" --json "$LOGS/gaps_$name.json" --top 6 2>&1 | cut -c1-200 ;;
        bare|bare@*) dir=.; [ "$script" != bare ] && dir=${script#bare@}
             (cd "$dir" && PYTHONPATH=/tmp/site:$PWD timeout "${RUN_TIMEOUT:-200}" \
                 python3 benchmarks/bench_model.py $args --json) > "$LOGS/$name.log" 2>&1 < /dev/null
             rc=$? ;;
        *) echo "[mfu] $name: unknown script '$script' (job, job@DIR, bare or bare@DIR)"; continue ;;
    esac
    echo "[mfu] $name: rc $rc in $(( $(date +%s) - t0 ))s"
    grep -a -E '^\[train' "$LOGS/$name.log" | grep -v final | tail -3 | cut -c1-300
    # the JSON the benchmark prints last, one line, tagged with the run's name
    sed -n '/^{/,/^}/p' "$LOGS/$name.log" | tr -d '\n' | sed 's/  */ /g' | sed "s/^{/{\"run\": \"$name\", /" \
        | tee -a "$OUT/results.jsonl"; echo | tee -a "$OUT/results.jsonl"  # one record a line
    [ $rc -ne 0 ] && grep -a -E 'Error|error|Traceback' "$LOGS/$name.log" | tail -8 | cut -c1-300
    case $script in job*) ray stop --force > /dev/null 2>&1 || true ;; esac
done
tar czf "$OUT/logs.tgz" --exclude='trace_*' -C "$LOGS" . 2>/dev/null
