"""bench_decode.py with MoE's decode routing path (moe_decode.route + the expert kernels reading rows in place) turned
off: the layer then sorts with the one-hot map as before, the expert kernels still run on rows in expert order."""
import runpy
import sys

import deepseek_mini.model.moe as M


def available(x, gate_up, down, weights, _available=M.moe_decode.available):
    # the new path passes the [T, K] gates, the old one [N]; no globals: runpy replaces __main__, where dynamo looks
    return weights.dim() == 1 and _available(x, gate_up, down, weights)


M.moe_decode.available = available
sys.argv = ["scripts/bench/bench_decode.py", *sys.argv[1:]]
sys.path.insert(0, "scripts/bench")
runpy.run_path("scripts/bench/bench_decode.py", run_name="__main__")
