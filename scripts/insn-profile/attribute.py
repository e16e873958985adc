#!/usr/bin/env python3
"""Per-function guest instructions per token from two runs' block counts.

    attribute.py BINARY SHORT LONG TOKENS [BASE]

SHORT and LONG are insnprof.c's outputs ("vaddr instructions" per
translation block) for runs that generate N and N + TOKENS tokens; each
block is put under the function symbol (`nm`) it starts in, after taking off
the load address BASE (qemu-aarch64 user mode loads a PIE at 0x5500000000).
"""
import bisect
import collections
import subprocess
import sys

binary, short, long, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = int(sys.argv[5], 16) if len(sys.argv) > 5 else 0x5500000000
symbols = []
nm = subprocess.run(["aarch64-linux-gnu-nm", "-C", "--defined-only", binary], capture_output=True, text=True, check=True)
for line in nm.stdout.splitlines():
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1] in "tTwW":
        symbols.append((int(parts[0], 16), parts[2]))
symbols.sort()
starts = [s[0] for s in symbols]


def per_function(path):
    counts = collections.Counter()
    with open(path) as f:
        for line in f:
            vaddr, n = line.split()
            i = bisect.bisect_right(starts, int(vaddr, 16) - base) - 1
            counts[symbols[i][1] if i >= 0 else "?"] += int(n)
    return counts


a, b = per_function(short), per_function(long)
per_token = {k: (b[k] - a.get(k, 0)) / tokens / 1e6 for k in b}
print(f"{sum(per_token.values()):8.2f} M guest instructions per token, by function:")
for name, m in sorted(per_token.items(), key=lambda kv: -kv[1])[:25]:
    if m >= 0.005:
        print(f"{m:8.2f}  {name[:160]}")
