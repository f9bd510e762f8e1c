#!/usr/bin/env bash
# Profile Legate under load: hello upstream and Legate (one route, access log off unless
# ACCESS_LOG is a path) pinned to core 1, wrk -t1 -c64 (or h2load -c64 -m10 with H2=1) on core 0,
# `perf record --call-graph dwarf` (frame pointers are absent in glibc and the release build) on the Legate process for DURATION seconds, then a flamegraph SVG
# (inferno: `cargo install inferno`) and the top self-time symbols.
#
# Usage: OUT=bench/proxy/flame-h1.svg bench/proxy/profile.sh [extra legate run args...]
#        (LEGATE defaults to run.sh's release build; DURATION=10)
# Needs: perf, wrk (h2load for H2=1), inferno-collapse-perf and inferno-flamegraph.
set -euo pipefail

DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
H2=${H2:-0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LEGATE=${LEGATE:-$ROOT/target/bench-legate/release/legate}
HELLO=${HELLO:-$ROOT/target/bench-hello/release/bench-hello}
OUT=${OUT:-$ROOT/bench/proxy/flame.svg}
WORK=$(mktemp -d /tmp/legate-profile.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

for tool in perf wrk inferno-collapse-perf inferno-flamegraph; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

mkdir -p "$WORK/one"
cat > "$WORK/one/m.yaml" <<EOF
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: hello}
spec: {hostname: "*", prefix: /, service: 127.0.0.1:28081, rewrite: ""}
EOF
taskset -c 1 "$HELLO" 127.0.0.1:28081 & PIDS+=($!)
LEGATE_LOG=warn taskset -c 1 "$LEGATE" run --dir "$WORK/one" --http-listen 127.0.0.1:28084 \
    --https-listen off --admin-listen off --workers 1 --max-connections 8000 \
    --idle-timeout-ms 600000 --access-log "${ACCESS_LOG:-off}" "$@" & PIDS+=($!); PID=$!
wait_port 28081; wait_port 28084

load() { # seconds
    if [ "$H2" = 1 ]; then
        taskset -c 0 h2load -c"$CONNS" -m10 -D"$1" http://127.0.0.1:28084/ >/dev/null 2>&1
    else
        taskset -c 0 wrk -t1 -c"$CONNS" -d"${1}s" http://127.0.0.1:28084/ >/dev/null
    fi
}
load 3
load $((DURATION + 2)) & LOAD=$!
sleep 1
perf record -F 999 --call-graph dwarf,32768 -p "$PID" -o "$WORK/perf.data" -- sleep "$DURATION" 2>/dev/null
wait "$LOAD"
perf script -i "$WORK/perf.data" 2>/dev/null | "$ROOT/bench/proxy/symbolize.py" "$LEGATE" \
    | inferno-collapse-perf --all > "$WORK/folded"
inferno-flamegraph --title "legate $* (H2=$H2)" < "$WORK/folded" > "$OUT"
echo "folded stacks: $WORK/folded" >&2
echo "flamegraph: $OUT" >&2
# Self time by function (the leaf of each stack), then inclusive time of a few known costs.
python3 - "$WORK/folded" <<'PY'
import collections, sys
self_t, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, n = line.rsplit(" ", 1)
    n = int(n)
    total += n
    frames = stack.split(";")
    self_t[frames[-1]] += n
print("share of the process's CPU samples; self time:")
for f, n in self_t.most_common(25):
    print(f"  {100 * n / total:5.1f}%  {f[:110]}")
print("inclusive:")
keys = ["malloc", "free", "memmove", "memcpy", "clock_gettime", "writev", "sendto", "recvfrom",
        "epoll_wait", "HeaderMap", "accesslog", "Metrics", "route_request", "schedule_[k]", "Sleep",
        "TimerEntry", "mpsc", "h2::", "rustls"]
stacks = [line.rsplit(" ", 1) for line in open(sys.argv[1])]
for k in keys:
    # Each stack counted once per key, however many of its frames match.
    n = sum(int(c) for stack, c in stacks if k in stack)
    print(f"  {100 * n / total:5.1f}%  {k}")
PY
