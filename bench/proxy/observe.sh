#!/usr/bin/env bash
# Side-by-side cost of observability: the same Legate binary with metrics and the access log off
# (`off`), metrics only (`metrics`), and metrics plus the access log to a file (`metrics+log`),
# and optionally another binary (BASE=/path/to/legate, e.g. an older build).
# Same method as run.sh: hello upstream and every gateway pinned to core 1 with one worker,
# wrk -t1 -c64 pinned to core 0, interleaved rounds, CPU = utime+stime per request (the access
# log's writer thread included).
#
# Usage: LEGATE=target/release/legate [BASE=/path/to/old/legate] bench/proxy/observe.sh
# Ports 1808x, so it can run beside run.sh. Needs wrk and bench/proxy/hello built (run.sh).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LEGATE=${LEGATE:-$ROOT/target/release/legate}
HELLO=${HELLO:-$ROOT/target/bench-hello/release/bench-hello}
BASE=${BASE:-}
WORK=$(mktemp -d /tmp/legate-obs-bench.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

mkdir -p "$WORK/one"
cat > "$WORK/one/m.yaml" <<EOT
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: hello}
spec: {hostname: "*", prefix: /, service: 127.0.0.1:18081, rewrite: ""}
EOT

taskset -c 1 "$HELLO" 127.0.0.1:18081 & PIDS+=($!)
wait_port 18081
run() { # binary port args...
    local bin=$1 port=$2; shift 2
    LEGATE_LOG=warn taskset -c 1 "$bin" run --dir "$WORK/one" --http-listen "127.0.0.1:$port" \
        --https-listen off --admin-listen off --worker-threads 1 \
        --max-connections 100000 --idle-timeout-ms 600000 "$@" &
}
run "$LEGATE" 18083 --access-log off --metrics off; PIDS+=($!); NONE_PID=$!
run "$LEGATE" 18084 --access-log off; PIDS+=($!); OFF_PID=$!
run "$LEGATE" 18085 --access-log "$WORK/access.log"; PIDS+=($!); ON_PID=$!
wait_port 18083; wait_port 18084; wait_port 18085
if [ -n "$BASE" ]; then
    run "$BASE" 18086 --access-log off; PIDS+=($!); BASE_PID=$!  # compare with `metrics`
    wait_port 18086
fi

measure() { # name port pid
    wrk_measure "$2" "$3"
    echo "$1 $WRK_RPS $WRK_CPU" | tee -a "$WORK/results" >&2
}
: > "$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
    [ -n "$BASE" ] && measure baseline 18086 "$BASE_PID"
    measure off 18083 "$NONE_PID"
    measure metrics 18084 "$OFF_PID"
    measure metrics+log 18085 "$ON_PID"
done
python3 - "$WORK/results" <<'EOT'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    n, rps, cpu = line.split()
    rows.setdefault(n, []).append((float(rps), float(cpu)))
med = {n: [statistics.median(x) for x in zip(*v)] for n, v in rows.items()}
low = {n: [min(x) for x in zip(*v)] for n, v in rows.items()}
off = med["off"]
print(f"{'':<12}{'req/s':>10}{'x off':>7}{'CPU us/req':>12}{'x off':>7}{'min CPU':>9}")
for n, (r, c) in med.items():
    print(f"{n:<12}{r:>10.0f}{r / off[0]:>7.3f}{c:>12.1f}{c / off[1]:>7.3f}{low[n][1]:>9.1f}")
print(f"(medians of {len(rows['off'])} rounds; min CPU: the lowest round)")
EOT
echo "access log lines written: $(wc -l < "$WORK/access.log")" >&2
