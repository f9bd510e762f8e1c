#!/usr/bin/env bash
# Side-by-side proxy benchmark: direct upstream, nginx, HAProxy, Legate (1 route and 10,000
# routes), following /work/shared/perf-baseline/README.md:
#   - upstream: bench/proxy/hello (minimal hyper 1.x, `200 Hello, World!`) on 127.0.0.1:8081
#   - every server pinned to core 1 with one worker; wrk pinned to core 0
#   - load: wrk -t1 -c64 -d${DURATION}s --latency; a warm-up per target, interleaved rounds
#   - CPU per request: server utime+stime ticks from /proc/PID/stat, before/after, / requests
# Optional HTTP/2 (h2c prior knowledge) with h2load when installed: H2=1.
# Optional OTLP=1: `legate-otlp`, the 1-route Legate exporting every request's spans (sample
# ratio 1) to the hello upstream standing in for a collector (it answers 200 to each export).
#
# Usage: bench/proxy/run.sh            (ROUNDS=3 DURATION=10 WARMUP=3 by default; SKIP_BUILD=1
#        reuses the binaries from the last build)
# Needs: wrk, nginx, haproxy (apt-get install wrk nginx-light haproxy), h2load for H2=1.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
H2=${H2:-0}
OTLP=${OTLP:-0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/legate-bench.XXXXXX)
BASE=/work/shared/perf-baseline
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

for tool in wrk nginx haproxy taskset; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

echo "# building (release)" >&2
# Own target directories: a shared target/release can be rewritten by other builds mid-run.
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release --bin legate -q --target-dir "$ROOT/target/bench-legate")
    (cd "$ROOT/bench/proxy/hello" && cargo build --release -q --target-dir "$ROOT/target/bench-hello")
fi
LEGATE="$ROOT/target/bench-legate/release/legate"
HELLO="$ROOT/target/bench-hello/release/bench-hello"

# Configs: one catch-all route; and 9,999 more specific prefixes in front of it.
mkdir -p "$WORK/one" "$WORK/many"
cat > "$WORK/one/m.yaml" <<EOF
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: hello}
spec: {hostname: "*", prefix: /, service: 127.0.0.1:8081, rewrite: ""}
EOF
cp "$WORK/one/m.yaml" "$WORK/many/m.yaml"
python3 - "$WORK/many" <<'EOF'
import sys
for i in range(9999):
    # 1,000 routes per file: config files are capped at 1 MiB each by default.
    with open(f"{sys.argv[1]}/routes-{i // 1000}.yaml", "a") as f:
        f.write(f"---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata: {{name: r{i}}}\n"
                f"spec: {{hostname: \"*\", prefix: /api/r{i}/, service: 127.0.0.1:8081}}\n")
EOF

taskset -c 1 "$HELLO" 127.0.0.1:8081 & PIDS+=($!); HELLO_PID=$!
wait_port 8081

mkdir -p /tmp/peer-nginx/logs /tmp/peer-nginx/tmp
taskset -c 1 nginx -p /tmp/peer-nginx -c "$BASE/nginx.conf" & PIDS+=($!); NGINX_PID=$!
wait_port 8082
taskset -c 1 haproxy -db -f "$BASE/haproxy.cfg" & PIDS+=($!); HAPROXY_PID=$!
wait_port 8083

# Access log off, as perf-baseline/nginx.conf has it (bench/proxy/observe.sh measures its cost).
legate_run() { # dir port [flags]
    LEGATE_LOG=warn taskset -c 1 "$LEGATE" run --dir "$1" --http-listen "127.0.0.1:$2" \
        --https-listen off --admin-listen off --worker-threads 1 \
        --max-connections 100000 --idle-timeout-ms 600000 --access-log off "${@:3}" &
}
legate_run "$WORK/one" 8084; PIDS+=($!); LEGATE1_PID=$!
legate_run "$WORK/many" 8085; PIDS+=($!); LEGATE10K_PID=$!
wait_port 8084
wait_port 8085
if [ "$OTLP" = 1 ]; then
    legate_run "$WORK/one" 8088 --otlp-endpoint http://127.0.0.1:8081 --otlp-sample-ratio 1
    PIDS+=($!); LEGATEOTLP_PID=$!; wait_port 8088
fi

if [ "$H2" = 1 ]; then
    cat > "$WORK/nginx-h2.conf" <<EOF
