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
kill -TERM -- "-$pgid" 2>/dev/null || true
for _ in $(seq 1 20); do
  pgrep -g "$pgid" >/dev/null || break
  sleep 0.5
done
kill -KILL -- "-$pgid" 2>/dev/null || true
rm -f "$pgid_file" "$RAY_LOCAL_DIR/env.sh"
echo "Ray head stopped"
