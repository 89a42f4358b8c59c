"""Decode benchmark: MLA (absorbed), MLA (naive: K/V rebuilt from the latents every step) and MHA at the `small`
shape, bf16, random weights, on one GPU.

    python scripts/bench/bench_decode.py --out bench_decode.json                 # batch 1, 32 x context 1K, 8K, 32K
    python scripts/bench/bench_decode.py --peer                                  # + transformers DeepseekV2 generate
    python scripts/bench/bench_decode.py --device cpu --tiny --steps 2           # CPU smoke test (tests/)
    python scripts/bench/bench_decode.py --ckpt <run>/checkpoints/last.ckpt --prompt-file book.txt --out spec.json
                                                              # plain vs MTP-speculative decode of a trained model

For each (variant, batch, context): a static cache of batch x (context + steps) tokens is allocated and its first
`context` positions are filled with random latents / K / V (no 32K prefill through the naive path), then decode
steps run at positions context, context + 1, ... and are timed with CUDA events after warm-up. Two ways to run a
step:
* eager   model(tok[:, None], cache=cache, start_pos=pos): the model's own decode (the cache slice grows).
* graph   a static-shape step written here (attend over the whole preallocated cache with a position mask, cache
          writes by index_copy_ at a device-side position), captured once in a CUDA graph and replayed.
          Same math as the model's decode; checked against eager in the CPU smoke test. (Both are in decode_step.py.)
Every variant runs inside DeepSeekV2.folded_weights(), as generate() decodes; mla_absorb_unfolded and mha_unfolded
are the same models without it (--variants mla_absorb mla_absorb_unfolded: what folding buys, in one invocation).
With --ckpt (a checkpoint trained with model.num_nextn_predict_layers >= 1, read by the verified loader) the
benchmark is generate() itself, greedy by default: for each batch, plain absorbed decode and self-speculative
decode (model/speculative.py) each generate --gen-tokens tokens after the same prompts (--prompt-tokens tokens per
row, consecutive windows of --prompt-file, so acceptance is measured on real text); tokens/s counts generated
tokens over the decode time (the prefill, timed by generating one token, is subtracted). Rows add the acceptance
rate per draft depth, tokens per verification, and whether the two outputs agree token for token.

Each row reports step latency, tokens/s (= batch / step), the KV cache (formula), the bytes a step must read (active
weights + the cache up to the current position), the bandwidth floor (those bytes at --bandwidth, the measured
3.0 TB/s device copy), the achieved GB/s and step / floor.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from decode_step import (  # noqa: E402  (this folder, on sys.path when the script runs)
    PROFILE,
    Timer,
    check_folded_matches_unfolded,
    check_fused_kernel,
    check_static_matches_eager,
    compiled_step,
    eager_step,
    fill_cache,
    time_eager,
    time_graph,
)

from deepseek_mini.config import ModelConfig, count_parameters  # noqa: E402
from deepseek_mini.model import DeepSeekV2  # noqa: E402

VARIANTS = {  # name -> (preset suffix, MLA decode mode, inside DeepSeekV2.folded_weights() as generate() decodes)
    "mla_absorb": ("", "absorb", True),
    "mla_naive": ("", "naive", True),
    "mha": ("_mha", None, True),
    # the same models without the folded weights (the absorption as two products per step, the concatenations
    # copied at every step): to measure what folding buys in the same invocation
    "mla_absorb_unfolded": ("", "absorb", False),
    "mha_unfolded": ("_mha", None, False),
}
DEFAULT_VARIANTS = ["mla_absorb", "mla_naive", "mha"]


# ---------------------------------------------------------------------- models and caches
def variant_config(variant: str, shape: str, max_len: int) -> ModelConfig:
    suffix = VARIANTS[variant][0]
    base = ModelConfig.preset(shape + suffix)
    return base.replace(max_position_embeddings=max(base.max_position_embeddings, max_len))


def build_model(variant: str, cfg: ModelConfig, device, dtype, seed: int = 0) -> DeepSeekV2:
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepSeekV2(cfg)
    model = model.to(dtype).eval()
    mode = VARIANTS[variant][1]
    if mode is not None:
        model.set_mla_decode(mode)
    return model


# ---------------------------------------------------------------------- bytes and floors
def weight_bytes_per_step(cfg: ModelConfig, batch: int, bytes_per_param: int = 2) -> float:
    """Weights a decode step must read: everything active except the embedding table (only `batch` rows), with the
    routed experts counted as the expected number of distinct experts `batch` tokens touch under uniform routing."""
    pc = count_parameters(cfg)
    dense = pc.total - pc.routed_experts - pc.embedding + batch * cfg.hidden_size
    experts = 0.0
    if cfg.is_moe:
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        touched = E * (1 - (1 - K / E) ** batch)
        experts = cfg.num_moe_layers * touched * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return (dense + experts) * bytes_per_param


def kv_bytes_read(cfg: ModelConfig, batch: int, tokens: float, elem: int = 2) -> float:
    return cfg.kv_cache_bytes_per_token(elem) * batch * tokens


def inductor_options(pairs: list[str]) -> dict:
    """["max_autotune=True", ...] -> {"max_autotune": True, ...}, each key checked against Inductor's options (dotted
    ones such as triton.cudagraphs included)."""
    import ast

    from torch._inductor import config as inductor_config

    known = inductor_config.get_config_copy()
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{pair!r}: expected KEY=VALUE with KEY an Inductor config option")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{pair!r}: the value is not a Python literal") from None
    return out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def folding(model, variant: str):
    """The variant's weights: folded as generate() decodes (DeepSeekV2.folded_weights), or not."""
    return model.folded_weights() if VARIANTS[variant][2] else contextlib.nullcontext()


