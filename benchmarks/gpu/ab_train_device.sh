#!/usr/bin/env bash
# Does a change train as well as what it replaces? Two runs of the proof recipe's phase 1 for the soft sync
# layers (the 4D stage), identical but for what ARMS_FILE names, side by side on one GPU: the same shipped base
# (weights/proof/base.pt.gz), the same pseudo-4D grids in the same order, the same seed; then both checkpoints on
# the held-out and validation pseudo-4D grids, evaluated alike (bf16, Euler 20). benchmarks/ab_train_report.py
# draws the paired loss curves and the per-grid differences from what comes back. With AB_STAGE=base the two
# runs train the base instead, in base_<arm>: the shipped proof base continued (--init-from) on the same
# pseudo-4D grids, or with AB_INIT=scratch a new base from random weights; then both (and the starting base)
# on the same held-out and validation clips by benchmarks/base_heldout.py (loss at fixed draws, first-frame
# generation's PSNR), in eval_base/.
#
#   [AB_STAGE=base] benchmarks/gpu/ab_train_device.sh ARMS_FILE [BUDGET]   # on the GPU machine, from the repo root; call again to go on
#
# ARMS_FILE has two lines "<name> <tree> [training options...]": <tree> is `.` or a copy of another commit's
# tree (e.g. `mkdir -p .ab_old && git archive <commit> model pipelines training rendering | tar -x -C .ab_old`,
# carried with the call)
# whose training/train_4d.py (train_base.py with AB_STAGE=base) runs that arm. runs/ab_fp8.txt is session 14's FP8 check (bf16 against fp8=true),
# runs/ab_stage0.txt session 15's (the previous commit's ZeRO-2 on one GPU against stage 0).
#
# A lent machine runs a command for at most 10 minutes, so, like proof_device.sh, the jobs run in their own
# process session and every call follows them for up to BUDGET seconds; a call on a fresh machine starts
# over from whatever is missing (training jobs resume from their checkpoints when the run folder survives).
# What comes back in $OUT: both runs' metrics.jsonl and logs' tails, the evaluation's report and grids.
set -uo pipefail
ARMS=${1:?arms file}
BUDGET=${2:-540}
RUN=$(realpath -m "${AB_RUN:-/tmp/abrun}")  # absolute: each arm runs from its own tree
OUT=${OUT:-$RUN/out}
STAGE=${AB_STAGE:-4d}
case $STAGE in
    4d) SAMPLES=${AB_SAMPLES:-9600}; prefix=p1_; script=training/train_4d.py
        stage_opts=(--sync soft --base-checkpoint "$PWD/weights/proof/base.pt.gz") ;;
    base) SAMPLES=${AB_SAMPLES:-120000}; prefix=base_; script=training/train_base.py
          case ${AB_INIT:-proof} in
              proof) stage_opts=(--init-from "$PWD/weights/proof/base.pt.gz") ;;
              scratch) stage_opts=() ;;
              *) echo "[device] AB_INIT must be proof or scratch, not '$AB_INIT'"; exit 1 ;;
          esac ;;
    *) echo "[device] AB_STAGE must be 4d or base, not '$STAGE'"; exit 1 ;;
esac
mkdir -p "$RUN/logs" "$OUT"
t0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
mapfile -t arms < <(grep -v -e '^#' -e '^\s*$' "$ARMS")
[ "${#arms[@]}" -eq 2 ] || { echo "[device] $ARMS: two arms expected, got ${#arms[@]}"; exit 1; }
names=()
for arm in "${arms[@]}"; do
    read -r name tree _ <<< "$arm"
    [ -n "$tree" ] && [ -f "$tree/$script" ] \
        || { echo "[device] arm $name: no tree '$tree' with $script (carry it with the call)"; exit 1; }
    names+=("$name")
done

source benchmarks/gpu/wheels.sh

# 1. The pseudo-4D sets (train, held-out, validation), made by the proof recipe's own step.
if [ ! -f "$RUN/.data_done" ]; then
    timeout "$(left)" python3 -m training.recipes.proof --out "$RUN" --steps pseudo4d > "$RUN/logs/data.log" 2>&1 \
        && touch "$RUN/.data_done"
    tail -3 "$RUN/logs/data.log"
    [ -f "$RUN/.data_done" ] || { echo "[device] pseudo-4D sets not finished; call again"; exit 0; }
