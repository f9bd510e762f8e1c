#!/usr/bin/env bash
# Side-by-side cost of observability: the same Legate binary with the access log on (to a file)
# and off, and optionally a baseline binary built without metrics (BASE=/path/to/legate).
# Same method as run.sh: hello upstream and every gateway pinned to core 1 with one worker,
# wrk -t1 -c64 pinned to core 0, interleaved rounds, CPU = utime+stime per request.
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
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p "$WORK/one"
cat > "$WORK/one/m.yaml" <<EOT
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: hello}
spec: {hostname: "*", prefix: /, service: 127.0.0.1:18081, rewrite: ""}
EOT

wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 did not open" >&2; exit 1
}
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

taskset -c 1 "$HELLO" 127.0.0.1:18081 & PIDS+=($!)
wait_port 18081
run() { # binary port args...
    local bin=$1 port=$2; shift 2
    LEGATE_LOG=warn taskset -c 1 "$bin" run --dir "$WORK/one" --http-listen "127.0.0.1:$port" \
        --https-listen off --admin-listen off --worker-threads 1 \
        --max-connections 100000 --idle-timeout-ms 600000 "$@" &
}
run "$LEGATE" 18084 --access-log off; PIDS+=($!); OFF_PID=$!
run "$LEGATE" 18085 --access-log "$WORK/access.log"; PIDS+=($!); ON_PID=$!
wait_port 18084; wait_port 18085
if [ -n "$BASE" ]; then
    run "$BASE" 18086; PIDS+=($!); BASE_PID=$!
    wait_port 18086
fi

measure() { # name port pid
    local out t0 t1 reqs rps
    taskset -c 0 wrk -t1 -c"$CONNS" -d"${WARMUP}s" "http://127.0.0.1:$2/" >/dev/null
    t0=$(ticks "$3")
    out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" "http://127.0.0.1:$2/")
    t1=$(ticks "$3")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    echo "$1 $rps $(awk -v a="$t0" -v b="$t1" -v r="$reqs" -v hz="$HZ" \
        'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / r }')" | tee -a "$WORK/results" >&2
}
: > "$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
    [ -n "$BASE" ] && measure baseline 18086 "$BASE_PID"
    measure metrics 18084 "$OFF_PID"
    measure metrics+log 18085 "$ON_PID"
done
python3 - "$WORK/results" <<'EOT'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    n, rps, cpu = line.split()
    rows.setdefault(n, []).append((float(rps), float(cpu)))
for n, v in rows.items():
    r, c = (statistics.median(x) for x in zip(*v))
    print(f"{n:<12}{r:>10.0f} req/s{c:>8.1f} CPU us/req")
print(f"(medians of {len(next(iter(rows.values())))} rounds)")
EOT
echo "access log lines written: $(wc -l < "$WORK/access.log")" >&2
