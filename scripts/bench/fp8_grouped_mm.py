"""FP8 (e4m3, rowwise scales) grouped GEMMs for the routed experts, against the bf16 ones the training step runs.

    python scripts/bench/fp8_grouped_mm.py                      # `small`, 16 x 1024 tokens -> docs/bench/*.json
    python scripts/bench/fp8_grouped_mm.py --preset small --batch 16 --seq-len 1024 --out fp8.json

Issue 23 lists FP8 rowwise grouped GEMMs as a lever to measure before building an opt-in. This measures the lever
itself, before any training code: each grouped GEMM of one MoE layer's training step at the model's shape (the
two forward products and their input gradients: [rows, K] x [experts, K, out] with the rows sorted by expert, as
model/moe.grouped_mm runs them), in bf16 (F.grouped_mm) and in FP8 (torch._scaled_grouped_mm, Hopper's rowwise
CUTLASS kernel, fast accumulation), the FP8 one timed alone and with the quantization a training step would pay:
the activation's rowwise scale and cast, and the weight's, once per step for each of its two layouts (the forward
reads W[e] by output column, the input gradient by input column). Quantizing is torch.compile'd (one reduction and
one cast per operand, what Inductor makes of it). The weight gradients (the [K, rows] x [rows, out] products over
each expert's rows) would need per-expert scales along the rows; they are left in bf16 here and timed for
reference. Both kernels get the weight column-major, the layout the FP8 kernel requires (the bf16 input gradients
of the training step read it row-major instead). Routing: the top-k of random logits (about balanced). GPU
time: the median of --reps means of 10 back-to-back calls after --warmup (gpu_timing.py; until 2026-12-01 07:30 UTC
one call per pair of events, which also timed the host's launch of each call).

A CUDA GPU with FP8 tensor cores (sm_89+; the grouped kernel needs sm_90). The JSON has the device, the command
and every timing; docs/benchmarks.md reads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpu_timing import expert_rows, gpu_median_ms, record, shape_parser, write  # noqa: E402  (this folder, on sys.path)

from deepseek_mini.config import PRESETS, ModelConfig  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def expert_gemms(cfg: ModelConfig, tokens: int) -> list[dict]:
    """The grouped GEMMs of one MoE layer's routed experts at `tokens` tokens: rows = tokens x top-k assignments.
    K is the contracted width, out the product's width; `weight` names the stacked weight and how it is read."""
    n, d, i = tokens * cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    return [
        {"name": "forward gate+up", "rows": n, "K": d, "out": 2 * i, "weight": "gate_up_proj [E, 2I, D], by row"},
        {"name": "forward down", "rows": n, "K": i, "out": d, "weight": "down_proj [E, D, I], by row"},
        {"name": "input grad of down", "rows": n, "K": d, "out": i, "weight": "down_proj [E, D, I], by column"},
        {"name": "input grad of gate+up", "rows": n, "K": 2 * i, "out": d, "weight": "gate_up_proj [E, 2I, D], by column"},
    ]


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 values, fp32 scales [...]) with x ~= values * scale[..., None]: each row's absolute maximum
    maps to the largest e4m3 value (rows of zeros get scale 1)."""
    amax = x.abs().amax(dim=-1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def measure(g: dict, experts: int, offs: torch.Tensor, warmup: int, reps: int) -> dict:
    rows, k, out = g["rows"], g["K"], g["out"]
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, out, k, device="cuda", dtype=torch.bfloat16) / k**0.5  # nn.Linear-style [E, out, K]
    w_t = w.transpose(-2, -1)  # [E, K, out], column-major: the operand both kernels want
    quant = torch.compile(quantize_rowwise, dynamic=False)
    res = {**g, "experts": experts}
    ref = F.grouped_mm(x.float(), w_t.float(), offs=offs)  # fp32 reference
    bf16 = F.grouped_mm(x, w_t, offs=offs)
    res["bf16_ms"] = gpu_median_ms(lambda: F.grouped_mm(x, w_t, offs=offs), warmup, reps)
    res["bf16_rel_err"] = float((bf16.float() - ref).norm() / ref.norm())
    flops = 2 * rows * k * out
    res["bf16_tflops"] = flops / res["bf16_ms"] / 1e9
    try:
        xq, xs = quant(x)
        wq, ws = quant(w)  # per (expert, output column): scales [E, out], values [E, out, K]
        wq_t = wq.transpose(-2, -1)

        def fp8():
            return torch._scaled_grouped_mm(xq, wq_t, xs, ws, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True)

        def fp8_with_quantization():
            a, a_s = quant(x)
            b, b_s = quant(w)
            return torch._scaled_grouped_mm(a, b.transpose(-2, -1), a_s, b_s, offs=offs, out_dtype=torch.bfloat16,
                                            use_fast_accum=True)

        y = fp8()
        res["fp8_rel_err"] = float((y.float() - ref).norm() / ref.norm())
        res["fp8_ms"] = gpu_median_ms(fp8, warmup, reps)
        res["fp8_tflops"] = flops / res["fp8_ms"] / 1e9
        res["fp8_quantized_ms"] = gpu_median_ms(fp8_with_quantization, warmup, reps)
        res["quantize_x_ms"] = gpu_median_ms(lambda: quant(x), warmup, reps)
        res["quantize_w_ms"] = gpu_median_ms(lambda: quant(w), warmup, reps)
    except Exception as e:  # noqa: BLE001 - recorded, not hidden: the JSON says why FP8 did not run
        res["fp8_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return res


def weight_grad_ms(cfg: ModelConfig, tokens: int, offs: torch.Tensor, warmup: int, reps: int) -> list[dict]:
    """The two weight gradients in bf16 (grad^T x over each expert's rows), for reference."""
    n, d, i = tokens * cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    out = []
    for name, a_cols, b_cols in (("weight grad of gate+up", 2 * i, d), ("weight grad of down", d, i)):
        grad = torch.randn(n, a_cols, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(n, b_cols, device="cuda", dtype=torch.bfloat16)
        ms = gpu_median_ms(lambda g=grad, a=x: F.grouped_mm(g.t(), a, offs=offs), warmup, reps)
        out.append({"name": name, "rows": n, "K": n, "out": f"{a_cols}x{b_cols}", "bf16_ms": ms,
                    "bf16_tflops": 2 * n * a_cols * b_cols / ms / 1e9})
    return out


def main(argv=None) -> int:
    args = shape_parser(__doc__.split("\n\n")[0], "fp8_grouped_mm", reps=50).parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_grouped_mm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    cfg = ModelConfig(**PRESETS[args.preset])
    tokens = args.batch * args.seq_len
    torch.manual_seed(0)
    offs, _ = expert_rows(tokens * cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.num_experts_per_tok, "cuda")
    gemms = [measure(g, cfg.n_routed_experts, offs, args.warmup, args.reps) for g in expert_gemms(cfg, tokens)]
    wgrads = weight_grad_ms(cfg, tokens, offs, args.warmup, args.reps)
    result = record(args, gemms=gemms, weight_grads_bf16=wgrads)
    fwd_dgrad = [g for g in gemms if "fp8_ms" in g]
    if len(fwd_dgrad) == len(gemms):
        result["per_layer_ms"] = {k: round(sum(g[k] for g in gemms), 4) for k in ("bf16_ms", "fp8_ms", "fp8_quantized_ms")}
    for g in gemms + wgrads:
        line = f"{g['name']:>24}: bf16 {g['bf16_ms']:.3f} ms ({g['bf16_tflops']:.0f} TFLOP/s)"
        if "fp8_ms" in g:
            line += (f", fp8 {g['fp8_ms']:.3f} ms ({g['fp8_tflops']:.0f}), with quantization {g['fp8_quantized_ms']:.3f}"
                     f" ms; rel. error bf16 {g['bf16_rel_err']:.1e}, fp8 {g['fp8_rel_err']:.1e}")
        elif "fp8_error" in g:
            line += f", fp8 failed: {g['fp8_error']}"
        print(line)
    if "per_layer_ms" in result:
        print(f"per MoE layer (forward + input grads): {result['per_layer_ms']}")
    write(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
