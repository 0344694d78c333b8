#!/usr/bin/env bash
# One client, batching on vs off (issue 13: "batching on >= batching off in rows/s and p50"): two
# servers on models/ side by side — max batch 64 (on) and 1 (off), default settings otherwise —
# and wrk -t1 -c1 sending one-row V2 JSON requests to digits, alternated on/off then off/on each
# round (so neither always goes first), after a 1 s warm-up per cell. Prints each cell and the
# medians. Usage: bench/one_client.sh   (ROUNDS=3 pairs per order, SECONDS_PER_CELL=8; another
# model: REPO=bench/build/models MODEL=mnist1d_wide sends one all-zero row of its input shape)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ON_PORT=${ON_PORT:-18801}
OFF_PORT=${OFF_PORT:-18802}
ROUNDS=${ROUNDS:-3}
REPO=${REPO:-models}
MODEL=${MODEL:-digits}
SECONDS_PER_CELL=${SECONDS_PER_CELL:-8}
BODY=$(mktemp --suffix=.json)
CELLS=$(mktemp)
trap 'rm -f "$BODY" "$CELLS"' EXIT
if [ "$MODEL" = digits ]; then
  "$PY" -c "import json, sys; from sklearn.datasets import load_digits; row = load_digits().data[:1]; json.dump({'inputs': [{'name': 'input', 'shape': [1, 64], 'datatype': 'FP32', 'data': row.reshape(-1).tolist()}]}, open(sys.argv[1], 'w'))" "$BODY"
else
  "$PY" -c "import json, sys, glob; m = json.load(open(sorted(glob.glob(sys.argv[2] + '/*/manifest.json'))[-1])); d = m['input']['shape'][1:]; n = 1
for k in d: n *= k
json.dump({'inputs': [{'name': m['input']['name'], 'shape': [1, *d], 'datatype': 'FP32', 'data': [0.0] * n}]}, open(sys.argv[1], 'w'))" "$BODY" "$REPO/$MODEL"
fi
start() {  # port, max batch size
  "$PY" -m service --host 127.0.0.1 --port "$1" --grpc-port 0 --model-repository "$REPO" \
    --log-level warning --max-batch-size "$2" >/dev/null 2>&1 &
  echo $!
}
ON=$(start "$ON_PORT" 64)
OFF=$(start "$OFF_PORT" 1)
trap 'kill -TERM $ON $OFF 2>/dev/null || true; rm -f "$BODY" "$CELLS"' EXIT
for port in "$ON_PORT" "$OFF_PORT"; do
  for _ in $(seq 150); do curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break; sleep 0.2; done
done
cell() {  # port, label
  local url="http://127.0.0.1:$1/v2/models/$MODEL/infer"
  wrk -t1 -c1 -d1s -s bench/wrk_post.lua "$url" -- "$BODY" >/dev/null
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  wrk -t1 -c1 -d"${SECONDS_PER_CELL}s" --latency -s bench/wrk_post.lua "$url" -- "$BODY" | grep '^{"requests"' |
    "$PY" -c "import json, sys; d = json.load(sys.stdin); print('$2', d['requests'] / d['duration_us'] * 1e6, d['p50_us'] / 1000, $load)" >>"$CELLS"
  tail -1 "$CELLS"
}
echo "uptime: $(uptime)"
for _ in $(seq "$ROUNDS"); do cell "$ON_PORT" on; cell "$OFF_PORT" off; done
for _ in $(seq "$ROUNDS"); do cell "$OFF_PORT" off; cell "$ON_PORT" on; done
"$PY" - "$CELLS" <<'PYEOF'
import statistics, sys
cells = [line.split() for line in open(sys.argv[1])]
for label in ("on", "off"):
    rows = [float(c[1]) for c in cells if c[0] == label]
    p50 = [float(c[2]) for c in cells if c[0] == label]
    print(f"batching {label}: median {statistics.median(rows):.0f} rows/s, p50 {statistics.median(p50):.3f} ms "
          f"({len(rows)} cells, {min(rows):.0f}-{max(rows):.0f} rows/s)")
pairs = list(zip([c for c in cells if c[0] == "on"], [c for c in cells if c[0] == "off"]))
print(f"pairs where on >= off: rows/s {sum(float(a[1]) >= float(b[1]) for a, b in pairs)}/{len(pairs)}, "
      f"p50 {sum(float(a[2]) <= float(b[2]) for a, b in pairs)}/{len(pairs)}")
PYEOF
