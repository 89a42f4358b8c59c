"""Training throughput: deepseek-mini against transformers' DeepseekV2ForCausalLM, same shape, same GPU.

    python scripts/bench/bench_train.py                       # every variant below, `small` shape, 16 x 1024
    python scripts/bench/bench_train.py --variants ours,hf_grouped_bf16_compile --steps 30
    python scripts/bench/bench_train.py --variants ours@default,ours@reduce-overhead --profile-steps 3

A variant may name a torch.compile mode after "@" (default, reduce-overhead = + CUDA graphs,
max-autotune-no-cudagraphs, max-autotune); without one, --compile-mode applies to our compiled variants.

Each variant runs in a fresh subprocess (its own memory peak and compile cache). Warm-up steps
(compilation included) are excluded; the timed window ends with a device synchronisation. MFU counts
6 x active parameters + the attention term (deepseek_mini.flops_per_token), the same formula for
every variant, against --peak-tflops (798: the measured bf16 matmul ceiling of our H100).

Variants
  ours                 the real thing: Lightning Trainer + TextDataModule on --data (Gutenberg),
                       bf16-mixed with fp32 master weights, torch.compile, the Triton AdamW step (--fused),
                       weight matrices in bf16 with their fp32 masters in the optimizer (--bf16-weights),
                       AdamW moments stored as --moments-dtype
  ours_raw             the same model and optimizer in a plain PyTorch loop on random tokens
  ours_raw_eager       ... without torch.compile
  ours_dense, ours_mha the dense-FFN and MHA baselines at matched active parameters (plain loop, compiled)
  hf_eager_fp32        transformers, experts loop, fp32 weights + bf16 autocast
  hf_grouped_fp32      transformers, grouped_mm experts, fp32 weights + bf16 autocast
  hf_grouped_bf16      transformers, grouped_mm experts, bf16 weights
  hf_grouped_bf16_compile   ... and torch.compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root; this file's folder (harness.py) is on sys.path already

OURS = ["ours", "ours_raw", "ours_raw_eager", "ours_dense", "ours_mha"]
PEER = ["hf_eager_fp32", "hf_grouped_fp32", "hf_grouped_bf16", "hf_grouped_bf16_compile"]


def split_variant(name: str, default_mode: str) -> tuple[str, str]:
    """"ours@reduce-overhead" -> ("ours", "reduce-overhead"); "ours" -> ("ours", default_mode)."""
    base, _, mode = name.partition("@")
    return base, mode or default_mode


def parse_fused(value: str):
    """--fused / --bf16-weights as LitDeepSeek's optim config takes them: "true"/"false" -> bool, else as is."""
    return {"true": True, "false": False}.get(value, value)


def small_config(variant: str):
    from deepseek_mini import ModelConfig

    name = {"ours_dense": "small_dense", "ours_mha": "small_mha"}.get(variant, "small")
    return ModelConfig.preset(name)


def hf_model(variant: str, cfg):
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from deepseek_mini.interop.hf import config_to_hf

    # the exact transformers equivalent of our config (deepseek_mini.interop.hf, checked logit-for-logit in tests/test_hf.py)
    hf_cfg = DeepseekV2Config.from_dict(config_to_hf(cfg), attn_implementation="sdpa")
    hf_cfg._experts_implementation = "eager" if variant == "hf_eager_fp32" else "grouped_mm"
    model = DeepseekV2ForCausalLM(hf_cfg)
    if "bf16" in variant:
        model = model.to(torch.bfloat16)
    return model


