#!/usr/bin/env bash
# Goodput under overload (issue 13): served vs refused requests per second when clients resend at
# once, against the same server without overload, in one run. wrk (Debian's package), 16-row V1
# requests to models/digits, default settings; connections 32 (capacity), then 1,500 (past the
# 1,024-request queue and its in-flight limit: the excess waits in line, service/admission.py) and
# 3,000 (past the line too: refusals). During each overload cell bench/refusal_probe.py times single
# requests on fresh connections by status (wrk's percentiles mix served and refused answers).
# Usage: bench/goodput.sh [extra `python -m service` flags]   (OVERLOAD="1500" for one cell;
# WORKLOAD=v2 for one-row V2 JSON requests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-18777}
SECONDS_PER_CELL=${SECONDS_PER_CELL:-8}
OVERLOAD=${OVERLOAD:-1500 3000}
BODY=$(mktemp --suffix=.json)
LOG=$(mktemp --suffix=.log)
RESULTS=$(mktemp)
trap 'rm -f "$BODY" "$RESULTS"*' EXIT
# WORKLOAD=v2: one-row Open Inference V2 JSON requests instead (a second workload, to confirm on)
WORKLOAD=${WORKLOAD:-v1}
"$PY" -c "import json, sys; from sklearn.datasets import load_digits; x = load_digits().data
json.dump({'instances': x[:16].tolist()} if sys.argv[2] == 'v1' else
          {'inputs': [{'name': 'input', 'shape': [1, 64], 'datatype': 'FP32', 'data': x[0].tolist()}]},
          open(sys.argv[1], 'w'))" "$BODY" "$WORKLOAD"
"$PY" -m service --host 127.0.0.1 --port "$PORT" --model-repository models --log-level warning --grpc-port 0 "$@" >"$LOG" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true; rm -f "$BODY" "$RESULTS"*' EXIT
for _ in $(seq 150); do curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break; sleep 0.2; done
URL="http://127.0.0.1:$PORT/v1/models/digits:predict"
[ "$WORKLOAD" = v2 ] && URL="http://127.0.0.1:$PORT/v2/models/digits/infer"
echo "uptime: $(uptime)"
for c in 32 $OVERLOAD; do
  PROBE=""
  if [ "$c" != 32 ]; then
    (sleep 2; "$PY" -m bench.refusal_probe "$URL" "$BODY" $((SECONDS_PER_CELL - 3)) >"$RESULTS.probe.$c") &
    PROBE=$!
  fi
  wrk -t2 -c"$c" -d"${SECONDS_PER_CELL}s" --timeout 10s -s bench/wrk_post.lua "$URL" -- "$BODY" 2>/dev/null |
    tail -1 >"$RESULTS.$c"
  [ -n "$PROBE" ] && wait "$PROBE"
done
"$PY" - "$RESULTS" $OVERLOAD <<'PYEOF'
import json, sys
base, overloads = sys.argv[1], sys.argv[2:]
def cell(c):
    d = json.loads(open(f"{base}.{c}").read()); s = d["duration_us"] / 1e6; refused = d["errors"]["status"]
    return (d["requests"] - refused) / s, refused / s, d["errors"]["timeout"], d["p99_us"] / 1000
capacity, _, t0, p99_0 = cell(32)
print(f"capacity (32 connections): {capacity:.0f} served req/s, timeouts {t0}, p99 {p99_0:.1f} ms")
for overload in overloads:
    served, refused, t1, p99_1 = cell(overload)
    probe = json.loads(open(f"{base}.probe.{overload}").read())
    print(f"overload ({overload} connections): {served:.0f} served req/s, {refused:.0f} refused req/s, "
          f"timeouts {t1}, p99 (all answers) {p99_1:.1f} ms; goodput {100 * served / capacity:.0f}% of capacity")
    print(f"  probe on fresh connections: {json.dumps(probe)}")
PYEOF
