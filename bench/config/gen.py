#!/usr/bin/env python3
"""Write a config tree with N Mappings across H Hosts (default 10,000 across 100) to DIR.

Used by bench/config/run.sh (peak memory of `legate check`) and mirrored by benches/config.rs.
"""
import os
import sys

def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
    hosts = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "hosts.yaml"), "w") as f:
        for h in range(hosts):
            f.write(f"---\napiVersion: legate.dev/v1alpha1\nkind: Host\nmetadata:\n  name: host-{h}\n"
                    f"spec:\n  hostname: h{h}.example.com\n  requestPolicy:\n    insecure:\n      action: Route\n")
    per_file = 100
    for start in range(0, n, per_file):
        with open(os.path.join(out, f"mappings-{start // per_file:04}.yaml"), "w") as f:
            for i in range(start, min(n, start + per_file)):
                h = i % hosts
                extra = ""
                if i % 10 == 0:
                    extra = "  headers:\n    x-tier: gold\n"
                elif i % 10 == 1:
                    extra = "  method: POST\n"
                f.write(f"---\napiVersion: legate.dev/v1alpha1\nkind: Mapping\nmetadata:\n  name: m-{i}\n"
                        f"spec:\n  hostname: h{h}.example.com\n  prefix: /svc-{i}/api/\n"
                        f"  service: svc-{i}.apps:8080\n  timeout_ms: 5000\n{extra}")

if __name__ == "__main__":
    main()
