#!/usr/bin/env bash
# Score the shipped proof weights (weights/proof) on a lent GPU machine, without wheels: evaluate_4d.py and
# generate_4d.py need only torch, numpy, einops, pyyaml and pillow, which the machine's image has. The held-out
# sets travel as carried folders (made by the recipe's own jobs: `python -m training.recipes.proof --steps
# renders,pseudo4d` with the held-out seeds), so the call fits in the 64 MiB tree:
#
#   run(command="benchmarks/gpu/eval_shipped_device.sh", carry=["outputs/proof/data/render_heldout",
#       "outputs/proof/data/pseudo4d_heldout"])
#
# Writes $OUT/eval.tgz (report.md, results.json with per-grid rows, contact sheets) and $OUT/generated_x4.tgz.
set -uo pipefail
W=${WEIGHTS:-weights/proof}
D=${DATA:-outputs/proof/data}
SAMPLER=${SAMPLER:-"--method euler --steps 20"}
OUT=${OUT:-/tmp/eval_shipped}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-6}
# evaluation is CPU-bound in its metrics and generation is GPU-bound: side by side they share the machine well
python3 pipelines/evaluate_4d.py --grids "render=$D/render_heldout,pseudo4d=$D/pseudo4d_heldout" \
    --checkpoints "soft=$W/soft.pt.gz,hard=$W/hard.pt.gz,sequential=$W/sequential.pt.gz,soft_pseudo_only=$W/soft_pseudo_only.pt.gz" \
    --max-grids 16 $SAMPLER --batch 16 --compile false --out "$WORK/eval" --mlflow-uri none > "$WORK/eval.log" 2>&1 &
ev=$!
python3 pipelines/generate_4d.py --checkpoint "$W/soft.pt.gz" --upsampler "$W/upsampler.pt.gz" \
    --from-grid "$D/render_heldout" $SAMPLER --out "$WORK/generated_x4" > "$WORK/generate.log" 2>&1
echo "[device] generate_4d exit $?: $(tail -2 "$WORK/generate.log" | tr '\n' ' ' | cut -c1-300)"
wait $ev
echo "[device] evaluate_4d exit $?"
grep -a "^\[eval\]" "$WORK/eval.log" | tail -40
cp "$WORK"/*.log "$OUT/"
(cd "$WORK" && tar czf "$OUT/eval.tgz" eval && tar czf "$OUT/generated_x4.tgz" --exclude='*.npy' generated_x4)
ls -la "$OUT"