def run_plain_loop(variant: str, args, mode: str) -> dict:
    """Plain PyTorch training loop on random tokens (ours_raw*, baselines and the transformers peer)."""
    import torch
    from harness import kernel_breakdown

    from deepseek_mini import DeepSeekV2, flops_per_token
    from deepseek_mini.optim.clip import clip_in_fused_step
    from deepseek_mini.optim.policy import build_adamw
    from deepseek_mini.optim.precision import bf16_weight_parameters, bf16_weights_on

    torch.manual_seed(0)
    cfg = small_config(variant)
    dev = torch.device("cuda")
    if args.sdpa != "auto":  # restrict SDPA to one kernel family, to compare them
        torch.backends.cuda.enable_cudnn_sdp(args.sdpa == "cudnn")
        torch.backends.cuda.enable_flash_sdp(args.sdpa == "flash")
        torch.backends.cuda.enable_mem_efficient_sdp(args.sdpa == "efficient")
    if variant.startswith("hf_"):
        model = hf_model(variant, cfg).to(dev)
    else:
        model = DeepSeekV2(cfg).to(dev)
    # ours: the AdamW LitDeepSeek builds for --fused; the peer: torch's fused kernel
    fused = True if variant.startswith("hf_") else parse_fused(args.fused)
    opt = build_adamw(model.parameters(), fused, on_cuda=True, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                      moments="float32" if variant.startswith("hf_") else args.moments_dtype)
    if not variant.startswith("hf_") and bf16_weights_on(parse_fused(args.bf16_weights), opt, on_cuda=True,
                                                         bf16_autocast=True, single_device=True):
        opt.keep_fp32_masters(bf16_weight_parameters(model))  # as LitDeepSeek does on one GPU
    compiled = variant in ("ours_raw", "ours_dense", "ours_mha", "hf_grouped_bf16_compile")
    if variant.startswith("hf_"):
        mode = "default"
    fwd = torch.compile(model, mode=None if mode == "default" else mode) if compiled else model
    cudagraphs = compiled and mode in ("reduce-overhead", "max-autotune")
    autocast = not variant.endswith("bf16") and not variant.endswith("bf16_compile")
    B, T = args.batch_size, args.seq_len
    data = torch.randint(0, cfg.vocab_size, (8, B, T + 1), device=dev)

    def step(i):
        batch = data[i % data.shape[0]]
        x, y = batch[:, :-1], batch[:, 1:]
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if variant.startswith("hf_"):
                loss = fwd(input_ids=x, labels=None).logits.float()
                loss = torch.nn.functional.cross_entropy(loss.view(-1, loss.shape[-1]), y.reshape(-1))
            else:
                out = fwd(x, labels=y, return_logits=False)
                loss = out.loss + out.aux_loss
        loss.backward()
        # ours: clipping folded into the fused AdamW step, as LitDeepSeek does; the peer clips the usual way
        if variant.startswith("hf_") or clip_in_fused_step(opt, model.parameters(), 1.0) is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.grad_scale = None
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone()  # a CUDA-graph output is overwritten by the next replay

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tps = args.steps * B * T / elapsed
    res = {"tokens_per_sec": tps, "step_ms": 1000 * elapsed / args.steps,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s,
           "flops_per_token": flops_per_token(cfg, T), "final_loss": float(loss)}
    if args.profile_steps:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for i in range(args.profile_steps):
                step(i)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        res["profile"] = kernel_breakdown(prof, args.profile_steps)
        res["profile"]["wall_ms_per_step_profiled"] = 1000 * wall / args.profile_steps
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60)
            (Path(args.profile) / f"profile_{variant}_{mode}.txt").write_text(table)
    return res