def time_mode(model, cache, batch, ctx, args, mode, max_len) -> float:
    if mode == "eager":
        return time_eager(model, cache, batch, ctx, args.steps, args.warmup, args.device)
    if mode == "graph":
        return time_graph(model, cache, batch, ctx, args.steps, args.warmup, args.device, max_len)
    # "compiled": torch.compile fuses the per-step glue, then the compiled step is graph-captured
    return time_graph(model, cache, batch, ctx, args.steps, args.warmup, args.device, max_len,
                      step_fn=compiled_step(args.inductor))


def bench_point(model, variant, batch, ctx, args, mode) -> dict:
    cfg = model.config
    device = args.device
    max_len = -(-(ctx + args.warmup + args.steps + 8) // 64) * 64  # 64-aligned: SDPA mask rows stay aligned
    row = {"variant": variant, "mode": mode, "batch": batch, "context": ctx}
    elem = 2 if args.dtype == "bf16" else 4
    kv_total = cfg.kv_cache_bytes_per_token(elem) * batch * max_len
    row["kv_bytes"] = int(kv_total)
    cache = None
    try:
        cache = model.new_cache(batch, max_len, device=device)
        fill_cache(cache, ctx + args.warmup + 4)
        with folding(model, variant):
            ms = time_mode(model, cache, batch, ctx, args, mode, max_len)
        if mode == "compiled":
            row["inductor"] = args.inductor
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
        return row
    except Exception as e:  # a graph that fails to capture: record it and go on with the other points
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        return row
    finally:
        del cache
        free_memory()
    # bytes a step reads: weights + the cache up to the mean timed position (absorbed MLA reads the latents;
    # the naive path also reads them once but then writes and reads the rebuilt K/V: it is not at its floor)
    mean_pos = ctx + args.warmup + (args.steps + 1) / 2
    w = weight_bytes_per_step(cfg, batch, elem)
    kv = kv_bytes_read(cfg, batch, mean_pos, elem)
    floor_ms = (w + kv) / (args.bandwidth * 1e12) * 1e3
    row.update(status="ok", step_ms=ms, tokens_per_s=batch / ms * 1e3, weight_bytes=int(w), kv_read_bytes=int(kv),
               floor_ms=floor_ms, achieved_gbps=(w + kv) / (ms * 1e-3) / 1e9, step_over_floor=ms / floor_ms)
    if "last" in PROFILE:
        row["profile"] = PROFILE.pop("last")
    return row


# ---------------------------------------------------------------------- capacity
def profile_lines(p: dict, top: int = 8) -> list[str]:
    """A decode step's profile (harness.kernel_breakdown): GPU time by kernel category, idle time and kernel count,
    then one line for each of the `top` kernels."""
    cats = ", ".join(f"{c} {ms:.3f}" for c, ms in p.get("by_category_ms", {}).items())
    return [f"GPU kernels {p.get('gpu_ms_per_step', 0):.3f} ms, idle {p.get('gpu_idle_ms_per_step', 0):.3f} ms, "
            f"{p.get('kernels_per_step', 0):.0f} kernels: {cats}",
            *(f"      {k['ms_per_step']:.3f} ms x{k['calls_per_step']:.0f} {k['name'][:110]}"
              for k in p.get("top_kernels", [])[:top])]


def describe_step(row: dict, label: str, top: int = 8) -> str:
    """A profiled decode step as printed lines: its time against the floor, then its profile (profile_lines; the
    tuning scripts print every setting they time this way)."""
    first, *kernels = profile_lines(row.get("profile", {}), top)
    return "\n".join([f"step {label}: {row['step_ms']:.3f} ms ({row['step_over_floor']:.2f}x floor "
                      f"{row['floor_ms']:.3f} ms) | {first}", *kernels])


def capacity(models: dict, args) -> list[dict]:
    """Largest batch x context that fits: free memory after the weights / KV bytes per token, for MLA and MHA;
    one point (batch 32) verified by allocating 90% of it and running a decode step."""
    out = []
    for variant in ("mla_absorb", "mha"):
        model = models.get(variant)
        if model is None:
            continue
        free_memory()
        cfg = model.config
        per_token = cfg.kv_cache_bytes_per_token(2 if args.dtype == "bf16" else 4)
        if torch.device(args.device).type == "cuda":
            free = torch.cuda.mem_get_info()[0] - args.reserve_gib * 2**30
        else:
            free = 2**30  # CPU smoke: pretend 1 GiB
        tokens = int(free // per_token)
        row = {"variant": variant, "kv_bytes_per_token": per_token, "free_bytes": int(free), "max_tokens": tokens}
        batch = 32
        ctx = int(0.9 * tokens / batch) // 256 * 256
        row["verify_batch"], row["verify_context"] = batch, ctx
        cache = None
        try:
            # allocating is the test of fitting; the decode step runs at the last position the rope table covers
            cache = model.new_cache(batch, ctx + 1, device=args.device)
            pos = min(ctx, cfg.max_position_embeddings - 1)
            eager_step(model, torch.zeros(batch, dtype=torch.long, device=args.device), cache, pos)
            if torch.device(args.device).type == "cuda":
                torch.cuda.synchronize()
            row["verified"] = f"allocated + 1 decode step at position {pos:,}"
        except torch.OutOfMemoryError:
            row["verified"] = "OOM"
        finally:
            del cache
            free_memory()
        out.append(row)
    if len(out) == 2:
        out[0]["vs_mha"] = out[0]["max_tokens"] / max(1, out[1]["max_tokens"])
    return out


# ---------------------------------------------------------------------- transformers peer
def peer_bench(cfg: ModelConfig, args) -> list[dict]:
    """transformers DeepseekV2ForCausalLM (bf16, grouped_mm experts, sdpa), greedy generate after a 1K prompt."""
    rows = []
    try:
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        from deepseek_mini.interop.hf import config_to_hf
    except ImportError as e:
        return [{"variant": "hf_peer", "status": f"error: {e}"}]
    prompt_len = min(1024, cfg.max_position_embeddings // 2)
    # the exact transformers equivalent of our config (deepseek_mini.interop.hf, checked logit-for-logit in tests/test_hf.py)
    hf_dict = config_to_hf(cfg)
    hf_dict["max_position_embeddings"] = prompt_len + 64
    hf_cfg = DeepseekV2Config.from_dict(hf_dict, attn_implementation="sdpa")
    hf_cfg._experts_implementation = "grouped_mm"
    with torch.device(args.device):
        model = DeepseekV2ForCausalLM(hf_cfg)
    model = model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32).eval()
    for batch in args.batches:
        row = {"variant": "hf_peer", "mode": "generate", "batch": batch, "context": prompt_len}
        try:
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=args.device)
            kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            with torch.no_grad():
                model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
                times = {}
                for n in (1, 1 + args.peer_tokens):  # prefill + first token, then the decode steps by difference
                    with Timer(args.device) as t:
                        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                    times[n] = t.ms
            ms = (times[1 + args.peer_tokens] - times[1]) / args.peer_tokens
            row.update(status="ok", step_ms=ms, tokens_per_s=batch / ms * 1e3)
        except torch.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        free_memory()
        rows.append(row)
    del model
    free_memory()
    return rows


# ---------------------------------------------------------------------- speculative decoding of a checkpoint
class BenchArgError(ValueError):
    """A bad --ckpt run argument: printed as one line `error: ...`, exit status 2."""


def speculative_prompts(tok, cfg: ModelConfig, args, batch: int, device) -> torch.Tensor:
    """[batch, prompt_tokens] ids: consecutive windows of --prompt-file's tokens (wrapping), or random ids."""
    n = args.prompt_tokens
    if args.prompt_file:
        ids = tok.encode(Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) < n:
            raise BenchArgError(f"--prompt-file={args.prompt_file}: {len(ids)} tokens, fewer than "
                             f"--prompt-tokens={n}")
        rows = [[ids[(b * n + i) % len(ids)] for i in range(n)] for b in range(batch)]
        return torch.tensor(rows, device=device)
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=torch.Generator().manual_seed(0)).to(device)


