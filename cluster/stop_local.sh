#!/usr/bin/env bash
# Stop the head started by start_local.sh: its process group only, so other Ray
# instances of this user (a notebook's ray.init(), a test session) keep running.
set -euo pipefail
RAY_LOCAL_DIR=${RAY_LOCAL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fourreal-video/ray}
pgid_file="$RAY_LOCAL_DIR/pgid"
if [ ! -s "$pgid_file" ]; then
  echo "no head started by cluster/start_local.sh under $RAY_LOCAL_DIR; nothing to stop (use 'ray stop' for others)"
  exit 0
fi
pgid=$(cat "$pgid_file")
# What this head wrote: `ray start` records its GCS address in <temp dir>/ray_current_cluster, and a later
# plain ray.init() anywhere on the machine tries to join that address, hanging once the head is gone.
gcs_address="" temp_dir=""
if [ -s "$RAY_LOCAL_DIR/env.sh" ]; then
  gcs_address=$(sed -n 's/^export RAY_GCS_ADDRESS=//p' "$RAY_LOCAL_DIR/env.sh")
  temp_dir=$(sed -n 's/^export RAY_TEMP_DIR=//p' "$RAY_LOCAL_DIR/env.sh")
fi
kill -TERM -- "-$pgid" 2>/dev/null || true
for _ in $(seq 1 20); do
  pgrep -g "$pgid" >/dev/null || break
  sleep 0.5
done
kill -KILL -- "-$pgid" 2>/dev/null || true
# Remove the address file only if it still names this head (another `ray start` may have replaced it).
for f in ${temp_dir:+"$temp_dir/ray_current_cluster"} /tmp/ray/ray_current_cluster; do
  [ -n "$gcs_address" ] && [ -f "$f" ] && [ "$(cat "$f")" = "$gcs_address" ] && rm -f "$f"
done
rm -f "$pgid_file" "$RAY_LOCAL_DIR/env.sh"
echo "Ray head stopped"