daemon off; master_process on; worker_processes 1; pid $WORK/nginx-h2.pid;
error_log $WORK/nginx-h2.err warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK/cb; proxy_temp_path $WORK/pt;
  fastcgi_temp_path $WORK/ft; uwsgi_temp_path $WORK/ut; scgi_temp_path $WORK/st;
  keepalive_requests 1000000;
  upstream hello { server 127.0.0.1:8081; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:8086 http2;
    location / { proxy_pass http://hello; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-For \$remote_addr; } } }
EOF
    taskset -c 1 nginx -p "$WORK" -c "$WORK/nginx-h2.conf" & PIDS+=($!); NGINXH2_PID=$!
    sed -e 's/bind 127.0.0.1:8083/bind 127.0.0.1:8087 proto h2/' "$BASE/haproxy.cfg" > "$WORK/haproxy-h2.cfg"
    taskset -c 1 haproxy -db -f "$WORK/haproxy-h2.cfg" & PIDS+=($!); HAPROXYH2_PID=$!
    wait_port 8086; wait_port 8087
fi

# name port pid [path] -> appends "name rps p50_ms p99_ms cpu_us" to $WORK/results
measure() {
    local name=$1 p50 p99
    wrk_measure "$2" "$3" "${4:-/}"
    p50=$(echo "$WRK_OUT" | awk '$1=="50%" {print $2}')
    p99=$(echo "$WRK_OUT" | awk '$1=="99%" {print $2}')
    if echo "$WRK_OUT" | grep -q "Non-2xx"; then echo "WARNING: $name had non-2xx responses" >&2; fi
    echo "$name $WRK_RPS $(to_ms "$p50") $(to_ms "$p99") $WRK_CPU" >> "$WORK/results"
}
to_ms() { # wrk latency like 1.23ms / 850.00us / 1.01s
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /[0-9]s$/ && v !~ /ms$/) n *= 1000; printf "%.3f", n }'
}

measure_h2() {
    local name=$1 port=$2 pid=$3 out t0 t1 reqs rps
    h2load -c"$CONNS" -m10 -D"$WARMUP" "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
    t0=$(ticks "$pid")
    out=$(taskset -c 0 h2load -c"$CONNS" -m10 -D"$DURATION" "http://127.0.0.1:$port/" 2>&1)
    t1=$(ticks "$pid")
    reqs=$(echo "$out" | awk '/^requests:/ {print $8}')
    rps=$(echo "$out" | awk '/^finished in/ {print $4}')
    echo "$name $rps - - $(cpu_per_req "$t0" "$t1" "$reqs")" >> "$WORK/results_h2"
}

: > "$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
    echo "# round $round/$ROUNDS" >&2
    measure direct 8081 "$HELLO_PID"
    measure nginx 8082 "$NGINX_PID"
    measure haproxy 8083 "$HAPROXY_PID"
    measure legate 8084 "$LEGATE1_PID"
    measure legate-10k 8085 "$LEGATE10K_PID" /api/r5000/x  # a lookup deep in the table
    if [ "$OTLP" = 1 ]; then measure legate-otlp 8088 "$LEGATEOTLP_PID"; fi
    if [ "$H2" = 1 ] && command -v h2load >/dev/null; then
        measure_h2 nginx-h2 8086 "$NGINXH2_PID"
        measure_h2 haproxy-h2 8087 "$HAPROXYH2_PID"
        measure_h2 legate-h2 8084 "$LEGATE1_PID"
    fi
done

python3 - "$WORK/results" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99, cpu = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99), float(cpu)))
med = {n: [statistics.median(c) for c in zip(*v)] for n, v in rows.items()}
d = med["direct"]
print(f"{'target':<12}{'req/s':>10}{'x direct':>10}{'p50 ms':>9}{'x':>6}{'p99 ms':>9}{'x':>6}{'CPU us/req':>12}")
for n in ["direct", "nginx", "haproxy", "legate", "legate-10k", "legate-otlp"]:
    if n not in med:
        continue
    r, p50, p99, cpu = med[n]
    print(f"{n:<12}{r:>10.0f}{r/d[0]:>10.2f}{p50:>9.3f}{p50/d[1]:>6.2f}{p99:>9.3f}{p99/d[2]:>6.2f}{cpu:>12.1f}")
print(f"(medians of {len(rows['direct'])} rounds; CPU = server process utime+stime per request)")
EOF
if [ -s "$WORK/results_h2" ]; then
    echo "HTTP/2 (h2c, h2load -c$CONNS -m10), req/s and CPU us/req, per round:"
    cat "$WORK/results_h2"
fi
echo "raw results: $WORK/results" >&2
