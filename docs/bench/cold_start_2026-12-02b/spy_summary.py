"""Summarise call 1's py-spy profile of a cold small_gpu start (c1_base_spy.speedscope.gz, the main thread, 200 Hz,
idle included; py-spy stops the process at each sample, so that run took 85 s instead of ~30: read proportions):
the start-up up to train() by the outermost third-party package being imported and by the chain of packages that
imported it.    python docs/bench/cold_start_2026-12-02b/spy_summary.py"""
import collections
import gzip
import json
import re
from pathlib import Path

d = json.load(gzip.open(Path(__file__).with_name("c1_base_spy.speedscope.gz")))
frames, prof = d["shared"]["frames"], d["profiles"][0]  # profiles[0]: the main thread


def package(path):
    m = re.search(r"(?:site-packages|/tmp/site)/([^/]+)", path)
    return m.group(1).replace(".py", "") if m else None


t, launch, inner, chains = 0.0, 0.0, collections.Counter(), collections.Counter()
for stack, w in zip(prof["samples"], prof["weights"]):
    if any(frames[i]["name"] == "train" and "training/train.py" in frames[i].get("file", "") for i in stack):
        break  # train() started: the start-up is over
    launch += w
    mods = [package(frames[i].get("file", "")) for i in stack if frames[i]["name"] == "<module>"]
    mods = [m for m in mods if m]
    inner[mods[-1] if mods else "(no third-party import)"] += w
    chain = []
    for m in mods:
        if not chain or chain[-1] != m:
            chain.append(m)
    chains[" > ".join(chain[:4]) or "(no third-party import)"] += w
print(f"start-up (launch to train()) under py-spy: {launch:.1f} s")
print("by the innermost package being imported:")
for k, v in inner.most_common(12):
    print(f"  {v:5.2f} s  {100 * v / launch:4.1f}%  {k}")
groups = collections.Counter()
for k, v in chains.items():
    parts = k.split(" > ")
    groups[" > ".join(parts[:3]) if parts[:2] == ["lightning", "torchmetrics"] else parts[0]] += v
print("grouped (torch with what it imports; Lightning -> torchmetrics -> each package with what that imports):")
for k, v in groups.most_common(10):
    print(f"  {v:5.2f} s  {100 * v / launch:4.1f}%  {k}")
print("by the chain of packages importing it (first four):")
for k, v in chains.most_common(12):
    print(f"  {v:5.2f} s  {100 * v / launch:4.1f}%  {k}")
