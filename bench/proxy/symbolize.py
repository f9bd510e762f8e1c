#!/usr/bin/env python3
"""Fill in the `[unknown]` frames of `perf script` output for one binary from its symbol table.

perf 6.1 (Debian 12) cannot read the ELF of the legate release binary ("symsrc__init: cannot
get elf header") although it reads smaller Rust binaries; the addresses it prints for that DSO
are file offsets in it, so `readelf -l` and `nm` are enough. Usage: perf script | symbolize.py BINARY
"""
import bisect
import re
import subprocess
import sys

binary = sys.argv[1]
syms = []
for line in subprocess.run(["nm", "-n", "-C", "--defined-only", binary],
                           capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1] in "tTwW":
        syms.append((int(parts[0], 16), parts[2]))
addrs = [a for a, _ in syms]
# perf prints file offsets: map them to addresses through the LOAD segments.
segments = []
for line in subprocess.run(["readelf", "-l", "-W", binary],
                           capture_output=True, text=True, check=True).stdout.splitlines():
    f = line.split()
    if f and f[0] == "LOAD":
        off, vaddr, size = int(f[1], 16), int(f[2], 16), int(f[4], 16)
        segments.append((off, off + size, vaddr - off))


def to_vaddr(off):
    for lo, hi, delta in segments:
        if lo <= off < hi:
            return off + delta
    return off

# Rust symbols end in a hash (`::h0123456789abcdef`): drop it, and shorten closures.
hashed = re.compile(r"::h[0-9a-f]{16}$")
frame = re.compile(r"^(\s+)([0-9a-f]+) \[unknown\] \((" + re.escape(binary) + r"|[^)]*/" +
                   re.escape(binary.rsplit("/", 1)[-1]) + r")\)$")
for line in sys.stdin:
    m = frame.match(line.rstrip("\n"))
    if m:
        i = bisect.bisect_right(addrs, to_vaddr(int(m.group(2), 16))) - 1
        if i >= 0:
            name = hashed.sub("", syms[i][1])
            line = f"{m.group(1)}{m.group(2)} {name} ({m.group(3)})\n"
    sys.stdout.write(line)
