"""A with_times.py SAMPLE_OUT file as a timeline: runs of samples with the same (our innermost frame, phase).
usage: timeline.py samples.json.gz [t_from] [t_to] [min_run_s]"""
import gzip
import json
import sys

d = json.load(gzip.open(sys.argv[1], "rt"))
t_from = float(sys.argv[2]) if len(sys.argv) > 2 else 0
t_to = float(sys.argv[3]) if len(sys.argv) > 3 else 1e9
min_run = float(sys.argv[4]) if len(sys.argv) > 4 else 0.1
PHASES = [("_engine_run_backward", "backward (autograd thread)"), ("async_compile.py:wait", "wait workers"),
          ("_wait_futures", "wait workers"), ("triton/compiler", "triton jit (main)"),
          ("triton/runtime/autotuner", "triton autotune"), ("benchmark_all_configs", "autotune"),
          ("scheduler.py", "inductor scheduler/codegen"), ("codegen", "inductor codegen"),
          ("_inductor/graph.py:run", "inductor lowering"), ("_inductor/lowering", "inductor lowering"),
          ("compile_fx.py", "inductor other"),
          ("aot_stage1", "aot trace"), ("_functorch", "aot other"), ("symbolic_convert", "dynamo trace"),
          ("_dynamo", "dynamo other"), ("cudagraph", "cuda graphs"), ("graphs.py", "cuda graphs")]


def key(stack):
    fr = stack.split(";")
    ours = next((f for f in reversed(fr) if "deepseek_mini/" in f), "-")
    phase = "other"
    for pat, name in PHASES:
        if any(pat in f for f in fr):
            phase = name
            break
    return ours.split("deepseek_mini/", 1)[-1], phase, fr[-1]


runs = []
for t, dt, i in d["samples"]:
    if not (t_from <= t <= t_to):
        continue
    o, p, leaf = key(d["stacks"][i])
    if runs and runs[-1][1:3] == [o, p]:
        runs[-1][3] += dt
        runs[-1][4][leaf] = runs[-1][4].get(leaf, 0) + dt
    else:
        runs.append([t, o, p, dt, {leaf: dt}])
merged = []
for r in runs:  # fold short runs into the previous one
    if merged and r[3] < min_run:
        merged[-1][3] += r[3]
        continue
    merged.append(r)
for t, o, p, dt, leaves in merged:
    top = max(leaves, key=leaves.get)
    print(f"{t:7.2f} {dt:6.2f}  {p:28s} {o:45s} {top}")
