#!/usr/bin/env bash
# Does the 4D stage train as well with its frozen base in FP8 (`fp8=true`) as in bf16? Two runs of the
# proof recipe's phase 1 for the soft sync layers, identical but for `fp8`: the same shipped base
# (weights/proof/base.pt.gz), the same pseudo-4D grids in the same order, the same seed; then both
# checkpoints on the held-out and validation pseudo-4D grids, evaluated alike (bf16, Euler 20).
#
#   benchmarks/gpu/fp8_train_device.sh 540      # on the GPU machine, from the repo root; call again to go on
#
# A lent machine runs a command for at most 10 minutes, so, like proof_device.sh, the jobs run in their own
# process session and every call follows them for up to BUDGET seconds; a call on a fresh machine starts
# over from whatever is missing (training jobs resume from their checkpoints when the run folder survives).
# What comes back in $OUT: both runs' metrics.jsonl and logs' tails, the evaluation's report and grids.
set -uo pipefail
BUDGET=${1:-540}
RUN=${FP8_RUN:-/tmp/fp8run}
OUT=${OUT:-$RUN/out}
SAMPLES=${FP8_SAMPLES:-9600}
mkdir -p "$RUN/logs" "$OUT"
t0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }

if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && touch /tmp/site/.installed || { echo "wheel install failed"; exit 1; }
    echo "[device] wheels installed in $(( $(date +%s) - t0 ))s"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=0

# 1. The pseudo-4D sets (train, held-out, validation), made by the proof recipe's own step.
if [ ! -f "$RUN/.data_done" ]; then
    timeout "$(left)" python3 -m training.recipes.proof --out "$RUN" --steps pseudo4d > "$RUN/logs/data.log" 2>&1 \
        && touch "$RUN/.data_done"
    tail -3 "$RUN/logs/data.log"
    [ -f "$RUN/.data_done" ] || { echo "[device] pseudo-4D sets not finished; call again"; exit 0; }
fi

# 2. The two phase-1 runs, side by side (the GPU holds both; a 5 M-parameter model leaves most of it idle).
for prec in bf16 fp8; do
    out="$RUN/p1_$prec"
    [ -e "$out/checkpoint_final" ] && continue
    pgrep -f "output $out( |$)" >/dev/null && continue
    flag=$([ "$prec" = fp8 ] && echo "--set fp8=true" || echo "--set fp8=false")
    setsid nohup python3 training/train_4d.py --preset proof --sync soft --base-checkpoint "$PWD/weights/proof/base.pt.gz" \
        --data.grids "$RUN/data/pseudo4d" --total-samples "$SAMPLES" $flag --output "$out" --run-name "p1_$prec" \
        --mlflow-uri none >> "$RUN/logs/p1_$prec.log" 2>&1 < /dev/null &
    echo "[device] started p1_$prec"
done
while [ "$(left)" -gt 60 ] && pgrep -f "training/train_4d.py" >/dev/null; do sleep 10; done
for prec in bf16 fp8; do
    echo "[device] p1_$prec: $(grep -a -E '\[train' "$RUN/logs/p1_$prec.log" | tail -1 | cut -c1-200)"
done

# 3. Both checkpoints, evaluated alike.
if [ -e "$RUN/p1_bf16/checkpoint_final" ] && [ -e "$RUN/p1_fp8/checkpoint_final" ] && [ ! -f "$RUN/eval/results.json" ]; then
    timeout "$(left)" python3 pipelines/evaluate_4d.py \
        --grids "heldout=$RUN/data/pseudo4d_heldout,val=$RUN/data/pseudo4d_val" \
        --checkpoints "bf16=$RUN/p1_bf16/checkpoint_final,fp8=$RUN/p1_fp8/checkpoint_final" \
        --train-free false --max-grids 32 --method euler --steps 20 --mlflow-uri none --out "$RUN/eval" > "$RUN/logs/eval.log" 2>&1
    tail -5 "$RUN/logs/eval.log"
fi
[ -f "$RUN/eval/report.md" ] && cat "$RUN/eval/report.md" | head -60

mkdir -p "$RUN/log_tails" && for log in "$RUN"/logs/*.log; do tail -c 100000 "$log" > "$RUN/log_tails/$(basename "$log")"; done
(cd "$RUN" && tar czf "$OUT/fp8_train.tgz" --exclude='*.pt' --exclude='frames' log_tails \
    $(find . -path ./data -prune -o \( -name metrics.jsonl -o -name summary.json -o -name config.yaml \) -print) \
    $(ls -d eval 2>/dev/null) 2>/dev/null)
ls -la "$OUT"
exit 0
