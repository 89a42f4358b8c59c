"""The gradient all-reduce of a DDP step, alone: how long summing one model's gradients over the GPUs takes.

    python scripts/bench/allreduce.py                       # all visible GPUs, the `small` preset's gradients
    python scripts/bench/allreduce.py --devices 2 --preset small --out allreduce.json
    python scripts/bench/allreduce.py --accelerator cpu --devices 2 --numel 1000000   # gloo, a smoke run

Whole-model CUDA graphs under DDP (compile=full:reduce-overhead) produce every gradient at the end of the
backward, so DDP's all-reduce cannot overlap it and its whole time is added to the step. This measures that
time for the model's trainable parameters, as DDP sends them: fp32 gradients in 25 MB buckets (DDP's default
bucket_cap_mb), the same as one flat tensor, and bf16 (what `bf16_compress_hook` or bf16 weights would send).
Processes are started by Lightning Fabric (the same launcher the trainer uses); timing is with CUDA events over
`--iters` all-reduces after `--warmup`, the median reported, with the bus bandwidth NCCL's tests define
(algorithm bandwidth x 2(n-1)/n).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def measure(fabric, numel: int, dtype, bucket_bytes: int | None, iters: int, warmup: int) -> float:
    """Median milliseconds of one all-reduce of `numel` elements, in buckets of `bucket_bytes` (None: one)."""
    import torch
    import torch.distributed as dist

    flat = torch.ones(numel, dtype=dtype, device=fabric.device)
    per = numel if bucket_bytes is None else max(1, bucket_bytes // flat.element_size())
    buckets = list(flat.split(per))
    cuda = fabric.device.type == "cuda"
    times = []
    for i in range(warmup + iters):
        fabric.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        works = [dist.all_reduce(b, async_op=True) for b in buckets]  # DDP launches its buckets back to back
        for w in works:
            w.wait()
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def run(fabric, args) -> None:
    import torch

    from deepseek_mini.config import PRESETS, ModelConfig, count_parameters

    numel = args.numel or count_parameters(ModelConfig(**PRESETS[args.preset])).total
    n = fabric.world_size
    rows = []
    for name, dtype, bucket in (("fp32, 25 MB buckets (DDP)", torch.float32, 25 * 2**20),
                                ("fp32, one tensor", torch.float32, None),
                                ("bf16, 12.5 MB buckets", torch.bfloat16, 25 * 2**19),
                                ("bf16, one tensor", torch.bfloat16, None)):
        ms = measure(fabric, numel, dtype, bucket, args.iters, args.warmup)
        nbytes = numel * torch.tensor([], dtype=dtype).element_size()
        alg = nbytes / (ms / 1e3) / 1e9
        rows.append({"what": name, "bytes": nbytes, "ms": ms, "algbw_GBps": alg, "busbw_GBps": alg * 2 * (n - 1) / n})
    if fabric.global_rank == 0:
        device = torch.cuda.get_device_name() if fabric.device.type == "cuda" else "cpu (gloo)"
        print(f"{n} x {device}; torch {torch.__version__}; {numel:,} gradients ({args.preset if not args.numel else 'numel'})")
        print("| all-reduce | MB | ms | algbw GB/s | busbw GB/s |\n|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['what']} | {r['bytes'] / 1e6:,.0f} | {r['ms']:.2f} | {r['algbw_GBps']:.0f} | {r['busbw_GBps']:.0f} |")
        if args.out:
            Path(args.out).write_text(json.dumps({"devices": n, "device": device, "torch": torch.__version__,
                                                  "numel": numel, "args": vars(args), "results": rows}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="auto")
    p.add_argument("--accelerator", default="cuda")
    p.add_argument("--preset", default="small", help="count this model preset's parameters")
    p.add_argument("--numel", type=int, default=0, help="all-reduce this many elements instead")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    from lightning.fabric import Fabric

    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    fabric = Fabric(accelerator=args.accelerator, devices=devices, strategy="ddp")
    fabric.launch(run, args)


if __name__ == "__main__":
    main()
