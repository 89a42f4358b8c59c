"""Where the absorbed-MLA decode step's time goes, and how the fused decode kernel should be launched (one GPU).

    python scripts/bench/mla_decode_tune.py --out tune.json                  # sweep + step profiles, ~5 min
    python scripts/bench/mla_decode_tune.py --no-step --shapes 32x32768      # the kernel sweep only

1. Kernel sweep (deepseek_mini/kernels/mla_decode.py alone, `small` shape: 12 heads, latent 256, rope 32, bf16,
   every position valid): for each batch x cache length, every launch configuration (splits per sequence x
   positions per block x warps x pipeline stages x tiles by TMA or not) is timed over --reps back-to-back calls
   (split kernel + merge kernel), as GB/s of cache read; each output is checked against the default configuration's.
2. The decode step at --batches (default 32; scripts/bench/bench_decode.py's compiled + CUDA-graph step, random weights and
   cache): absorbed MLA with the default launch rule and with the sweep's best configuration (--before: also as
   before 2026-11-30, the splits merged in PyTorch, the old launch rule); MHA at the same points. Each with a
   torch.profiler breakdown of one replay by kernel category, the top kernels and the idle time between kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_decode as bd  # noqa: E402  (the sibling benchmark: models, caches, timed and profiled steps)

from deepseek_mini.kernels import mla_decode  # noqa: E402

HEADS, LATENT, ROPE = 12, 256, 32


def old_rule(B: int, L: int, C: int, n_sm: int, smem: int = 0) -> mla_decode.LaunchConfig:
    """The launch rule before 2026-11-30 (~2 programs per SM, 64-position blocks): the default's small-GPU branch."""
    return mla_decode.default_config(B, L, C, n_sm, 0)


def torch_merge_launch(q_lat, q_pe, kv, kv_len, scale, config, w_uv=None, cos=None, sin=None):
    """The kernel as it was before the merge kernel: the splits merged by ~10 PyTorch ops (then W_UV, if given)."""
    H, C = q_lat.shape[1:]
    acc, m, lsum = mla_decode.split_partials(q_lat, q_pe, kv, kv_len, scale, config, cos, sin)
    m_all = m.amax(dim=1, keepdim=True)
    w = torch.exp(m - m_all).nan_to_num(0.0)
    out = ((acc * w[..., None]).sum(1) / (lsum * w).sum(1)[..., None])[:, :H, :C].to(q_lat.dtype).contiguous()
    return out if w_uv is None else torch.einsum("bhc,hvc->bhv", out, w_uv)


