#!/usr/bin/env bash
# Side-by-side proxy benchmark, one table in one run: direct upstream, nginx, HAProxy and Legate
# (1 route, 10,000 routes, JSON access log to a file), over HTTP/1.1 (wrk), h2c (h2load -m10),
# h2 over TLS (ALPN; all three proxies terminate with the same self-signed certificate made
# here) and gRPC unary (direct, HAProxy in h2 mode, Legate), with 1 and with 2 workers.
#
# Method (after /work/shared/perf-baseline/README.md):
#   - upstreams: bench/proxy/hello (minimal hyper 1.x: `200 Hello, World!` on 127.0.0.1:8081;
#     `grpc` mode: an h2c gRPC unary echo on 8089)
#   - 1 worker: every server (upstreams too) pinned to core 1, the load generator to core 0
#   - 2 workers: nginx `worker_processes 2`, HAProxy `nbthread 2`, Legate `--workers 2`; no
#     pinning: servers, upstream and the load generator (wrk -t2, h2load -t2) share both cores,
#     so req/s is bounded by the machine, not by the proxy alone; the figures to compare are
#     CPU per request (does it stay flat?) and the scaling ratio (req/s with 2 / with 1)
#   - load: wrk -c64 --latency; h2load -c64 -m10 (h2c and TLS); gRPC h2load -c16 -m10 with
#     one framed 16-byte message; a warm-up per target, then ROUNDS interleaved rounds
#   - CPU per request: the server's utime+stime ticks (children too: nginx workers) from
#     /proc/PID/stat, before/after a run, divided by the requests served
#
# Usage: bench/proxy/run.sh   (ROUNDS=3 DURATION=10 WARMUP=3 WORKERS="1 2" GRPC=1 by default;
#        SKIP_BUILD=1 reuses the binaries from the last build)
# Needs: wrk, h2load, nginx, haproxy, openssl, taskset
#        (apt-get install wrk nghttp2-client nginx-light haproxy openssl util-linux).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
CONNS=${CONNS:-64}
WORKERS=${WORKERS:-1 2}
GRPC=${GRPC:-1}
# OTLP=1: also `legate-otlp` (1 worker, HTTP/1.1), the 1-route Legate exporting every request's
# spans (sample ratio 1) to the hello upstream standing in for a collector (it answers 200).
OTLP=${OTLP:-0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/legate-bench.XXXXXX)
BASE=/work/shared/perf-baseline
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

for tool in wrk h2load nginx haproxy openssl taskset curl; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

# Own target directories: a shared target/release can be rewritten by other builds mid-run.
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "# building (release)" >&2
    (cd "$ROOT" && cargo build --release --locked --bin legate -q --target-dir "$ROOT/target/bench-legate")
    (cd "$ROOT/bench/proxy/hello" && cargo build --release -q --target-dir "$ROOT/target/bench-hello")
fi
LEGATE=${LEGATE:-$ROOT/target/bench-legate/release/legate}
HELLO="$ROOT/target/bench-hello/release/bench-hello"

# ---- configs (written once) ----------------------------------------------------------------
# One certificate for every TLS listener.
mkdir -p "$WORK/secrets/bench-tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/secrets/bench-tls/tls.key" -out "$WORK/secrets/bench-tls/tls.crt" 2>/dev/null
cat "$WORK/secrets/bench-tls/tls.crt" "$WORK/secrets/bench-tls/tls.key" > "$WORK/haproxy.pem"

# Legate: one catch-all route (plus the Host that carries the certificate, cleartext routed);
# 9,999 more specific prefixes in front of it; the gRPC route alone.
mkdir -p "$WORK/one" "$WORK/many" "$WORK/grpc"
cat > "$WORK/one/m.yaml" <<EOF
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: hello}
spec: {hostname: "*", prefix: /, service: 127.0.0.1:8081, rewrite: ""}
---
apiVersion: legate.dev/v1alpha1
kind: Host
metadata: {name: bench}
spec: {hostname: "*", tlsSecret: {name: bench-tls}, requestPolicy: {insecure: {action: Route}}}
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
cat > "$WORK/grpc/m.yaml" <<EOF
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: echo}
spec: {hostname: "*", prefix: /bench.Echo/, rewrite: "", service: 127.0.0.1:8089, grpc: true}
EOF
# One gRPC message: uncompressed flag, 4-byte big-endian length, 16 bytes.
printf '\x00\x00\x00\x00\x10%s' "0123456789abcdef" > "$WORK/msg.bin"

