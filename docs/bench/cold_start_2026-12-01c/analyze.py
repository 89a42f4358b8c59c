"""Summarise a with_times.py SAMPLE_OUT file by the run's stages (results.json startup_sec + first step).
usage: analyze.py samples.json.gz results.json [top] [filter-substring]"""
import collections
import gzip
import json
import sys

d = json.load(gzip.open(sys.argv[1], "rt"))
r = json.load(open(sys.argv[2]))
top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
flt = sys.argv[4] if len(sys.argv) > 4 else None
bounds, acc = [], 0.0
for k, v in r["startup_sec"].items():
    acc += v
    bounds.append((k, acc))
bounds.append(("fit", r["time_to_first_step_sec"]))
bounds.append(("after", 1e9))
stacks = [s.split(";") for s in d["stacks"]]


def stage(t):
    for k, b in bounds:
        if t <= b:
            return k


incl = collections.defaultdict(collections.Counter)
leaf = collections.defaultdict(collections.Counter)
tot = collections.Counter()
for t, dt, i in d["samples"]:
    s = stage(t)
    tot[s] += dt
    st = stacks[i]
    for fr in set(st):
        if flt is None or flt in fr:
            incl[s][fr] += dt
    leaf[s][st[-1] if st else "<none>"] += dt
for k, _ in bounds:
    print(f"=== {k}: {tot[k]:.2f} s sampled")
    for fr, v in incl[k].most_common(top):
        print(f"  {v:7.2f}  {fr}")
    print("  -- leaves")
    for fr, v in leaf[k].most_common(8):
        print(f"  {v:7.2f}  {fr}")