def timed_generate(model, prompts, n: int, speculative: bool, args, stats=None) -> tuple[torch.Tensor, float]:
    g = torch.Generator(device=args.device).manual_seed(0)
    with Timer(args.device) as t:
        out = model.generate(prompts, n, temperature=args.temperature, generator=g, speculative=speculative,
                             stats=stats)
    return out, t.ms


def speculative_bench(args, dtype) -> tuple[list[dict], dict]:
    from deepseek_mini.checkpoint import load_checkpoint
    from deepseek_mini.model.speculative import SpeculativeStats

    loaded = load_checkpoint(args.ckpt)
    cfg = loaded.config
    if not cfg.num_nextn_predict_layers:
        raise BenchArgError(f"--ckpt={args.ckpt}: the checkpoint has no MTP modules to draft with "
                         "(model.num_nextn_predict_layers=0)")
    if args.prompt_tokens + args.gen_tokens > cfg.max_position_embeddings:
        raise BenchArgError(f"--gen-tokens={args.gen_tokens}: --prompt-tokens + --gen-tokens exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    if args.prompt_file and loaded.tokenizer is None:
        raise BenchArgError(f"--prompt-file={args.prompt_file}: needs the tokenizer.json beside {args.ckpt}")
    model = loaded.model.to(device=args.device, dtype=dtype).eval()
    model.set_mla_decode("absorb")
    counts = count_parameters(cfg)
    info = {"ckpt": str(args.ckpt), "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
            "params_total": counts.total, "params_active": counts.active, "params_mtp": counts.mtp,
            "prompt_file": args.prompt_file, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
            "temperature": args.temperature}
    print(f"# {args.ckpt}: D={cfg.num_nextn_predict_layers} MTP modules, {counts.total / 1e6:.1f}M params "
          f"(+{counts.mtp / 1e6:.1f}M MTP), prompts {args.prompt_tokens} tokens"
          f"{' of ' + args.prompt_file if args.prompt_file else ' (random ids: acceptance means little)'}", flush=True)
    rows = []
    for batch in args.batches:
        prompts = speculative_prompts(loaded.tokenizer, cfg, args, batch, args.device)
        outs = {}
        for mode in ("plain", "speculative"):
            spec = mode == "speculative"
            row = {"variant": "ckpt", "mode": mode, "batch": batch, "context": args.prompt_tokens}
            try:
                timed_generate(model, prompts, min(8, args.gen_tokens), spec, args)  # warm-up
                _, prefill_ms = timed_generate(model, prompts, 1, spec, args)
                stats = SpeculativeStats()
                outs[mode], total_ms = timed_generate(model, prompts, args.gen_tokens, spec, args, stats)
                decode_ms = max(total_ms - prefill_ms, 1e-6)
                row.update(status="ok", total_ms=total_ms, prefill_ms=prefill_ms,
                           tokens_per_s=batch * (args.gen_tokens - 1) / decode_ms * 1e3,
                           step_ms=decode_ms / (args.gen_tokens - 1))
                if spec:
                    row.update(stats.as_dict())
            except torch.OutOfMemoryError:
                row["status"] = "OOM"
            rows.append(row)
            free_memory()
            rate = (f"{row['tokens_per_s']:,.0f} tok/s" if row["status"] == "ok" else row["status"])
            extra = (", acceptance per depth " + " ".join(rates(row["acceptance_per_depth"]))
                     + f", {row['tokens_per_round']:.2f} tokens/verification") if spec and row["status"] == "ok" else ""
            print(f"  {mode} batch {batch}: {rate}{extra}", flush=True)
        if len(outs) == 2:
            same = (outs["plain"] == outs["speculative"]).float().mean().item()
            rows[-1]["same_tokens_as_plain"] = same
            if rows[-2]["status"] == "ok":
                rows[-1]["speedup"] = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
    return rows, info


def rates(acceptance) -> list[str]:
    return [f"{a:.2f}" if a is not None else "-" for a in acceptance]


def speculative_markdown(rows: list[dict]) -> str:
    lines = ["| batch | mode | tokens/s | ms per token | acceptance per depth | tokens / verification | speed-up | "
             "same tokens as plain |", "|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['batch']} | {r['mode']} | {r.get('status')} | | | | | |")
            continue
        acc = " ".join(rates(r.get("acceptance_per_depth", [])))
        tpr = f"{r['tokens_per_round']:.2f}" if "tokens_per_round" in r else ""
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        same = f"{r['same_tokens_as_plain']:.1%}" if "same_tokens_as_plain" in r else ""
        lines.append(f"| {r['batch']} | {r['mode']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.3f} | {acc} | {tpr} | "
                     f"{speed} | {same} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- report
def gb(x) -> str:
    return f"{x / 1e9:.2f}" if x is not None else ""


def markdown(rows: list[dict], cap: list[dict], args) -> str:
    lines = [f"| variant | mode | batch | context | step ms | tokens/s | KV GB | read/step GB | floor ms "
             f"(@{args.bandwidth:.1f} TB/s) | achieved GB/s | step / floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r.get('mode', '')} | {r['batch']} | {r['context']} | "
                         f"{r.get('status')} | | {gb(r.get('kv_bytes'))} | | | | |")
            continue
        if "floor_ms" not in r:  # peer: latency only
            lines.append(f"| {r['variant']} | {r['mode']} | {r['batch']} | {r['context']} | {r['step_ms']:.3f} | "
                         f"{r['tokens_per_s']:,.0f} | | | | | |")
            continue
        lines.append(f"| {r['variant']} | {r['mode']} | {r['batch']} | {r['context']} | {r['step_ms']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {gb(r['kv_bytes'])} | {gb(r['weight_bytes'] + r['kv_read_bytes'])} | "
                     f"{r['floor_ms']:.3f} | {r['achieved_gbps']:,.0f} | {r['step_over_floor']:.2f} |")
    # headline comparisons: best mode per (variant, batch, context)
    best = {}
    for r in rows:
        if r.get("status") == "ok" and "floor_ms" in r:
            key = (r["variant"], r["batch"], r["context"])
            if key not in best or r["step_ms"] < best[key]["step_ms"]:
                best[key] = r
    lines += ["", "| batch | context | MLA absorb tok/s | MLA naive tok/s | MHA tok/s | absorb vs MHA | "
              "absorb step / floor |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for batch in args.batches:
        for ctx in args.contexts:
            a, n, m = (best.get((v, batch, ctx)) for v in ("mla_absorb", "mla_naive", "mha"))
            tps = lambda r: f"{r['tokens_per_s']:,.0f} ({r['mode']})" if r else "-"  # noqa: E731
            speed = f"{m['step_ms'] / a['step_ms']:.2f}x" if a and m else "-"
            lines.append(f"| {batch} | {ctx} | {tps(a)} | {tps(n)} | {tps(m)} | {speed} | "
                         f"{a['step_over_floor']:.2f} |" if a else f"| {batch} | {ctx} | - | {tps(n)} | {tps(m)} | - | - |")
    if cap:
        lines += ["", "| variant | KV B/token | free GB for cache | max batch x context tokens | verified (batch 32) |",
                  "|---|---:|---:|---:|---|"]
        for c in cap:
            lines.append(f"| {c['variant']} | {c['kv_bytes_per_token']:,.0f} | {gb(c['free_bytes'])} | "
                         f"{c['max_tokens']:,} | {c['verify_batch']} x {c['verify_context']:,}: {c.get('verified')} |")
        if "vs_mha" in cap[0]:
            lines.append(f"\nMLA fits {cap[0]['vs_mha']:.2f}x MHA's batch x context.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: tiny shape, contexts 16/32, batches 1/2")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768])
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=None, choices=["eager", "graph", "compiled"],
                    help="default: eager and graph on CUDA, eager on CPU")
    ap.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                    help="--modes compiled: Inductor options of the compiled step, e.g. max_autotune=True "
                         "coordinate_descent_tuning=True (values read as Python literals)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--bandwidth", type=float, default=3.0, help="TB/s for the floor (measured device copy)")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="memory kept back from the capacity estimate")
    ap.add_argument("--no-capacity", action="store_true")
    ap.add_argument("--peer", action="store_true", help="also time transformers DeepseekV2 generate (greedy)")
    ap.add_argument("--peer-tokens", type=int, default=8)
    ap.add_argument("--check", action="store_true", help="check graph-step math against eager (first point)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile N replays of each graph/compiled point; print GPU time by kernel category")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--ckpt", default=None, help="benchmark plain vs MTP-speculative generate() of this checkpoint")
    ap.add_argument("--prompt-file", default=None, help="--ckpt: text whose tokens make the prompts")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="--ckpt: prompt length per row")
    ap.add_argument("--gen-tokens", type=int, default=128, help="--ckpt: tokens generated per row")
    ap.add_argument("--temperature", type=float, default=0.0, help="--ckpt: 0 = greedy")
    args = ap.parse_args(argv)
    try:
        args.inductor = inductor_options(args.inductor)
    except ValueError as e:
        print(f"error: --inductor: {e}", file=sys.stderr)
        return 2
    PROFILE["steps"] = args.profile
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.modes = args.modes or (["eager", "graph"] if cuda else ["eager"])
    if "graph" in args.modes and not cuda:
        print("error: --modes graph needs CUDA", file=sys.stderr)
        return 2
    if args.tiny:
        args.shape = "tiny"
        if args.contexts == [1024, 8192, 32768]:
            args.contexts = [16, 32]
        if args.batches == [1, 32]:
            args.batches = [1, 2]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.ckpt:
        if args.gen_tokens < 2 or args.prompt_tokens < 1 or args.temperature < 0:
            print(f"error: --gen-tokens={args.gen_tokens} --prompt-tokens={args.prompt_tokens} --temperature="
                  f"{args.temperature}: need --gen-tokens >= 2, --prompt-tokens >= 1, --temperature >= 0", file=sys.stderr)
            return 2
        device_name = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"# speculative decode benchmark: {args.dtype}, {device_name}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
        from deepseek_mini.checkpoint import CheckpointError

        try:
            rows, info = speculative_bench(args, dtype)
        except (BenchArgError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                 "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv,
                                                 "args": vars(args), "checkpoint": info, "rows": rows}, indent=1))
        print("\n" + speculative_markdown(rows))
        return 0
    max_len = max(args.contexts) + args.warmup + args.steps + 72
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# decode benchmark: {args.shape} shape, {args.dtype}, {device_name}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)

    models, rows = {}, []
    for variant in args.variants:
        cfg = variant_config(variant, args.shape, max_len)
        models[variant] = model = build_model(variant, cfg, args.device, dtype)
        wb = weight_bytes_per_step(cfg, 1, 2 if args.dtype == "bf16" else 4)
        print(f"{variant}: {count_parameters(cfg).total / 1e6:.1f}M params, KV {cfg.kv_cache_bytes_per_token(2):,.0f}"
              f" B/token (bf16), weights read per step at batch 1: {wb / 1e6:.0f} MB", flush=True)
        if args.check:
            with folding(model, variant):
                err = check_static_matches_eager(model, args.device)
            print(f"  static step vs eager logits: max abs diff {err:.3g}", flush=True)
            if VARIANTS[variant][2]:
                err = check_folded_matches_unfolded(model, args.device)
                print(f"  folded vs unfolded weights, one decode step's logits: max rel diff {err:.3g}", flush=True)
            if VARIANTS[variant][1] == "absorb":
                err = check_fused_kernel(model, args.device)
                print(f"  fused Triton decode vs PyTorch absorbed decode: max rel diff {err:.3g}", flush=True)
        for batch in args.batches:
            for ctx in args.contexts:
                for mode in args.modes:
                    row = bench_point(model, variant, batch, ctx, args, mode)
                    rows.append(row)
                    status = (f"{row['step_ms']:.3f} ms/step, {row['tokens_per_s']:,.0f} tok/s, "
                              f"{row['step_over_floor']:.2f}x floor") if row.get("status") == "ok" else row["status"]
                    print(f"  {variant} {mode} batch {batch} context {ctx}: {status}", flush=True)
                    if "profile" in row:
                        first, *kernels = profile_lines(row["profile"])
                        print("\n".join([f"    {first}", *kernels]), flush=True)
        if variant != "mla_absorb" and variant != "mha":
            del models[variant]
        del model
        free_memory()

    cap = [] if args.no_capacity else capacity(models, args)
    models.clear()
    free_memory()
    if args.peer:
        rows += peer_bench(variant_config("mla_absorb", args.shape, max_len), args)
    table = markdown(rows, cap, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                             "date": time.strftime("%Y-%m-%d %H:%M"), "argv": sys.argv,
                                             "args": vars(args), "rows": rows, "capacity": cap}, indent=1))
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
