#!/usr/bin/env bash
# Profile Legate under load: hello upstream and Legate (one route, access log off unless
# ACCESS_LOG is a path) pinned to core 1, wrk -t1 -c64 (or h2load -c64 -m10 with H2=1) on core 0,
# `perf record -g` on the Legate process for DURATION seconds, then a flamegraph SVG
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
perf record -F 999 -g -p "$PID" -o "$WORK/perf.data" -- sleep "$DURATION" 2>/dev/null
wait "$LOAD"
perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf > "$WORK/folded"
inferno-flamegraph --title "legate $* (H2=$H2)" < "$WORK/folded" > "$OUT"
echo "flamegraph: $OUT" >&2
perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9.]+%' | head -30
