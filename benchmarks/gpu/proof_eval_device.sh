#!/usr/bin/env bash
# Evaluate exported proof weights, and train the upsampler again, on a fresh lent GPU machine (run 4 of
# docs/results.md): what proof_device.sh's last steps do when the machine that trained the 4D models has
# been given back. Wheels and weights together exceed a call's 64 MiB, so it takes two calls and more:
#
#   call 1, carry .whl and outputs/proof/data/render_heldout:  benchmarks/gpu/proof_eval_device.sh 150
#       installs the wheels, starts the data lane (held-out pseudo-4D grids, the upsampler's sets), then
#       trains and scores the upsampler
#   call 2+, carry outputs/proof/run4_weights (the recipe's weights/ folder) and render_heldout:
#       benchmarks/gpu/proof_eval_device.sh 520 outputs/proof/run4_weights
#       starts the 4D evaluation once the held-out grids exist; every call follows both and returns results
#
# Commands are the recipe's own (training/recipes/proof.py); the run folder is $EV (default /tmp/ev).
set -uo pipefail
BUDGET=${1:-520}
WEIGHTS=${2:-}
EV=${EV:-/tmp/ev}
OUT=${OUT:-$EV/out}
mkdir -p "$EV/data" "$EV/logs" "$OUT"
t0=$(date +%s)
source benchmarks/gpu/wheels.sh
[ -d outputs/proof/data/render_heldout ] && [ ! -e "$EV/data/render_heldout" ] && cp -r outputs/proof/data/render_heldout "$EV/data/"
[ -n "$WEIGHTS" ] && [ -d "$WEIGHTS" ] && [ ! -e "$EV/weights" ] && cp -r "$WEIGHTS" "$EV/weights"

running() { pgrep -f "$1" >/dev/null; }
# The data and upsampler lane: needs the wheels (Ray Data, Ray Train + DeepSpeed).
if [ -f /tmp/site/.installed ] && ! running "lane_upsampler" && [ ! -f "$EV/eval_upsampler/results.json" ]; then
    setsid nohup bash -c "exec -a lane_upsampler bash -c '
        set -e; echo \$\$ > $EV/lane.pid
        [ -f $EV/data/pseudo4d_heldout/summary.json ] || python3 pipelines/make_pseudo4d.py --preset proof --output $EV/data/pseudo4d_heldout --procedural.seed 1000000 --procedural.count 32
        [ -f $EV/data/upsampler_heldout/summary.json ] || python3 pipelines/make_pseudo4d.py --preset proof --output $EV/data/upsampler_heldout --procedural.seed 3000000 --procedural.count 16 --views 4 --frames 4 --height 256 --width 256 --procedural.width 512 --procedural.height 384
        [ -f $EV/data/upsampler/summary.json ] || python3 pipelines/make_pseudo4d.py --preset proof --output $EV/data/upsampler --procedural.seed 2000000 --procedural.count 400 --views 4 --frames 4 --height 256 --width 256 --procedural.width 512 --procedural.height 384
        python3 training/train_upsampler.py --preset proof --output $EV/upsampler --run-name upsampler --mlflow-uri none --data.grids $EV/data/upsampler
        python3 -m training.recipes.upsampler_eval --checkpoint $EV/upsampler/checkpoint_final --grids $EV/data/upsampler_heldout --out $EV/eval_upsampler'" \
        >> "$EV/logs/lane_upsampler.log" 2>&1 < /dev/null &
    echo "[device] upsampler lane started"
fi
# The 4D evaluation: the recipe's eval command on the exported weights, once the held-out grids exist.
W=$EV/weights
# (The held-out pseudo-4D grids come from the lane: without it running or done there is nothing to wait for.)
if [ -d "$W" ] && [ ! -f "$EV/eval/results.json" ] && ! running "pipelines/evaluate_4d.py" \
        && { [ -f "$EV/data/pseudo4d_heldout/summary.json" ] || running lane_upsampler; }; then
    setsid nohup bash -c "while [ ! -f $EV/data/pseudo4d_heldout/summary.json ] && kill -0 \$(cat $EV/lane.pid) 2>/dev/null; do sleep 2; done;
        python3 pipelines/evaluate_4d.py --grids render=$EV/data/render_heldout,pseudo4d=$EV/data/pseudo4d_heldout \
        --checkpoints soft=$W/soft.pt.gz,hard=$W/hard.pt.gz,sequential=$W/sequential.pt.gz,soft_pseudo_only=$W/soft_pseudo_only.pt.gz \
        --max-grids 16 --steps 20 --method euler --out $EV/eval --mlflow-uri none" >> "$EV/logs/eval.log" 2>&1 < /dev/null &
    echo "[device] 4D evaluation started"
fi
while [ $(( $(date +%s) - t0 )) -lt "$BUDGET" ] && { running lane_upsampler || running "pipelines/evaluate_4d.py"; }; do
    sleep 10
done
for log in "$EV"/logs/*.log; do
    echo "[device] $(basename "$log" .log): $(grep -a -E '\[train|\[eval|\[pseudo4d\] done|error' "$log" | tail -1 | cut -c1-220)"
done
grep -a -h "^\[eval\]" "$EV/logs/eval.log" 2>/dev/null
(cd "$EV" && tar czf "$OUT/results.tgz" --exclude='*.pt' --exclude=frames \
    logs $(ls -d eval eval_upsampler upsampler/metrics.jsonl 2>/dev/null) 2>/dev/null)
[ -f "$EV/upsampler/checkpoint_final/model.pt" ] && cp "$EV/upsampler/checkpoint_final/model.pt" "$OUT/upsampler_model.pt"
for f in "$OUT"/*; do
    [ "$(stat -c %s "$f")" -gt 15728640 ] && split -b 15M "$f" "$f.part-" && rm "$f"
done
ls -la "$OUT"
{ running lane_upsampler || running "pipelines/evaluate_4d.py"; } && echo "[device] still running; call again" || echo "[device] all done"
exit 0