def run_lightning(variant: str, args, mode: str) -> dict:
    """The project's own training step: Lightning Trainer + TextDataModule on real text."""
    import torch
    from harness import lightning_throughput

    from deepseek_mini import flops_per_token

    cfg = small_config(variant)
    res = lightning_throughput(cfg, data_files=args.data, val_files=args.val_data, batch_size=args.batch_size,
                               seq_len=args.seq_len, warmup=args.warmup, steps=args.steps,
                               cache_dir=args.cache_dir, compile=mode, profile_steps=args.profile_steps,
                               sync_debug=args.sync_debug, fused=parse_fused(args.fused),
                               bf16_weights=parse_fused(args.bf16_weights), moments_dtype=args.moments_dtype)
    res.update(variant=variant, flops_per_token=flops_per_token(cfg, args.seq_len),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    return res


def child(name: str, args) -> None:
    variant, mode = split_variant(name, args.compile_mode)
    res = run_lightning(variant, args, mode) if variant == "ours" else run_plain_loop(variant, args, mode)
    res["variant"], res["compile_mode"] = name, mode
    print("RESULT " + json.dumps(res), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(OURS + PEER))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--peak-tflops", type=float, default=798.0)
    p.add_argument("--data", default=".data/gutenberg_classics_train.txt.gz")
    p.add_argument("--val-data", default=".data/gutenberg_classics_valid.txt")
    p.add_argument("--cache-dir", default=".cache/deepseek_mini")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--sdpa", default="auto", choices=["auto", "cudnn", "flash", "efficient"])
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="torch.compile mode of our compiled variants (a variant's @mode overrides it)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing, profile this many steps and print GPU time per step by kernel category")
    p.add_argument("--profile", default=None, help="folder for the full torch.profiler table per variant")
    p.add_argument("--fused", default="auto", choices=["auto", "triton", "true", "false"],
                   help="our AdamW step (optim.fused): auto = Triton on CUDA; true = torch's fused kernel")
    p.add_argument("--bf16-weights", default="auto", choices=["auto", "true", "false"],
                   help="ours: weight matrices in bf16 with fp32 masters in the AdamW (optim.bf16_weights)")
    p.add_argument("--moments-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="ours: storage of the AdamW moments (optim.moments_dtype); auto = bfloat16 with the Triton step")
    p.add_argument("--sync-debug", action="store_true",
                   help="ours: record every host sync of one warm step (with the Python stack that caused it)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per variant subprocess")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"device: {device}; torch {torch.__version__}; batch {args.batch_size} x {args.seq_len}", flush=True)
    results = []
    for variant in args.variants.split(","):
        passed = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in vars(args).items()
                  if v is not None and v is not False and k not in ("variants", "child", "out")]
        cmd = [sys.executable, __file__, "--child", variant, *passed]
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"") + (e.stderr or b"")
            proc = subprocess.CompletedProcess(cmd, -9, stdout="", stderr=out.decode(errors="replace")
                                               if isinstance(out, bytes) else str(out))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stdout + proc.stderr)[-3000:]
            print(f"[{variant}] FAILED (rc {proc.returncode}) after {time.time() - start:.0f}s:\n{tail}", flush=True)
            results.append({"variant": variant, "error": tail[-500:]})
            continue
        res = json.loads(line[len("RESULT "):])
        res["mfu"] = res["flops_per_token"] * res["tokens_per_sec"] / (args.peak_tflops * 1e12)
        results.append(res)
        print(f"[{variant}] {res['tokens_per_sec']:,.0f} tok/s  MFU {100 * res['mfu']:.1f}%  "
              f"peak {res['peak_gib']:.1f} GiB  loss {res.get('final_loss', float('nan')):.3f}  "
              f"({time.time() - start:.0f}s)", flush=True)
        if "profile" in res:
            prof = res["profile"]
            print(f"  profiled: {prof['wall_ms_per_step_profiled']:.1f} ms/step wall, "
                  f"{prof['gpu_ms_per_step']:.1f} ms/step of GPU kernels", flush=True)
            for cat, ms in prof["by_category_ms"].items():
                print(f"    {cat:<26} {ms:7.2f} ms", flush=True)
            for k in prof["top_kernels"][:12]:
                print(f"    {k['ms_per_step']:7.2f} ms x{k['calls_per_step']:.0f} [{k['category']}] {k['name'][:90]}",
                      flush=True)
            if "gpu_idle_ms_per_step" in prof:
                print(f"  GPU idle {prof['gpu_idle_ms_per_step']:.2f} ms/step of a {prof['gpu_span_ms_per_step']:.1f} ms "
                      f"span ({prof.get('kernels_per_step', 0):.0f} kernels per step; "
                      f"{prof.get('idle_in_short_gaps_ms_per_step', 0):.2f} ms in gaps under 10 us); longest gaps:",
                      flush=True)
                for g in prof["idle_gaps"][:8]:
                    print(f"    {g['gap_ms']:6.2f} ms after {g['after'][:40]} before {g['before'][:40]}; host: "
                          f"{', '.join(g['host'])[:150]}", flush=True)
        for site, n in res.get("host_syncs", {}).items():
            print(f"  host sync x{n}: {site}", flush=True)
    ok = [r for r in results if "error" not in r]
    peers = [r for r in ok if r["variant"].startswith("hf_")]
    best_peer = max(peers, key=lambda r: r["tokens_per_sec"]) if peers else None
    print(f"\n| variant | tokens/s | MFU (of {args.peak_tflops:.0f} TFLOP/s) | peak GiB | vs best peer |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | failed | | | |")
            continue
        ratio = f"{r['tokens_per_sec'] / best_peer['tokens_per_sec']:.2f}x" if best_peer else "-"
        print(f"| {r['variant']} | {r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | {ratio} |")
    if best_peer:
        print(f"\nbest peer: {best_peer['variant']} ({best_peer['tokens_per_sec']:,.0f} tok/s, "
              f"{best_peer['peak_gib']:.1f} GiB)")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(args),
                                              "results": results}, indent=2))


if __name__ == "__main__":
    main()
