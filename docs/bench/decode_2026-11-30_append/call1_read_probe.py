"""Read-bandwidth ceiling of this GPU: a streaming Triton read kernel over 4.8 GB with P programs, and torch reductions.

As run in call 1, code reformatted since (statements one per line). Its printed "GB/s" are TB/s (bytes / us / 1e6);
the JSON values are TB/s."""
import json
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _read(x, out, N_PER, BLOCK: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    base = x + p * N_PER
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, N_PER, BLOCK):
        acc += tl.load(base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out + p, tl.sum(acc))


def graph_time(fn, reps=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps * 1e3


n_sm = torch.cuda.get_device_properties(0).multi_processor_count
N = 132 * 128 * 4 * 1024 * 36  # bf16 elements, ~4.98 GB, divisible by 128..1056 programs
x = torch.randn(N // 1024, 1024, device="cuda", dtype=torch.bfloat16).view(-1)
res = {}
for P in (128, 132, 264, 528, 1056):
    for BLOCK in (2048, 4096, 8192):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                out = torch.empty(P, device="cuda")
                try:
                    us = graph_time(lambda P=P, out=out, BLOCK=BLOCK, warps=warps, stages=stages: _read[(P,)](
                        x, out, N // P, BLOCK=BLOCK, num_warps=warps, num_stages=stages))
                except Exception:
                    continue
                res[f"P{P}_B{BLOCK}_w{warps}_s{stages}"] = N * 2 / us / 1e6
best = sorted(res.items(), key=lambda kv: -kv[1])
for P in (128, 132, 264, 528, 1056):
    bp = max((v, k) for k, v in res.items() if k.startswith(f"P{P}_"))
    print(f"programs {P}: best {bp[0]:.0f} GB/s ({bp[1]})")
print("top 8:", best[:8])
us = graph_time(lambda: x.sum())
print(f"torch sum: {N*2/us/1e6:.0f} GB/s")
y = torch.empty_like(x)
us = graph_time(lambda: y.copy_(x))
print(f"torch copy (read+write): {2*N*2/us/1e6:.0f} GB/s")
json.dump(res, open(sys.argv[1], "w"), indent=1)