fi

# 2. The two runs, side by side (the GPU holds both; a 5 M-parameter model leaves most of it idle).
for arm in "${arms[@]}"; do
    read -r name tree opts <<< "$arm"
    out="$RUN/$prefix$name"
    [ -e "$out/checkpoint_final" ] && continue
    pgrep -f "output $out( |$)" >/dev/null && continue
    (cd "$tree" && PYTHONPATH=/tmp/site:$PWD setsid nohup python3 "$script" --preset proof ${stage_opts[@]+"${stage_opts[@]}"} \
        --data.grids "$RUN/data/pseudo4d" --total-samples "$SAMPLES" \
        $opts --output "$out" --run-name "$prefix$name" --mlflow-uri none >> "$RUN/logs/$prefix$name.log" 2>&1 < /dev/null &)
    echo "[device] started $prefix$name (tree $tree${opts:+, $opts})"
done
while [ "$(left)" -gt 60 ] && pgrep -f "$script" >/dev/null; do sleep 10; done
for name in "${names[@]}"; do
    echo "[device] $prefix$name: $(grep -a -E '\[train' "$RUN/logs/$prefix$name.log" | tail -1 | cut -c1-200)"
done

# 3. Both checkpoints, evaluated alike (by this tree's evaluation).
a=${names[0]} b=${names[1]}
if [ "$STAGE" = base ]; then
    if [ -e "$RUN/base_$a/checkpoint_final" ] && [ -e "$RUN/base_$b/checkpoint_final" ] && [ ! -f "$RUN/eval_base/${a}_vs_${b}.json" ]; then
        start=""  # the starting base too, when the arms continued it
        [ "${AB_INIT:-proof}" = proof ] && start=",start=$PWD/weights/proof/base.pt.gz"
        timeout "$(left)" python3 benchmarks/base_heldout.py \
            --checkpoints "$a=$RUN/base_$a/checkpoint_final,$b=$RUN/base_$b/checkpoint_final$start" \
            --grids "heldout=$RUN/data/pseudo4d_heldout,val=$RUN/data/pseudo4d_val" \
            --out "$RUN/eval_base/${a}_vs_${b}.json" > "$RUN/logs/eval_base_${a}_vs_${b}.log" 2>&1
        tail -12 "$RUN/logs/eval_base_${a}_vs_${b}.log"
    fi
elif [ -e "$RUN/p1_$a/checkpoint_final" ] && [ -e "$RUN/p1_$b/checkpoint_final" ] && [ ! -f "$RUN/eval/results.json" ] \
        && [ "$(left)" -lt 180 ]; then
    # the evaluation takes about two minutes and writes its per-grid results only at the end: a call cut short
    # would lose them (session 15's first call printed the means and wrote nothing)
    echo "[device] both runs trained; the evaluation needs about 180 s more: call again"
elif [ -e "$RUN/p1_$a/checkpoint_final" ] && [ -e "$RUN/p1_$b/checkpoint_final" ] && [ ! -f "$RUN/eval/results.json" ]; then
    timeout "$(left)" python3 pipelines/evaluate_4d.py \
        --grids "heldout=$RUN/data/pseudo4d_heldout,val=$RUN/data/pseudo4d_val" \
        --checkpoints "$a=$RUN/p1_$a/checkpoint_final,$b=$RUN/p1_$b/checkpoint_final" \
        --train-free false --max-grids 32 --method euler --steps 20 --mlflow-uri none --out "$RUN/eval" > "$RUN/logs/eval.log" 2>&1
    tail -5 "$RUN/logs/eval.log"
fi
[ "$STAGE" = 4d ] && [ -f "$RUN/eval/report.md" ] && head -60 "$RUN/eval/report.md"

mkdir -p "$RUN/log_tails" && for log in "$RUN"/logs/*.log; do tail -c 100000 "$log" > "$RUN/log_tails/$(basename "$log")"; done
(cd "$RUN" && tar czf "$OUT/ab_train.tgz" --exclude='*.pt' --exclude='frames' log_tails \
    $(find . -path ./data -prune -o \( -name metrics.jsonl -o -name summary.json -o -name config.yaml \) -print) \
    $(ls -d eval eval_base 2>/dev/null) 2>/dev/null)
ls -la "$OUT"
exit 0
