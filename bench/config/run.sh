#!/usr/bin/env bash
# Peak memory and wall time of `legate check` on 10,000 Mappings across 100 Hosts.
# Usage: bench/config/run.sh [N] [HOSTS]   (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-10000}; hosts=${2:-100}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 bench/config/gen.py "$dir" "$n" "$hosts"
cargo build --release --quiet
for i in 1 2 3; do
  /usr/bin/time -f "run $i: %e s wall, %M KiB peak RSS" "${CARGO_TARGET_DIR:-target}/release/legate" check "$dir" >/dev/null
done
