#!/usr/bin/env bash
# Wall time and peak memory of `legate diff` between two revisions of a 10,000-Mapping repo
# (head changes 100 upstreams, shifts a canary and adds a catch-all that shadows 100 routes).
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-10000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 bench/config/gen.py "$work/base" "$n" 100
cp -r "$work/base" "$work/head"
sed -i 's/service: svc-\([0-9]*\)00\.apps:8080/service: svc-\100-v2.apps:9090/' "$work"/head/mappings-*.yaml
cat >> "$work/head/mappings-0000.yaml" <<'YAML'
---
apiVersion: legate.dev/v1alpha1
kind: Mapping
metadata:
  name: catch-all
spec:
  hostname: h7.example.com
  prefix: /svc-
  precedence: 1
  service: monolith.apps:8080
YAML
cargo build --release --quiet
bin="${CARGO_TARGET_DIR:-target}/release/legate"
for i in 1 2 3; do
  /usr/bin/time -f "run $i: %e s wall, %M KiB peak RSS" "$bin" diff "$work/base" "$work/head" >"$work/out.txt"
done
head -n 3 "$work/out.txt"
