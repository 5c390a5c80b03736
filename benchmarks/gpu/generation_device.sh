#!/usr/bin/env bash
# Issue 15 item 2 on a lent GPU, in one call (no wheels: torch, numpy, einops, pyyaml and pillow are in the
# machine's image): the end-to-end 8x8 at 288x512 timing of the paper-size models for the shipped fast path
# and the old defaults, side by side, then what the fast path costs in quality on the proof model's held-out
# grids (fast against a many-step reference, same noise).
#
#   run(command="benchmarks/gpu/generation_device.sh", carry=["outputs/proof/data/render_heldout",
#       "outputs/proof/data/pseudo4d_heldout"])      # docs/results moved aside for the 64 MiB tree
set -uo pipefail
OUT=${OUT:-/tmp/generation_device}
D=${DATA:-outputs/proof/data}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# timing: ratios in one call (the fast path first, then the old defaults, then the fast path again)
for m in "--steps-4d 20 --steps-up 2 --method euler" "--steps-4d 20 --steps-up 10 --method heun" \
         "--steps-4d 20 --steps-up 1 --method euler" "--steps-4d 20 --steps-up 2 --method euler"; do
    python3 benchmarks/bench_model.py generate --compile 1 $m --json --iters 3 --warmup 1 >> "$OUT/generate_timing.jsonl" \
        2>> "$OUT/generate_timing.log" || echo "[device] bench_model failed: $m"
done
tail -4 "$OUT/generate_timing.jsonl" | cut -c1-400
for set in render_heldout pseudo4d_heldout; do
    python3 benchmarks/bench_generation_quality.py --grids "$D/$set" --max-grids 12 --fast euler:20:2 \
        --reference heun:50:20 --compile 0 --json "$OUT/quality_$set.json" 2>&1 | grep -a "^\[quality\]\|Error"
done
ls -la "$OUT"
