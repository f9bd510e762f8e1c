#!/usr/bin/env bash
# Traffic-policy figures (issue 5), release build, printed side by side:
#   split   canary 70/30 and 50/30/20 over 100,000 requests each (max deviation from the weights)
#   hash    ring_hash and maglev over 5 addresses, 100,000 requests with distinct keys
#   retry   upstream failing 50% with 503, retry_policy 5xx num_retries 3, 64 concurrent clients:
#           upstream attempts per client request (default breaker, then max_retries 1000 so the
#           20% retry budget is what binds)
#   ws      WebSocket echo round trip (32-byte text, sequential), direct vs through `legate`
#   grpc    gRPC unary req/s with h2load (h2c, 5-byte framed 16-byte message, te: trailers)
#           against a Rust h2 echo (benches/traffic.rs grpc-echo), direct vs through `legate`
# split/hash/retry run the gateway library in-process (benches/traffic.rs, the integration
# tests' upstreams and injected DNS for the 5 addresses). ws/grpc run the `legate` binary
# (--worker-threads 1, access log off) and the peer pinned to core 1, the client to core 0, as in
# bench/proxy/run.sh.
#
# Usage: bench/traffic/run.sh [split hash retry ws grpc]   (all by default; ROUNDS=3,
#        WS_N=20000 round trips, GRPC_N=100000 requests; SKIP_BUILD=1 reuses the last build)
# Needs: cargo, h2load (apt-get install nghttp2-client), taskset, python3.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
WS_N=${WS_N:-20000}
GRPC_N=${GRPC_N:-100000}
SECTIONS=${*:-split hash retry ws grpc}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/bench-traffic}
WORK=$(mktemp -d /tmp/legate-traffic.XXXXXX)
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"   # PIDS, cleanup on exit, wait_port

for tool in cargo h2load taskset python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done

cd "$ROOT"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "# building (release) into $CARGO_TARGET_DIR" >&2
    cargo build --release --bin legate -q
fi
LEGATE=${LEGATE_BIN:-$CARGO_TARGET_DIR/release/legate}
TOOL=$(cargo bench --bench traffic --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "traffic" and m.get("executable"):
        print(m["executable"])')
[ -x "$TOOL" ] || { echo "benches/traffic.rs did not build" >&2; exit 1; }
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# legate serving one Mapping (name, inline spec): prints its port.
legate_for() {
    local port; port=$(free_port)
    mkdir -p "$WORK/$1"
    printf 'apiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata: {name: %s}\nspec: %s\n' \
        "$1" "$2" >"$WORK/$1/m.yaml"
    LEGATE_LOG=warn taskset -c 1 "$LEGATE" run --dir "$WORK/$1" --http-listen "127.0.0.1:$port" \
        --https-listen off --admin-listen off --worker-threads 1 --access-log off \
        --idle-timeout-ms 600000 >"$WORK/legate-$1.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
    echo "$port"
}
# The peer (`$TOOL MODE ADDR`) pinned to core 1 and legate with one Mapping NAME to it (SPEC
# with @UP@ for the peer's address); sets $up and $gw.
with_peer() {
    up=$(free_port)
    taskset -c 1 "$TOOL" "$1" "127.0.0.1:$up" & PIDS+=($!)
    wait_port "$up"
    gw=$(legate_for "$2" "${3//@UP@/127.0.0.1:$up}")
}
median() { python3 -c 'import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

for s in $SECTIONS; do
    case $s in
    split|hash|retry)
        echo "## $s (in-process, 64 concurrent HTTP/1.1 clients)"
        "$TOOL" "$s"
        ;;
    ws)
        echo "## WebSocket echo round trip, $WS_N sequential 32-byte messages, median of $ROUNDS rounds"
        with_peer ws-echo ws '{hostname: "*", prefix: /ws/, service: @UP@, allow_upgrade: [websocket]}'
        d50=(); d99=(); l50=(); l99=()
        for _ in $(seq 1 "$ROUNDS"); do
            read -r _ a b < <(taskset -c 0 "$TOOL" ws-rtt "127.0.0.1:$up" /ws/ "$WS_N")
            d50+=("$a"); d99+=("$b")
            read -r _ a b < <(taskset -c 0 "$TOOL" ws-rtt "127.0.0.1:$gw" /ws/ "$WS_N")
            l50+=("$a"); l99+=("$b")
        done
        printf '%-8s %10s %10s\n' target "p50 us" "p99 us"
        printf '%-8s %10s %10s\n' direct "$(median "${d50[@]}")" "$(median "${d99[@]}")"
        printf '%-8s %10s %10s\n' legate "$(median "${l50[@]}")" "$(median "${l99[@]}")"
        ;;
    grpc)
        echo "## gRPC unary, h2load -n $GRPC_N -c16 -m10, median req/s of $ROUNDS rounds"
        with_peer grpc-echo grpc '{hostname: "*", prefix: /bench.Echo/, rewrite: "", service: @UP@, grpc: true}'
        # One gRPC message: uncompressed flag, 4-byte big-endian length, 16 bytes.
        printf '\x00\x00\x00\x00\x10%s' "0123456789abcdef" >"$WORK/msg.bin"
        run_h2load() {
            taskset -c 0 h2load -n "$GRPC_N" -c16 -m10 -d "$WORK/msg.bin" \
                -H 'content-type: application/grpc' -H 'te: trailers' \
                "http://127.0.0.1:$1/bench.Echo/Unary" 2>&1
        }
        dr=(); lr=()
        for _ in $(seq 1 "$ROUNDS"); do
            for t in direct legate; do
                port=$up; [ "$t" = legate ] && port=$gw
                out=$(run_h2load "$port")
                ok=$(echo "$out" | awk '/^status codes:/ {print $3}')
                [ "$ok" = "$GRPC_N" ] || echo "WARNING: $t: only $ok of $GRPC_N 2xx" >&2
                rps=$(echo "$out" | awk '/^finished in/ {print $4}')
                if [ "$t" = direct ]; then dr+=("$rps"); else lr+=("$rps"); fi
            done
        done
        printf '%-8s %10s\n' target "req/s"
        printf '%-8s %10.0f\n' direct "$(median "${dr[@]}")"
        printf '%-8s %10.0f\n' legate "$(median "${lr[@]}")"
        # A real gRPC client agrees with the framing: one grpcio call through Legate, if installed.
        if python3 -c 'import grpc' 2>/dev/null; then
            python3 - "127.0.0.1:$gw" <<'EOF'
import grpc, sys
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
resp, call = ch.unary_unary("/bench.Echo/Unary").with_call(b"ping", timeout=5)
print(f"grpcio check through legate: {call.code().name} {resp!r}")
EOF
        fi
        ;;
    *) echo "unknown section: $s" >&2; exit 2 ;;
    esac
done
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
