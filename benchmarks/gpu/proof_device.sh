#!/usr/bin/env bash
# The proof recipe (training/recipes/proof.py) on a lent GPU machine, in time slices.
#
# A lent machine runs one command for at most 10 minutes and stays warm 30 s after it, so the recipe runs
# in the background (its own process session, which outlives the command) and every call of this script
# (1) installs the carried wheels once, (2) copies carried data into the run folder, (3) starts the recipe
# unless it is running or finished, (4) follows its status lines for up to BUDGET seconds and (5) leaves
# what is finished in $OUT. Calling it again continues; on a fresh machine the recipe's steps resume from
# whatever was carried back in (finished steps are skipped, training jobs resume from checkpoints).
#
#   benchmarks/gpu/proof_device.sh 540                 # on the GPU machine, from the repo root
#   benchmarks/gpu/proof_device.sh 540 --steps base     # extra arguments go to the recipe
set -uo pipefail
BUDGET=${1:-540}
shift || true
RUN=${PROOF_RUN:-/tmp/proof}
OUT=${OUT:-$RUN/out}
mkdir -p "$RUN/data" "$OUT"
t0=$(date +%s)

source benchmarks/gpu/wheels.sh
# Carried inputs (renders made where Blender is; checkpoints brought back from an earlier machine).
for d in outputs/proof/data/*; do [ -e "$d" ] && [ ! -e "$RUN/data/$(basename "$d")" ] && cp -r "$d" "$RUN/data/"; done
for d in outputs/proof/carry/*; do [ -e "$d" ] && [ ! -e "$RUN/$(basename "$d")" ] && cp -r "$d" "$RUN/"; done

# The recipe skips finished steps, so starting it again when it is not running is always safe.
if ! pgrep -f "training.recipes.proof --out $RUN( |$)" >/dev/null; then
    seen=$(wc -l < "$RUN/driver.log" 2>/dev/null || echo 0)
    setsid nohup python3 -m training.recipes.proof --out "$RUN" "$@" >> "$RUN/driver.log" 2>&1 < /dev/null &
    echo "[device] recipe started: steps ${*:-all}"
    sleep 2
fi
seen=${seen:-0}
while [ $(( $(date +%s) - t0 )) -lt "$BUDGET" ] && pgrep -f "training.recipes.proof --out $RUN( |$)" >/dev/null; do
    sleep 5
    n=$(wc -l < "$RUN/driver.log" 2>/dev/null || echo 0)
    [ "$n" -gt "$seen" ] && sed -n "$((seen + 1)),${n}p" "$RUN/driver.log" && seen=$n
done
[ -f "$RUN/driver.log" ] && sed -n "$((seen + 1)),\$p" "$RUN/driver.log"
# Status of every training run: its last status line.
for log in "$RUN"/logs/*.log; do
    [ -e "$log" ] && echo "[device] $(basename "$log" .log): $(grep -a -E '\[train|\[eval|\[pseudo4d\] done|error' "$log" | tail -1 | cut -c1-220)"
done
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
# What comes back (8 files of 16 MiB at most): first the small things that matter most (metrics for the loss
# curves, summaries, evaluation reports, logs' last lines), then pictures, then weights once exported; an
# archive over 15 MiB is split so no part is refused.
(cd "$RUN" && find . -path ./data -prune -o \( -name metrics.jsonl -o -name summary.json -o -name config.yaml \
    -o -name proof_config.yaml -o -name driver.log -o -name results.json -o -name report.md \) -print \
    | tar czf "$OUT/metrics.tgz" -T - 2>/dev/null)
mkdir -p "$RUN/log_tails" && for log in "$RUN"/logs/*.log; do [ -e "$log" ] && tail -c 200000 "$log" > "$RUN/log_tails/$(basename "$log")"; done
(cd "$RUN" && tar czf "$OUT/pictures.tgz" --exclude='*.pt' --exclude='frames' \
    log_tails $(ls -d eval eval_upsampler generated_x4 2>/dev/null) 2>/dev/null)
[ -d "$RUN/weights" ] && (cd "$RUN" && tar cf "$OUT/weights.tar" weights)
for f in "$OUT"/pictures.tgz "$OUT"/weights.tar; do
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 15728640 ] && split -b 15M "$f" "$f.part-" && rm "$f"
done
ls -la "$OUT"
pgrep -f "training.recipes.proof --out $RUN( |$)" >/dev/null && echo "[device] recipe still running; call again" \
    || echo "[device] recipe not running: $(tail -1 "$RUN/driver.log" 2>/dev/null)"
exit 0