def split_candidates(B: int, L: int, n_sm: int, shape: tuple[int, int]) -> list[int]:
    waves = [0.5, 1, 1.5, 2, 2.5, 3, 4, 6, 8]
    cands = {max(1, round(w * n_sm / B)) for w in waves} | {mla_decode.default_config(B, L, LATENT, *shape).splits}
    return sorted(s for s in cands if L // s >= 64)


def time_calls(fn, reps: int) -> float:
    """GPU microseconds per call: `reps` calls captured in one CUDA graph and replayed (no host launch cost,
    which is ~110 us per call of the Python launcher and hid every small shape in the first sweep)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us


def sweep(B: int, L: int, args, shape: tuple[int, int]) -> dict:
    n_sm = shape[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    q_lat = torch.randn(B, HEADS, LATENT, device="cuda", generator=g).bfloat16()
    q_pe = torch.randn(B, HEADS, ROPE, device="cuda", generator=g).bfloat16()
    kv = torch.randn(B, L, LATENT + ROPE, device="cuda", generator=g).bfloat16()
    kv_len = torch.full((B,), L, dtype=torch.int32, device="cuda")
    scale = (128 + ROPE) ** -0.5
    nbytes = kv.numel() * kv.element_size()
    default = mla_decode.default_config(B, L, LATENT, *shape)
    ref = mla_decode.launch(q_lat, q_pe, kv, kv_len, scale, default).float()
    rows = []
    for splits, block_n, warps, stages, tma in itertools.product(split_candidates(B, L, n_sm, shape), args.block_n,
                                                                 args.warps, args.stages, args.tma):
        cfg = mla_decode.LaunchConfig(splits, block_n, warps, stages, bool(tma))
        row = dataclasses.asdict(cfg)
        try:
            out = mla_decode.launch(q_lat, q_pe, kv, kv_len, scale, cfg).float()
            row["max_rel_diff"] = float((out - ref).abs().max() / ref.abs().max())
            us = time_calls(lambda cfg=cfg: mla_decode.launch(q_lat, q_pe, kv, kv_len, scale, cfg), args.reps)
            row.update(us=us, gbps=nbytes / (us * 1e-6) / 1e9)
        except Exception as e:  # e.g. out of shared memory for a large block x stages
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        rows.append(row)
    old = old_rule(B, L, LATENT, n_sm)
    us = time_calls(lambda: torch_merge_launch(q_lat, q_pe, kv, kv_len, scale, old), args.reps)
    before = {"config": dataclasses.asdict(old), "us": us, "gbps": nbytes / (us * 1e-6) / 1e9}
    ok = [r for r in rows if "us" in r and r["max_rel_diff"] < 2e-2]
    best = min(ok, key=lambda r: r["us"])
    want = dataclasses.asdict(default)
    dflt = next((r for r in ok if {k: r[k] for k in want} == want), None)
    dflt = dflt or {"us": float("nan"), "gbps": float("nan")}  # the default is not among the candidates
    print(f"kernel B={B} L={L} ({nbytes / 1e9:.2f} GB): before (torch merge, old launch rule) {before['us']:.1f} us "
          f"{before['gbps']:,.0f} GB/s | merge kernel, default {dflt['us']:.1f} us {dflt['gbps']:,.0f} GB/s | best "
          f"{best['us']:.1f} us {best['gbps']:,.0f} GB/s (splits {best['splits']}, block_n {best['block_n']}, "
          f"warps {best['num_warps']}, stages {best['num_stages']}, tma {best['tma']}); {len(rows)} configs, "
          f"{sum('error' in r for r in rows)} failed", flush=True)
    for r in sorted(ok, key=lambda r: r["us"])[:8]:
        print(f"    {r['us']:8.1f} us {r['gbps']:7,.0f} GB/s  splits {r['splits']:4d} block_n {r['block_n']:3d} "
              f"warps {r['num_warps']} stages {r['num_stages']} tma {int(r['tma'])}", flush=True)
    return {"batch": B, "length": L, "bytes": nbytes, "before": before, "default": dflt, "best": best, "rows": rows}


def step_points(args, best_by_shape: dict) -> list[dict]:
    max_len = max(args.contexts) + args.warmup + args.steps + 72
    bargs = SimpleNamespace(device="cuda", dtype="bf16", warmup=args.warmup, steps=args.steps,
                            bandwidth=args.bandwidth, inductor={})
    bd.PROFILE["steps"] = args.profile
    rows = []
    default_launch, default_rule = mla_decode.launch, mla_decode.choose_config

    def tuned_rule(B, L, C, n_sm, smem=0):  # the sweep's best at this batch and the nearest swept length
        near = [k for k in best_by_shape if k[0] == B]
        if not near:
            return default_rule(B, L, C, n_sm, smem)
        k = min(near, key=lambda k: abs(k[1] - L))
        b = best_by_shape[k]
        return mla_decode.LaunchConfig(b["splits"], b["block_n"], b["num_warps"], b["num_stages"], b["tma"])

    before = [("before: torch merge, old launch rule", torch_merge_launch, old_rule)] if args.before else []
    settings = {"mla_absorb": before + [("merge kernel, default launch", default_launch, default_rule),
                                        ("merge kernel, swept launch", default_launch, tuned_rule)],
                "mha": [("", default_launch, default_rule)]}
    for variant in args.variants:
        cfg = bd.variant_config(variant, "small", max_len)
        model = bd.build_model(variant, cfg, "cuda", torch.bfloat16)
        for batch, ctx, (label, launch, rule) in itertools.product(args.batches, args.contexts, settings[variant]):
            mla_decode.launch, mla_decode.choose_config = launch, rule
            try:
                row = bd.bench_point(model, variant, batch, ctx, bargs, "compiled")
            finally:
                mla_decode.launch, mla_decode.choose_config = default_launch, default_rule
            row["setting"] = label
            rows.append(row)
            if row.get("status") != "ok":
                print(f"step {variant} {label} ctx {ctx}: {row.get('status')}", flush=True)
                continue
            print(bd.describe_step(row, f"{variant} {label} batch {batch} ctx {ctx}", top=10), flush=True)
        del model
        bd.free_memory()
    for batch, ctx in itertools.product(args.batches, args.contexts):
        mha = next((r for r in rows if r["variant"] == "mha" and (r["batch"], r["context"]) == (batch, ctx)
                    and r.get("status") == "ok"), None)
        for r in rows:
            if r["variant"] == "mla_absorb" and (r["batch"], r["context"]) == (batch, ctx) and r.get("status") == "ok" \
                    and mha:
                r["vs_mha"] = mha["step_ms"] / r["step_ms"]
                print(f"batch {batch} ctx {ctx} {r['setting']}: {r['step_ms']:.3f} ms, {r['vs_mha']:.2f}x MHA "
                      f"({mha['step_ms']:.3f} ms), {r['step_over_floor']:.2f}x floor", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["32x32768", "32x8192", "1x32768", "32x1024"],
                    help="batch x cache length points of the kernel sweep")
    ap.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--tma", type=int, nargs="+", default=[0, 1], help="1: the cache's tiles by TMA (Hopper)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-step", action="store_true", help="the kernel sweep only")
    ap.add_argument("--before", action="store_true",
                    help="also the step as before 2026-11-30 (splits merged in PyTorch, the old launch rule)")
    ap.add_argument("--variants", nargs="+", default=["mla_absorb", "mha"])
    ap.add_argument("--batches", type=int, nargs="+", default=[32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", type=int, default=3, help="profiled replays per step point")
    ap.add_argument("--bandwidth", type=float, default=4.3, help="TB/s for the floor (H200 device copy: 4.26)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: the sweep needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = mla_decode._device_shape(torch.device("cuda"))
    n_sm = shape[0]
    print(f"# {torch.cuda.get_device_name()} ({n_sm} SMs, {shape[1] // 1024} KiB shared memory per SM), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    sweeps = []
    for point in args.shapes:
        B, L = map(int, point.split("x"))
        sweeps.append(sweep(B, L, args, shape))
    best = {(s["batch"], s["length"]): s["best"] for s in sweeps}
    steps = [] if args.no_step else step_points(args, best)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "sms": n_sm,
                                             "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                                             "argv": sys.argv, "sweeps": sweeps, "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
