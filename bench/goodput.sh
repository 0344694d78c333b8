#!/usr/bin/env bash
# Goodput under overload (issue 13): served vs refused requests per second when clients resend at
# once, against the same server without overload, in one run. wrk (Debian's package), 16-row V1
# requests to models/digits, default settings; connections 32 (capacity) then 1,500 (past the
# 1,024-request queue). Usage: bench/goodput.sh [extra `python -m service` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-18777}
SECONDS_PER_CELL=${SECONDS_PER_CELL:-8}
BODY=$(mktemp --suffix=.json)
LOG=$(mktemp --suffix=.log)
trap 'rm -f "$BODY"' EXIT
"$PY" -c "import json, sys; from sklearn.datasets import load_digits; json.dump({'instances': load_digits().data[:16].tolist()}, open(sys.argv[1], 'w'))" "$BODY"
"$PY" -m service --host 127.0.0.1 --port "$PORT" --model-repository models --log-level warning "$@" >"$LOG" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; rm -f "$BODY"' EXIT
for _ in $(seq 150); do curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break; sleep 0.2; done
for c in 32 1500; do
  wrk -t2 -c"$c" -d"${SECONDS_PER_CELL}s" --timeout 10s -s bench/wrk_post.lua \
    "http://127.0.0.1:$PORT/v1/models/digits:predict" -- "$BODY" 2>/dev/null | tail -1 |
    "$PY" -c "
import json, sys
d = json.loads(sys.stdin.read()); s = d['duration_us'] / 1e6; refused = d['errors']['status']
print(f'connections $c: served {(d[\"requests\"] - refused) / s:.0f} req/s, refused {refused / s:.0f} req/s, '
      f'timeouts {d[\"errors\"][\"timeout\"]}, p99 (all answers) {d[\"p99_us\"] / 1000:.1f} ms')"
done