# nginx: the baseline config with the worker count set and h2c and TLS listeners added.
nginx_conf() { # workers
    mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
    sed -e "s|^worker_processes .*|worker_processes $1;|" \
        -e "s|/tmp/peer-nginx|$WORK/nginx|g" \
        -e "s|^\( *\)listen 127.0.0.1:8082;|&\n\1listen 127.0.0.1:8086 http2;\n\1listen 127.0.0.1:8092 ssl http2;\n\1ssl_certificate $WORK/secrets/bench-tls/tls.crt;\n\1ssl_certificate_key $WORK/secrets/bench-tls/tls.key;|" \
        "$BASE/nginx.conf" > "$WORK/nginx.conf"
    grep -q 8092 "$WORK/nginx.conf" || { echo "nginx.conf: listen line not found" >&2; exit 1; }
}
# HAProxy: the baseline config with the thread count set, h2c and TLS binds, and a gRPC
# frontend/backend in h2 mode on both sides.
haproxy_conf() { # workers
    sed -e "s|^\( *\)nbthread .*|\1nbthread $1|" \
        -e "s|^\( *\)bind 127.0.0.1:8083|&\n\1bind 127.0.0.1:8087 proto h2\n\1bind 127.0.0.1:8093 ssl crt $WORK/haproxy.pem alpn h2,http/1.1|" \
        "$BASE/haproxy.cfg" > "$WORK/haproxy.cfg"
    cat >> "$WORK/haproxy.cfg" <<EOF

frontend grpc
    bind 127.0.0.1:8095 proto h2
    default_backend grpc

backend grpc
    server echo 127.0.0.1:8089 proto h2
EOF
}

# ---- servers ---------------------------------------------------------------------------------
declare -A PID
# Start everything for W workers: pinned to core 1 for one worker, both cores for two.
start_all() { # workers
    local w=$1 cpus=1
    [ "$w" -gt 1 ] && cpus=0,1
    PIDS=()
    taskset -c "$cpus" "$HELLO" 127.0.0.1:8081 & PIDS+=($!); PID[direct]=$!
    taskset -c "$cpus" "$HELLO" 127.0.0.1:8089 grpc & PIDS+=($!); PID[direct-grpc]=$!
    nginx_conf "$w"
    taskset -c "$cpus" nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" & PIDS+=($!); PID[nginx]=$!
    haproxy_conf "$w"
    taskset -c "$cpus" haproxy -db -f "$WORK/haproxy.cfg" & PIDS+=($!); PID[haproxy]=$!
    # Access log off (as the nginx baseline has it) but for legate-log.
    legate() { # name dir http-port https-listen args...
        local name=$1 dir=$2 port=$3 https=$4; shift 4
        LEGATE_LOG=warn taskset -c "$cpus" "$LEGATE" run --dir "$dir" \
            --http-listen "127.0.0.1:$port" --https-listen "$https" --admin-listen off \
            --secrets-dir "$WORK/secrets" --workers "$w" \
            --max-connections 8000 --idle-timeout-ms 600000 "$@" &
        PIDS+=($!); PID[$name]=$!
    }
    legate legate "$WORK/one" 8084 127.0.0.1:8094 --access-log off
    legate legate-10k "$WORK/many" 8085 off --access-log off
    legate legate-log "$WORK/one" 8088 off --access-log "$WORK/access.log"
    legate legate-grpc "$WORK/grpc" 8090 off --access-log off
    if [ "$OTLP" = 1 ]; then
        legate legate-otlp "$WORK/one" 8096 off --access-log off \
            --otlp-endpoint http://127.0.0.1:8081 --otlp-sample-ratio 1
        wait_port 8096
    fi
    for p in 8081 8089 8082 8086 8092 8083 8087 8093 8095 8084 8094 8085 8088 8090; do
        wait_port "$p"
    done
    # Legate listens before its first revision is applied: wait until each one routes.
    for u in 8084/ 8085/api/r5000/x 8088/; do
        for _ in $(seq 1 300); do
            [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$u")" = 200 ] && break
            sleep 0.1
        done
    done
}
stop_all() {
    cleanup
    PIDS=()
}

# ---- measuring: each appends "workers proto target rps p99_ms cpu_us" to $WORK/results --------
load_cpus() { if [ "$1" -gt 1 ]; then echo 0,1; else echo 0; fi; }

h1() { # workers target port [path]
    local w=$1 name=$2 port=$3 path=${4:-/} t0 t1 out reqs rps p99
    local cpus; cpus=$(load_cpus "$w")
    taskset -c "$cpus" wrk -t"$w" -c"$CONNS" -d"${WARMUP}s" "http://127.0.0.1:$port$path" >/dev/null
    t0=$(ticks "${PID[$name]}")
    out=$(taskset -c "$cpus" wrk -t"$w" -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$port$path")
    t1=$(ticks "${PID[$name]}")
    if echo "$out" | grep -q "Non-2xx"; then echo "WARNING: $name had non-2xx responses" >&2; fi
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")
    echo "$w http1 $name $rps $p99 $(cpu_per_req "$t0" "$t1" "$reqs")" >> "$WORK/results"
}
to_ms() { # wrk latency like 1.23ms / 850.00us / 1.01s
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /[0-9]s$/ && v !~ /ms$/) n *= 1000; printf "%.3f", n }'
}

