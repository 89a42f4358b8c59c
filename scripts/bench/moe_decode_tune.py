"""The routed experts at decode: the Triton decode kernels (deepseek_mini/kernels/moe_decode.py) against today's
grouped_mm path, and how the kernels should be launched (one GPU).

    python scripts/bench/moe_decode_tune.py --out moe_decode.json              # all three parts, ~10 min on an H200
    python scripts/bench/moe_decode_tune.py --no-step --out moe_kernels.json   # the kernels only (parts 1 and 2)
    TRITON_INTERPRET=1 python scripts/bench/moe_decode_tune.py --smoke         # CPU check of this script: tiny
                                                                               # shapes under Triton's interpreter

1. Kernel sweep, one MoE layer at the `small` shape (64 experts, hidden 768, expert width 384, top-6, bf16, random
   routing), at each of --batches: the grouped_mm path (grouped_mm -> _GatedSwiGLU -> grouped_mm, eager), its two
   grouped_mm alone (what the decode step's profile calls "grouped expert GEMMs"), the kernels with the default launch
   rule, and every launch configuration of each kernel (output columns x reduction block x warps x pipeline stages).
   Each is timed as --reps back-to-back calls captured in one CUDA graph and replayed (no host launch cost); GB/s
   counts the expert weight bytes a call must read (those of the experts that have rows), against --bandwidth.
2. Crossover: the kernels (default rule) against the grouped_mm path from batch 1 to past the point where the model
   stops using them (moe_decode.MAX_ROWS_PER_EXPERT rows per expert on average).
3. The decode step at --batches (scripts/bench/bench_decode.py's compiled + CUDA-graph step of the `small` absorbed-MLA
   model, random weights, --context cached tokens) with grouped_mm, with the kernels as the model picks them (default
   rule) and with the sweep's best configurations; each with a torch.profiler breakdown of a replay by kernel category
   (the kernels count under "grouped expert GEMMs", as grouped_mm does).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the repository root

from deepseek_mini.kernels import moe_decode, runtime  # noqa: E402
from deepseek_mini.model.moe import _GatedSwiGLU, grouped_mm  # noqa: E402

SMALL = dict(experts=64, dim=768, width=384, top_k=6)
TINY = dict(experts=8, dim=64, width=32, top_k=2)
FIELDS = [f.name for f in dataclasses.fields(moe_decode.LaunchConfig)]


# ---------------------------------------------------------------------- one MoE layer's routed experts
def make_layer(shape: dict, batch: int, device, seed: int = 0) -> dict:
    """Random bf16 expert weights and `batch` tokens routed to top_k distinct random experts each, as the model hands
    them to GroupedExperts: rows sorted by expert, cumulative int32 offsets, one fp32 gate per row."""
    E, D, width, K = shape["experts"], shape["dim"], shape["width"], shape["top_k"]
    g = torch.Generator(device=device).manual_seed(seed)
    gate_up = (torch.randn(E, 2 * width, D, device=device, generator=g) * D**-0.5).bfloat16()
    down = (torch.randn(E, D, width, device=device, generator=g) * width**-0.5).bfloat16()
    experts_TK = torch.rand(batch, E, device=device, generator=g).topk(K, dim=-1).indices
    expert_N, order = experts_TK.reshape(-1).sort(stable=True)
    counts = torch.bincount(expert_N, minlength=E)
    x = torch.randn(batch, D, device=device, generator=g).bfloat16()[order // K]
    gate = torch.rand(batch * K, device=device, generator=g)
    busy = int((counts > 0).sum())
    return {"x": x, "gate_up": gate_up, "down": down, "offsets": counts.cumsum(0).to(torch.int32), "gate": gate,
            "busy_experts": busy, "max_rows": int(counts.max()), "bytes": busy * 3 * D * width * 2,
            "all_bytes": E * 3 * D * width * 2}


def torch_path(layer) -> torch.Tensor:
    """GroupedExperts.forward without the kernels: grouped_mm, the gated SwiGLU (eager), grouped_mm."""
    h = grouped_mm(layer["x"], layer["gate_up"], layer["offsets"])
    return grouped_mm(_GatedSwiGLU.apply(h, layer["gate"]), layer["down"], layer["offsets"])


def grouped_mms(layer) -> torch.Tensor:
    """The two grouped GEMMs alone (the SwiGLU between them left out)."""
    width = layer["down"].shape[2]
    h = grouped_mm(layer["x"], layer["gate_up"], layer["offsets"])
    return grouped_mm(h[:, :width], layer["down"], layer["offsets"])


def kernels(layer, up_cfg, down_cfg) -> torch.Tensor:
    return moe_decode.launch(layer["x"], layer["gate_up"], layer["down"], layer["offsets"], layer["gate"], up_cfg,
                             down_cfg)


# ---------------------------------------------------------------------- timing
def time_calls(fn, reps: int) -> float:
    """Microseconds per call: on CUDA, `reps` calls captured in one CUDA graph and replayed (mla_decode_tune.py's
    timer: no host launch cost); on CPU (--smoke) wall time."""
    if not torch.cuda.is_available():
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6
    from mla_decode_tune import time_calls as graph_time_calls

    return graph_time_calls(fn, reps)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def timed(fn, reps: int, bytes_read: int) -> dict:
    us = time_calls(fn, reps)
    return {"us": us, "gbps": bytes_read / (us * 1e-6) / 1e9}


# ---------------------------------------------------------------------- 1. kernel sweep
def candidates(args) -> list[moe_decode.LaunchConfig]:
    return [moe_decode.LaunchConfig(n, k, m, w, s) for n, k, m, w, s in
            itertools.product(args.block_n, args.block_k, args.block_m, args.warps, args.stages)]


def sweep(batch: int, args, shape: dict, device) -> dict:
    with torch.no_grad():
        layer = make_layer(shape, batch, device)
        N = layer["x"].shape[0]
        nbytes = layer["bytes"]
        up_default, down_default = moe_decode.launch_configs(layer["x"], layer["gate_up"])  # the op's rule
        ref = torch_path(layer)
        a_default = moe_decode.gate_up_swiglu(layer["x"], layer["gate_up"], layer["offsets"], layer["gate"], up_default)
        y_default = moe_decode.down(a_default, layer["down"], layer["offsets"], down_default)
        out = {"batch": batch, "rows": N, "busy_experts": layer["busy_experts"], "max_rows_per_expert": layer["max_rows"],
               "bytes": nbytes, "all_expert_bytes": layer["all_bytes"]}
        out["torch_path"] = timed(lambda: torch_path(layer), args.reps, nbytes)
        out["grouped_mm_only"] = timed(lambda: grouped_mms(layer), args.reps, nbytes)
        out["default"] = {"gate_up_config": dataclasses.asdict(up_default),
                          "down_config": dataclasses.asdict(down_default),
                          "max_rel_diff_vs_torch_path": rel_diff(y_default, ref),
                          **timed(lambda: kernels(layer, up_default, down_default), args.reps, nbytes)}
        up_bytes, down_bytes = nbytes * 2 // 3, nbytes // 3  # gate_up_proj is 2/3 of an expert's weights
        rows = {"gate_up": [], "down": []}
        for cfg in candidates(args):
            for kernel, fn, ref_k, nb in (
                    ("gate_up", lambda c=cfg: moe_decode.gate_up_swiglu(layer["x"], layer["gate_up"], layer["offsets"],
                                                                        layer["gate"], c), a_default, up_bytes),
                    ("down", lambda c=cfg: moe_decode.down(a_default, layer["down"], layer["offsets"], c), y_default,
                     down_bytes)):
                row = dataclasses.asdict(cfg)
                try:
                    row["max_rel_diff"] = rel_diff(fn(), ref_k)
                    row.update(timed(fn, args.reps, nb))
                except Exception as e:  # e.g. out of shared memory for a large tile x stages
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                rows[kernel].append(row)
        for kernel, default in (("gate_up", up_default), ("down", down_default)):
            ok = [r for r in rows[kernel] if "us" in r and r["max_rel_diff"] < 2e-2]
            want = dataclasses.asdict(default)
            out[f"{kernel}_default"] = next((r for r in ok if {k: r[k] for k in FIELDS} == want), None)
            out[f"{kernel}_best"] = min(ok, key=lambda r: r["us"]) if ok else None
            out[f"{kernel}_rows"] = rows[kernel]
        best = out["gate_up_best"], out["down_best"]
        if all(best):
            cfgs = [moe_decode.LaunchConfig(**{k: b[k] for k in FIELDS}) for b in best]
            out["best"] = {"gate_up_config": dataclasses.asdict(cfgs[0]), "down_config": dataclasses.asdict(cfgs[1]),
                           **timed(lambda: kernels(layer, *cfgs), args.reps, nbytes)}
    floor_us = nbytes / (args.bandwidth * 1e12) * 1e6
    out["floor_us"] = floor_us
    line = (f"kernels batch {batch} (N={N}, {layer['busy_experts']} experts busy, at most {layer['max_rows']} rows, "
            f"{nbytes / 1e6:.1f} MB; floor {floor_us:.1f} us at {args.bandwidth} TB/s): grouped_mm path "
            f"{out['torch_path']['us']:.1f} us (its 2 GEMMs {out['grouped_mm_only']['us']:.1f} us, "
            f"{out['grouped_mm_only']['gbps']:,.0f} GB/s) | kernels, default {out['default']['us']:.1f} us "
            f"{out['default']['gbps']:,.0f} GB/s (max rel diff {out['default']['max_rel_diff_vs_torch_path']:.1e})")
    if "best" in out:
        line += f" | best {out['best']['us']:.1f} us {out['best']['gbps']:,.0f} GB/s"
    print(line, flush=True)
    for kernel in ("gate_up", "down"):
        ok = sorted((r for r in out[f"{kernel}_rows"] if "us" in r), key=lambda r: r["us"])
        d = out[f"{kernel}_default"]
        print(f"  {kernel}: default {d['us']:.1f} us {d['gbps']:,.0f} GB/s" if d else f"  {kernel}: default not swept",
              f"({len(out[f'{kernel}_rows'])} configs, {sum('error' in r for r in out[f'{kernel}_rows'])} failed)",
              flush=True)
        for r in ok[:6]:
            print(f"    {r['us']:8.1f} us {r['gbps']:7,.0f} GB/s  block_n {r['block_n']:3d} block_k {r['block_k']:3d} "
                  f"block_m {r['block_m']} warps {r['num_warps']} stages {r['num_stages']}", flush=True)
    return out


# ---------------------------------------------------------------------- 2. crossover
def crossover(batches: list[int], args, shape: dict, device) -> list[dict]:
    rows = []
    limit = moe_decode.MAX_ROWS_PER_EXPERT * shape["experts"]
    for batch in batches:
        with torch.no_grad():
            layer = make_layer(shape, batch, device)
            cfgs = moe_decode.launch_configs(layer["x"], layer["gate_up"])
            N, nbytes = layer["x"].shape[0], layer["bytes"]
            row = {"batch": batch, "rows": N, "model_uses_kernels": N <= limit, "busy_experts": layer["busy_experts"],
                   "max_rows_per_expert": layer["max_rows"], "bytes": nbytes,
                   "max_rel_diff": rel_diff(kernels(layer, *cfgs), torch_path(layer)),
                   "torch_path": timed(functools.partial(torch_path, layer), args.reps, nbytes),
                   "kernels": timed(functools.partial(kernels, layer, *cfgs), args.reps, nbytes)}
        row["speedup"] = row["torch_path"]["us"] / row["kernels"]["us"]
        rows.append(row)
        print(f"crossover batch {batch:4d} (N={N:5d}{'' if row['model_uses_kernels'] else ', past the threshold'}): "
              f"grouped_mm path {row['torch_path']['us']:8.1f} us, kernels {row['kernels']['us']:8.1f} us "
              f"({row['speedup']:.2f}x)", flush=True)
    return rows


# ---------------------------------------------------------------------- 3. decode steps
def step_points(args, sweeps: list[dict]) -> list[dict]:
    import bench_decode as bd  # the sibling benchmark: model, cache, compiled + graph-captured step, profile

    bargs = SimpleNamespace(device="cuda", dtype="bf16", warmup=args.warmup, steps=args.steps, bandwidth=args.bandwidth)
    bd.PROFILE["steps"] = args.profile
    best = {s["rows"]: (s["best"]["gate_up_config"], s["best"]["down_config"]) for s in sweeps if "best" in s}
    available, default_rule = moe_decode.available, moe_decode.choose_config

    def swept_rule(n_rows, n_experts, out_cols, reduce_dim, n_sm):  # the sweep's best at this N (else the default)
        if n_rows not in best:
            return default_rule(n_rows, n_experts, out_cols, reduce_dim, n_sm)
        up, down = best[n_rows]
        return moe_decode.LaunchConfig(**(up if out_cols == SMALL["width"] else down))

    settings = [("grouped_mm (before)", lambda *a: False, default_rule),
                ("kernels, default launch", available, default_rule)]
    if best:
        settings.append(("kernels, swept launch", available, swept_rule))
    cfg = bd.variant_config("mla_absorb", "small", args.context + args.warmup + args.steps + 72)
    model = bd.build_model("mla_absorb", cfg, "cuda", torch.bfloat16)
    rows = []
    for batch, (label, avail, rule) in itertools.product(args.batches, settings):
        moe_decode.available, moe_decode.choose_config = avail, rule
        torch._dynamo.reset()  # the step is compiled again with this setting
        try:
            row = bd.bench_point(model, "mla_absorb", batch, args.context, bargs, "compiled")
        finally:
            moe_decode.available, moe_decode.choose_config = available, default_rule
        row["setting"] = label
        rows.append(row)
        if row.get("status") != "ok":
            print(f"step {label} batch {batch}: {row.get('status')}", flush=True)
            continue
        print(bd.describe_step(row, f"{label} batch {batch} ctx {args.context}"), flush=True)
    del model
    bd.free_memory()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="tokens per step (rows = batch x top-k)")
    ap.add_argument("--crossover", type=int, nargs="*", default=[1, 8, 32, 64, 128, 170, 256, 512],
                    help="batches of part 2 (none: skip it)")
    ap.add_argument("--block-n", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--block-k", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--block-m", type=int, nargs="+", default=[16])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--reps", type=int, default=50, help="calls per timed CUDA graph")
    ap.add_argument("--no-step", action="store_true", help="the kernels only (parts 1 and 2)")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens in the decode steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", type=int, default=3, help="profiled replays per step point")
    ap.add_argument("--bandwidth", type=float, default=4.3, help="TB/s for the floor (H200)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script under TRITON_INTERPRET=1: tiny shapes, one config, no steps")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()
    if args.smoke:
        if not runtime.INTERPRET or runtime.triton is None:
            print("error: --smoke runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        shape, device, args.no_step, args.reps = TINY, torch.device("cpu"), True, 1
        args.batches, args.crossover = [1, 4], [1, 8]
        args.block_n, args.block_k, args.block_m, args.warps, args.stages = [16], [32], [16], [4], [2]
        name, n_sm = "cpu (Triton interpreter)", moe_decode._sm_count(device)
    elif not torch.cuda.is_available() or runtime.triton is None:
        print("error: the benchmark needs a CUDA GPU and Triton (--smoke checks the script on CPU)", file=sys.stderr)
        return 2
    else:
        shape, device = SMALL, torch.device("cuda")
        name, n_sm = torch.cuda.get_device_name(), moe_decode._sm_count(device)
    print(f"# {name} ({n_sm} SMs), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}; experts {shape}",
          flush=True)
    sweeps = [sweep(batch, args, shape, device) for batch in args.batches]
    cross = crossover(args.crossover, args, shape, device) if args.crossover else []
    steps = [] if args.no_step else step_points(args, sweeps)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": name, "sms": n_sm, "torch": torch.__version__,
                                             "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv, "shape": shape,
                                             "bandwidth_tbps": args.bandwidth, "sweeps": sweeps, "crossover": cross,
                                             "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
