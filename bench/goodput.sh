#!/usr/bin/env bash
# Goodput under overload (issue 13): served vs refused requests per second when clients resend at
# once, against the same server without overload, in one run. wrk (Debian's package), 16-row V1
# requests to models/digits, default settings; connections 32 (capacity), then 1,500 (past the
# 1,024-request queue and its in-flight limit: the excess waits in line, service/admission.py) and
# 3,000 (past the line too: refusals), then 32 again: capacity is the mean of the two 32-connection
# cells. During each overload cell bench/refusal_probe.py times single requests on fresh
# connections by status (wrk's percentiles mix served and refused answers). Each cell also records
# the server's CPU (cores it got, served requests per CPU-second), wrk's, and the whole box's.
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
TICK=$(getconf CLK_TCK)
# CPU seconds the server process has used (its ORT threads included): wrk and the probe share the
# two cores with it, so each cell also records how much of them the server got
server_cpu_s() { awk -v t="$TICK" '{printf "%.2f", ($14 + $15) / t}' "/proc/$PID/stat"; }
# capacity before and after the overload cells: this box's speed drifts by up to ±20 % between
# cells a minute apart (served per server CPU-second, with the server's share of the cores
# unchanged), so the overload cells are compared with the mean of the two around them
for c in 32 $OVERLOAD 32-after; do
  PROBE=""
  [ "$c" = 32-after ] && sleep 3  # the last overload cell's queue (1,024 requests, about a second) drains first
  if [ "${c%-after}" = "$c" ] && [ "$c" != 32 ]; then
    (sleep 2; "$PY" -m bench.refusal_probe "$URL" "$BODY" $((SECONDS_PER_CELL - 3)) >"$RESULTS.probe.$c") &
    PROBE=$!
  fi
  before=$(server_cpu_s)
  head -1 /proc/stat >"$RESULTS.box.$c"
  TIMEFORMAT='%U %S'
  { time wrk -t2 -c"${c%-after}" -d"${SECONDS_PER_CELL}s" --timeout 10s -s bench/wrk_post.lua "$URL" -- "$BODY" 2>/dev/null |
    tail -1 >"$RESULTS.$c"; } 2>"$RESULTS.wrkcpu.$c"
  echo "$before $(server_cpu_s)" >"$RESULTS.cpu.$c"
  head -1 /proc/stat >>"$RESULTS.box.$c"
  [ -n "$PROBE" ] && wait "$PROBE"
done
"$PY" - "$RESULTS" $OVERLOAD <<'PYEOF'
import json, sys
base, overloads = sys.argv[1], sys.argv[2:]
def cell(c):
    d = json.loads(open(f"{base}.{c}").read()); s = d["duration_us"] / 1e6; refused = d["errors"]["status"]
    return (d["requests"] - refused) / s, refused / s, d["errors"]["timeout"], d["p99_us"] / 1000
def cpu(c):
    """(cores the server used, cores wrk used, served requests per server CPU-second) over the cell"""
    d = json.loads(open(f"{base}.{c}").read()); s = d["duration_us"] / 1e6
    before, after = map(float, open(f"{base}.cpu.{c}").read().split())
    wrk = sum(map(float, open(f"{base}.wrkcpu.{c}").read().split()[-2:]))
    served = d["requests"] - d["errors"]["status"]
    return (after - before) / s, wrk / s, served / max(after - before, 1e-9)
def box(c):
    """the whole machine over the cell (/proc/stat), in cores: where the cycles the server did not get went"""
    d = json.loads(open(f"{base}.{c}").read()); s = d["duration_us"] / 1e6
    a, b = ([int(v) for v in line.split()[1:9]] for line in open(f"{base}.box.{c}"))
    user, nice, system, idle, iowait, irq, softirq, steal = (y - x for x, y in zip(a, b))
    tick = 100.0  # USER_HZ, as /proc/stat counts
    return {"user": (user + nice) / tick / s, "system": system / tick / s, "irq+softirq": (irq + softirq) / tick / s,
            "steal": steal / tick / s, "idle": (idle + iowait) / tick / s}
def cpu_line(c):
    server, wrk, per_cpu_s = cpu(c)
    machine = ", ".join(f"{k} {v:.2f}" for k, v in box(c).items())
    return (f"  CPU: server {server:.2f} cores, wrk {wrk:.2f} cores; {per_cpu_s:.0f} served per server CPU-second"
            f"\n  box (cores): {machine}")
before, _, t0, p99_0 = cell(32)
after, _, t2, p99_2 = cell("32-after")
capacity = (before + after) / 2
print(f"capacity (32 connections): {capacity:.0f} served req/s, the mean of {before:.0f} before the overload "
      f"cells and {after:.0f} after; timeouts {t0}, {t2}; p99 {p99_0:.1f}, {p99_2:.1f} ms")
print(cpu_line(32))
print(cpu_line("32-after"))
for overload in overloads:
    served, refused, t1, p99_1 = cell(overload)
    probe = json.loads(open(f"{base}.probe.{overload}").read())
    print(f"overload ({overload} connections): {served:.0f} served req/s, {refused:.0f} refused req/s, "
          f"timeouts {t1}, p99 (all answers) {p99_1:.1f} ms; goodput {100 * served / capacity:.0f}% of capacity")
    print(cpu_line(overload))
    print(f"  probe on fresh connections: {json.dumps(probe)}")
PYEOF