h2() { # workers proto target url [h2load args...]
    local w=$1 proto=$2 name=$3 url=$4 t0 t1 out reqs bad rps
    shift 4
    local cpus; cpus=$(load_cpus "$w")
    taskset -c "$cpus" h2load -t"$w" -c"$CONNS" -m10 -D"$WARMUP" "$@" "$url" >/dev/null 2>&1 || true
    t0=$(ticks "${PID[$name]}")
    out=$(taskset -c "$cpus" h2load -t"$w" -c"$CONNS" -m10 -D"$DURATION" "$@" "$url" 2>&1)
    t1=$(ticks "${PID[$name]}")
    reqs=$(echo "$out" | awk '/^requests:/ {print $8}')
    bad=$(echo "$out" | awk '/^status codes:/ {print $5 + $7 + $9}')
    if [ "${bad:-1}" != 0 ] || ! echo "$out" | grep -q "^Application protocol: h2"; then
        echo "WARNING: $proto $name: non-2xx answers, or not HTTP/2:" >&2
        echo "$out" | grep -E "^(Application|requests|status|finished)" >&2
    fi
    rps=$(echo "$out" | awk '/^finished in/ {print $4}')
    echo "$w $proto $name $rps - $(cpu_per_req "$t0" "$t1" "$reqs")" >> "$WORK/results"
}

grpc() { # workers target port
    CONNS=16 h2 "$1" grpc "$2" "http://127.0.0.1:$3/bench.Echo/Unary" -d "$WORK/msg.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers'
}

: > "$WORK/results"
for w in $WORKERS; do
    start_all "$w"
    for round in $(seq 1 "$ROUNDS"); do
        echo "# $w worker(s): round $round/$ROUNDS" >&2
        h1 "$w" direct 8081
        h1 "$w" nginx 8082
        h1 "$w" haproxy 8083
        h1 "$w" legate 8084
        if [ "$w" = 1 ]; then
            h1 "$w" legate-10k 8085 /api/r5000/x  # a lookup deep in the table
            h1 "$w" legate-log 8088
            if [ "$OTLP" = 1 ]; then h1 "$w" legate-otlp 8096; fi
        fi
        h2 "$w" h2c nginx http://127.0.0.1:8086/
        h2 "$w" h2c haproxy http://127.0.0.1:8087/
        h2 "$w" h2c legate http://127.0.0.1:8084/
        h2 "$w" h2-tls nginx https://127.0.0.1:8092/
        h2 "$w" h2-tls haproxy https://127.0.0.1:8093/
        h2 "$w" h2-tls legate https://127.0.0.1:8094/
        if [ "$GRPC" = 1 ] && [ "$w" = 1 ]; then
            grpc "$w" direct-grpc 8089
            grpc "$w" haproxy 8095
            grpc "$w" legate-grpc 8090
        fi
    done
    stop_all
done

python3 - "$WORK/results" "$ROUNDS" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    w, proto, name, rps, p99, cpu = line.split()
    name = {"direct-grpc": "direct", "legate-grpc": "legate"}.get(name, name)
    rows.setdefault((proto, name, int(w)), []).append(
        (float(rps), float(p99) if p99 != "-" else None, float(cpu) if cpu != "-" else None))

def med(key):
    v = rows.get(key)
    if not v:
        return None
    out = []
    for col in zip(*v):
        col = [c for c in col if c is not None]
        out.append(statistics.median(col) if col else None)
    return out

def f(v, fmt):
    return format(v, fmt) if v is not None else "-"

def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"

workers = sorted({k[2] for k in rows})
head = f"{'proto':<7}{'target':<12}"
for w in workers:
    head += f"| {w}w req/s  x nginx  x hapx  CPU us    p99 ms "
if len(workers) > 1:
    head += f"| {workers[-1]}w/{workers[0]}w"
print(head)
order = ["direct", "nginx", "haproxy", "legate", "legate-10k", "legate-log", "legate-otlp"]
for proto in ["http1", "h2c", "h2-tls", "grpc"]:
    for name in order:
        if not any((proto, name, w) in rows for w in workers):
            continue
        line = f"{proto:<7}{name:<12}"
        for w in workers:
            m = med((proto, name, w))
            if m is None:
                line += "|" + " " * 51
                continue
            rps, p99, cpu = m
            ng, hp = med((proto, "nginx", w)), med((proto, "haproxy", w))
            line += (f"| {rps:>9.0f}{ratio(rps, ng and ng[0]):>9}{ratio(rps, hp and hp[0]):>8}"
                     f"{f(cpu, '.1f'):>8}{f(p99, '.3f'):>10} ")
        if len(workers) > 1:
            a, b = med((proto, name, workers[0])), med((proto, name, workers[-1]))
            line += f"| {ratio(b and b[0], a and a[0]):>5}"
        print(line)
print(f"(medians of {sys.argv[2]} rounds; CPU = server utime+stime per request; x = req/s ratio to "
      "nginx/HAProxy in the same protocol and worker count; 1w: servers on core 1, load on core 0; "
      "2w: servers and load share both cores)")
EOF
echo "raw results: $WORK/results" >&2
