#!/usr/bin/env bash
# Start a one-machine Ray head on loopback with the dashboard, so that
#   ray job submit --working-dir . -- python training/train_4d.py
# works right after `source "$RAY_LOCAL_DIR/env.sh"` (the script prints the line).
#
# Ray 2.60 enables token authentication by default. We keep it on and give this
# head its own token file; env.sh exports RAY_AUTH_MODE=token and
# RAY_AUTH_TOKEN_PATH so the CLI, `ray job submit` and drivers all present it.
# Settings (environment): RAY_LOCAL_DIR, RAY_PORT, RAY_DASHBOARD_PORT, RAY_NUM_CPUS, RAY_TEMP_DIR.
set -euo pipefail
RAY_LOCAL_DIR=${RAY_LOCAL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fourreal-video/ray}
RAY_PORT=${RAY_PORT:-6380}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/ray}
RAY_BIN=${RAY_BIN:-$(command -v ray || true)}
[ -n "$RAY_BIN" ] || { echo "error: 'ray' not found; run 'make install' and 'source .venv/bin/activate' first" >&2; exit 2; }
mkdir -p "$RAY_LOCAL_DIR"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$RAY_LOCAL_DIR/auth_token}
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077; python3 -c "import secrets; print(secrets.token_hex(32), end='')" > "$RAY_AUTH_TOKEN_PATH")
fi
if curl -sf -o /dev/null "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" 2>/dev/null; then
  echo "error: something already answers on 127.0.0.1:$RAY_DASHBOARD_PORT; run cluster/stop_local.sh or set RAY_DASHBOARD_PORT" >&2
  exit 2
fi
args=(--head --node-ip-address=127.0.0.1 --port="$RAY_PORT" --dashboard-host=127.0.0.1
      --dashboard-port="$RAY_DASHBOARD_PORT" --include-dashboard=true --temp-dir="$RAY_TEMP_DIR" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
# A new session makes every head process (and the workers it forks later) one process
# group, so stop_local.sh stops exactly this head and not other Ray instances.
setsid bash -c 'echo $$ > "$0"; exec "$@"' "$RAY_LOCAL_DIR/pgid" "$RAY_BIN" start "${args[@]}" \
  >"$RAY_LOCAL_DIR/start.log" 2>&1 || { cat "$RAY_LOCAL_DIR/start.log" >&2; exit 1; }
# The GCS address as Ray recorded it (it may name the machine's IP rather than loopback).
gcs_address=$(cat "$RAY_TEMP_DIR/ray_current_cluster" 2>/dev/null || echo "127.0.0.1:$RAY_PORT")
cat > "$RAY_LOCAL_DIR/env.sh" <<ENV
export RAY_ADDRESS=http://127.0.0.1:$RAY_DASHBOARD_PORT
export RAY_GCS_ADDRESS=$gcs_address
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH
export RAY_TEMP_DIR=$RAY_TEMP_DIR
ENV
# The dashboard answers a moment after `ray start` returns, and its job agent later still
# (seconds on a busy machine): prove the whole submit path with a no-op job before returning.
for _ in $(seq 1 60); do
  curl -sf -o /dev/null "http://127.0.0.1:$RAY_DASHBOARD_PORT/api/version" && break
  sleep 1
done
RAY_ADDRESS="http://127.0.0.1:$RAY_DASHBOARD_PORT" "$(dirname "$RAY_BIN")/python" - <<'PY' || { echo "error: the Ray head started but does not accept jobs; see $RAY_LOCAL_DIR/start.log" >&2; exit 1; }
import os, time
from ray.job_submission import JobStatus, JobSubmissionClient
client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
deadline = time.time() + 300
while True:
    try:
        job = client.submit_job(entrypoint="true", submission_id=f"fourreal-ready-{os.getpid()}")
        break
    except RuntimeError as exc:  # "No available agent to submit job" while the agent starts
        if time.time() > deadline:
            raise SystemExit(f"job agent not ready after 300 s: {exc}")
        time.sleep(1)
while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    time.sleep(0.5)
client.delete_job(job)
PY
echo "Ray head on 127.0.0.1:$RAY_PORT, dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT"
echo "submit jobs after:  source $RAY_LOCAL_DIR/env.sh"
