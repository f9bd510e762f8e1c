#!/usr/bin/env bash
# Edge-security overhead: throughput of a route with JWT validation (cached RS256 key) against
# the same route without it, and the median latency the Redis-backed rate limiter adds.
#   - upstream: legate's built-in demo echo; redis-server on a free port
#   - throughput: wrk -t1 -c64 -d${DURATION}s per route, interleaved rounds
#   - latency: wrk -t1 -c1 -d${DURATION}s --latency, median of each route
#
# Usage: bench/security/run.sh    (ROUNDS=3 DURATION=10; LEGATE_BIN=path skips the build)
# Needs: wrk, redis-server, openssl, python3.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/legate-secbench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

for tool in wrk redis-server openssl python3; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
if [ -z "${LEGATE_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --bin legate -q --target-dir "$ROOT/target/bench-legate")
    LEGATE_BIN=$ROOT/target/bench-legate/release/legate
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(free_port); HTTP_PORT=$(free_port); ECHO_PORT=$(free_port)

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/key.pem" 2>/dev/null
python3 - "$WORK" <<'PY'
import base64, json, subprocess, sys, time
work = sys.argv[1]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
mod = subprocess.check_output(["openssl", "rsa", "-in", f"{work}/key.pem", "-noout", "-modulus"]).decode().strip().split("=")[1]
n = bytes.fromhex(mod)
jwks = {"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "n": b64(n), "e": b64((65537).to_bytes(3, "big"))}]}
open(f"{work}/jwks.json", "w").write(json.dumps(jwks))
head = b64(json.dumps({"alg": "RS256", "kid": "k1"}).encode())
body = b64(json.dumps({"iss": "https://issuer.bench", "aud": "bench", "sub": "u1", "exp": int(time.time()) + 86400}).encode())
sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", f"{work}/key.pem"], input=f"{head}.{body}".encode(), capture_output=True, check=True).stdout
open(f"{work}/token", "w").write(f"{head}.{body}.{b64(sig)}")
PY

mkdir -p "$WORK/cfg"
cat > "$WORK/cfg/bench.yaml" <<YAML
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: plain}
spec: {hostname: "*", prefix: /plain/, service: "127.0.0.1:$ECHO_PORT"}
---
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: jwt}
spec: {hostname: "*", prefix: /jwt/, service: "127.0.0.1:$ECHO_PORT"}
---
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata: {name: limited}
spec:
  hostname: "*"
  prefix: /limited/
  service: "127.0.0.1:$ECHO_PORT"
  labels:
    ambassador:
      - per_client:
          - remote_address: {key: remote_address}
---
apiVersion: legate.dev/v1alpha1
kind: JWTPolicy
metadata: {name: bench}
spec:
  issuer: https://issuer.bench
  audiences: [bench]
  jwks: {file: "$WORK/jwks.json"}
  forward_claims: {sub: x-user}
  mappings: [jwt]
---
apiVersion: legate.dev/v1alpha1
kind: RateLimit
metadata: {name: bench}
spec:
  backend: redis
  redis: {address: "127.0.0.1:$REDIS_PORT", timeout_ms: 50}
  limits:
    - {name: client, group: per_client, requests: 1000000000, per: second}
YAML

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=($!)
"$LEGATE_BIN" run --dir "$WORK/cfg" --demo-echo "127.0.0.1:$ECHO_PORT" \
    --http-listen "127.0.0.1:$HTTP_PORT" --https-listen off --admin-listen off >"$WORK/legate.log" 2>&1 &
PIDS+=($!)
sleep 2
BASE=http://127.0.0.1:$HTTP_PORT
AUTH="Authorization: Bearer $(cat "$WORK/token")"
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "$AUTH" "$BASE/jwt/x")" = 200 ] || { echo "JWT route refuses the bench token" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/jwt/x")" = 401 ] || { echo "JWT route accepts no token" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/limited/x")" = 200 ] || { echo "limited route fails" >&2; exit 1; }

rps() { wrk -t1 -c64 -d"${DURATION}s" "$@" | awk '/Requests\/sec/ {print $2}'; }
p50() { wrk -t1 -c1 -d"${DURATION}s" --latency "$@" | awk '$1 == "50%" {print $2}'; }
for r in $(seq "$ROUNDS"); do
    plain=$(rps "$BASE/plain/x"); jwt=$(rps -H "$AUTH" "$BASE/jwt/x")
    lp=$(p50 "$BASE/plain/x"); lr=$(p50 "$BASE/limited/x")
    echo "round $r: req/s plain $plain jwt $jwt (jwt/plain $(python3 -c "print(round($jwt/$plain, 3))")); p50 plain $lp redis-limited $lr"
done
