#!/usr/bin/env python3
"""Per-function guest instructions per decoded token from two insnprofile.c
dumps (short and long run): (long - short) / tokens, by symbol.

    symbolize.py BINARY SHORT.txt LONG.txt TOKENS [TOP]
"""
import bisect, subprocess, sys
from collections import defaultdict

binary, short, long_, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
top = int(sys.argv[5]) if len(sys.argv) > 5 else 30
syms = []
for line in subprocess.run(["nm", "-C", "--defined-only", "-n", binary], capture_output=True, text=True).stdout.splitlines():
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[1].lower() in "tw":
        syms.append((int(parts[0], 16), parts[2]))
starts = [s for s, _ in syms]

def load(path):
    out = {}
    for line in open(path):
        a, c = line.split()
        out[int(a, 16)] = out.get(int(a, 16), 0) + int(c)
    return out

a, b = load(short), load(long_)
# qemu-user maps a PIE binary at a fixed base: take the one that puts the hottest block inside a symbol.
hot = max(b, key=b.get)
base = next((x for x in (0x5500000000, 0x4000000000, 0x555555554000, 0) if starts and hot - x >= starts[0]), 0)
per = defaultdict(float)
for addr in set(a) | set(b):
    delta = (b.get(addr, 0) - a.get(addr, 0)) / tokens
    i = bisect.bisect_right(starts, addr - base) - 1
    name = syms[i][1] if i >= 0 and addr >= base else "?"
    per[name[:110]] += delta
total = sum(per.values())
print(f"total {total / 1e6:.2f} M per token (base {base:#x})")
for name, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
    print(f"{v / 1e6:8.3f} M  {100 * v / total:5.1f}%  {name}")
