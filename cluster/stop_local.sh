#!/usr/bin/env bash
# Stop the head started by start_local.sh (and every Ray process of this user on this machine).
set -euo pipefail
RAY_LOCAL_DIR=${RAY_LOCAL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fourreal-video/ray}
RAY_BIN=${RAY_BIN:-$(command -v ray || true)}
[ -n "$RAY_BIN" ] || { echo "error: 'ray' not found; run 'source .venv/bin/activate' first" >&2; exit 2; }
"$RAY_BIN" stop --force >/dev/null 2>&1 || true
rm -f "$RAY_LOCAL_DIR/env.sh"
echo "Ray head stopped"
