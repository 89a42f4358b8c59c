"""Triton grouped GEMMs that gather their rows in the kernel (ScatterMoE style), against the training step's CUTLASS
grouped GEMMs plus the separate gathers, at the model's shape.

    python scripts/bench/triton_grouped_mm.py                    # `small`, 16 x 1024 tokens -> docs/bench/*.json
    python scripts/bench/triton_grouped_mm.py --preset small --out triton_gmm.json

Issue 23 lists "fused gather + grouped GEMM + SwiGLU for the experts (ScatterMoE / SonicMoE style)" as a lever to
measure. The training step (model/moe.py) materialises the K copies of every token sorted by expert (a
[T*K, D] gather), multiplies them with torch's CUTLASS `grouped_mm`, and does the same for the output gradient in
the backward. Fusing the gathers into the GEMMs saves those copies only if a grouped GEMM that loads its rows by
index is about as fast as CUTLASS's on contiguous rows. This script measures exactly that, GEMM by GEMM of one MoE
layer's routed experts (the six products the step runs):

    forward gate+up   h = x[src] @ W_gu[e]^T            gathered rows (src = order // K)
    forward down      y = a @ W_d[e]^T
    input grad down   grad_a = grad_y[dst] @ W_d[e]     gathered rows (the output gradient's dispatch)
    input grad g+u    grad_x = grad_h @ W_gu[e]
    weight grads      grad_W_d[e] = grad_y[dst]^T a,  grad_W_gu[e] = grad_h^T x[src]   (sum over e's rows)

CUTLASS side: F.grouped_mm on the rows copied in expert order, and the two copies (x's rows and the output
gradient's rows; indexed copies, torch.compile'd as Inductor emits them) timed on their own: in the step each
copy feeds two products (a forward or input gradient, and a weight gradient). Triton side: kernels that read the
rows through the index, so no copy is made. Each Triton kernel is timed at a few tile configurations and the
best is kept (all are in the JSON). Routing: the top-k of random logits (about balanced). GPU time: the median of
--reps means of 10 back-to-back calls after --warmup (gpu_timing.py). Every result is checked against the fp32
reference before it is timed.

The kernels (fp32 accumulation, tl.dot; the rows by pointer loads, the weights and ungathered rows optionally as
TMA tiles, a config's "tma"):
* `_grouped_rows_mm`: C[n] = A[rows[n]] @ B[e(n)] for n in expert e's rows. Each program owns a BLOCK_M x BLOCK_N
  tile of one expert; the program -> (expert, tile) map is computed in the kernel from the cumulative offsets
  (tiles per expert summed with tl.cumsum), so the launch needs no host sync: the grid is the upper bound
  cdiv(N, BLOCK_M) + E tiles, and programs past the last expert's tiles return at once.
* `_grouped_wgrad`: C[e] = G[e's rows]^T @ A[rows[e's rows]], the contraction over each expert's own rows.
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
from deepseek_mini.kernels.runtime import tl, triton  # noqa: E402

if triton is not None:

    @triton.jit
    def _expert_of_tile(offs_ptr, tile_m, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
        """(the expert, the end of its rows, the tile's first row) of row-tile `tile_m`; expert E past the last tile."""
        eids = tl.arange(0, E_POW2)
        ends = tl.load(offs_ptr + eids, mask=eids < E, other=0)
        starts = tl.load(offs_ptr + eids - 1, mask=(eids > 0) & (eids < E), other=0)
        tiles = tl.where(eids < E, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
        cum = tl.cumsum(tiles, 0)
        e = tl.sum((cum <= tile_m).to(tl.int32))
        first_tile = tl.sum(tl.where(eids == e, cum - tiles, 0))
        row_start = tl.sum(tl.where(eids == e, starts, 0))
        row_end = tl.sum(tl.where(eids == e, ends, 0))
        return e, row_end, row_start + (tile_m - first_tile) * BLOCK_M

    @triton.jit
    def _grouped_rows_mm(a_ptr, a_desc, rows_ptr, b_ptr, b_desc, c_ptr, offs_ptr, K, N_OUT,
                         stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                         E: tl.constexpr, E_POW2: tl.constexpr, GATHER: tl.constexpr, B_TRANSPOSED: tl.constexpr,
                         TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n_tiles_n = tl.cdiv(N_OUT, BLOCK_N)
        pid = tl.program_id(0)
        tile_m, tile_n = pid // n_tiles_n, pid % n_tiles_n
        e, row_end, row0 = _expert_of_tile(offs_ptr, tile_m, E, E_POW2, BLOCK_M)
        if e >= E:
            return
        rows = row0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if GATHER:
            src = tl.load(rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        n0 = tile_n * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :]
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if TMA and not GATHER:  # rows past the expert's end are read too, and never stored
                a = a_desc.load([row0, k])
            else:
                a = tl.load(a_ptrs, mask=row_mask[:, None] & ((k + ks) < K)[None, :], other=0.0)
            if TMA:
                if B_TRANSPOSED:  # w [E, N_OUT, K] seen as [E * N_OUT, K]
                    b = b_desc.load([e * N_OUT + n0, k]).T
                else:  # w [E, K, N_OUT] seen as [E * K, N_OUT]
                    b = b_desc.load([e * K + k, n0])
            else:
                b = tl.load(b_ptrs, mask=((k + ks) < K)[:, None] & (cols < N_OUT)[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < N_OUT)[None, :])

    @triton.jit
    def _grouped_wgrad(g_ptr, g_desc, a_ptr, a_desc, rows_ptr, c_ptr, offs_ptr, P, Q, stride_gm, stride_am,
                       GATHER: tl.constexpr, TMA: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
        e = tl.program_id(1)
        n_tiles_q = tl.cdiv(Q, BLOCK_Q)
        tile_p, tile_q = tl.program_id(0) // n_tiles_q, tl.program_id(0) % n_tiles_q
        row_end = tl.load(offs_ptr + e)
        row_start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
        p0, q0 = tile_p * BLOCK_P, tile_q * BLOCK_Q
        ps = p0 + tl.arange(0, BLOCK_P)
        qs = q0 + tl.arange(0, BLOCK_Q)
        rs = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = r0 + rs
            row_mask = rows < row_end
            if TMA:  # rows past the expert's end are read, then zeroed: they must not add to the sum
                g = tl.where(row_mask[:, None], g_desc.load([r0, p0]), 0.0).T
            else:
                g = tl.load(g_ptr + rows.to(tl.int64)[None, :] * stride_gm + ps[:, None],
                            mask=row_mask[None, :] & (ps < P)[:, None], other=0.0)  # [P, R]: G^T
            if GATHER:
                src = tl.load(rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
                a = tl.load(a_ptr + src[:, None] * stride_am + qs[None, :],
                            mask=row_mask[:, None] & (qs < Q)[None, :], other=0.0)
            elif TMA:
                a = tl.where(row_mask[:, None], a_desc.load([r0, q0]), 0.0)
            else:
                a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * stride_am + qs[None, :],
                            mask=row_mask[:, None] & (qs < Q)[None, :], other=0.0)
            acc = tl.dot(g, a, acc)
        c_ptrs = c_ptr + e.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(ps < P)[:, None] & (qs < Q)[None, :])


def _desc(t: torch.Tensor, block: list[int]):
    """A host-side TMA descriptor of a 2-d row-major tensor (Hopper's bulk tile loads); out-of-bounds reads are 0."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def rows_mm(a: torch.Tensor, rows: torch.Tensor | None, w: torch.Tensor, offs: torch.Tensor, transpose_w: bool,
            n_rows: int, config: tuple) -> torch.Tensor:
    """C [n_rows, out] with C[n] = a[rows[n]] @ B[e], B[e] = w[e]^T (transpose_w: the forward, w nn.Linear-style
    [E, out, K]) or w[e] itself (the input gradient, w [E, K, out] read by row). rows=None: no gather.
    config: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, "tma"]): "tma" loads the weights (and ungathered rows) as
    TMA tiles."""
    bm, bn, bk, warps, stages = config[:5]
    tma = "tma" in config[5:]
    E = w.shape[0]
    if transpose_w:  # B[k, n] = w[e, n, k]
        k_dim, n_out = w.shape[2], w.shape[1]
        s_bk, s_bn = w.stride(2), w.stride(1)
    else:  # B[k, n] = w[e, k, n]
        k_dim, n_out = w.shape[1], w.shape[2]
        s_bk, s_bn = w.stride(1), w.stride(2)
    c = torch.empty(n_rows, n_out, device=a.device, dtype=a.dtype)
    a_desc = b_desc = None
    if tma:
        w2 = w.reshape(-1, w.shape[-1])
        b_desc = _desc(w2, [bn, bk] if transpose_w else [bk, bn])
        a_desc = _desc(a, [bm, bk]) if rows is None else None
    grid = ((triton.cdiv(n_rows, bm) + E) * triton.cdiv(n_out, bn),)
    _grouped_rows_mm[grid](a, a_desc, rows if rows is not None else offs, w, b_desc, c, offs, k_dim, n_out,
                           a.stride(0), w.stride(0), s_bk, s_bn, c.stride(0),
                           E=E, E_POW2=triton.next_power_of_2(E), GATHER=rows is not None, B_TRANSPOSED=transpose_w,
                           TMA=tma, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return c


def wgrad(g: torch.Tensor, a: torch.Tensor, rows: torch.Tensor | None, offs: torch.Tensor, config: tuple) -> torch.Tensor:
    """C [E, P, Q] with C[e] = g[e's rows]^T @ a[rows[e's rows]] (rows=None: a's own rows)."""
    bp, bq, br, warps, stages = config[:5]
    tma = "tma" in config[5:]
    E, P, Q = offs.shape[0], g.shape[1], a.shape[1]
    c = torch.empty(E, P, Q, device=g.device, dtype=g.dtype)
    g_desc = _desc(g, [br, bp]) if tma else None
    a_desc = _desc(a, [br, bq]) if tma and rows is None else None
    grid = (triton.cdiv(P, bp) * triton.cdiv(Q, bq), E)
    _grouped_wgrad[grid](g, g_desc, a, a_desc, rows if rows is not None else offs, c, offs, P, Q, g.stride(0),
                         a.stride(0), GATHER=rows is not None, TMA=tma, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_R=br,
                         num_warps=warps, num_stages=stages)
    return c


def reference_rows_mm(a, rows, w, offs, transpose_w):
    """The same product in fp32 PyTorch, expert by expert."""
    x = (a if rows is None else a[rows]).float()
    out = torch.zeros(x.shape[0], w.shape[1] if transpose_w else w.shape[2], dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        b = w[e].float().t() if transpose_w else w[e].float()
        out[start:end] = x[start:end] @ b
        start = end
    return out


def reference_wgrad(g, a, rows, offs):
    x = (a if rows is None else a[rows]).float()
    out, start = [], 0
    for end in offs.tolist():
        out.append(g[start:end].float().t() @ x[start:end])
        start = end
    return torch.stack(out)


CONFIGS_MM = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
              (128, 256, 64, 8, 3, "tma"), (128, 128, 64, 8, 3, "tma"), (256, 128, 64, 8, 3, "tma"),
              (128, 128, 64, 8, 4, "tma"), (128, 256, 64, 8, 4, "tma"), (128, 128, 128, 8, 3, "tma")]
CONFIGS_WGRAD = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
                 (128, 64, 64, 4, 4), (128, 128, 64, 8, 3, "tma"), (128, 256, 64, 8, 3, "tma")]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def best(timings: dict[str, float]) -> tuple[str, float]:
    name = min(timings, key=timings.get)
    return name, timings[name]


def measure(cfg: ModelConfig, tokens: int, warmup: int, reps: int) -> list[dict]:
    dev, bf16 = "cuda", torch.bfloat16
    E, k, d, i = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    n = tokens * k
    offs, src = expert_rows(n, E, k, dev)
    dst = torch.randperm(n, device=dev)  # the output gradient's dispatch: a permutation of its [T*K] rows
    x = torch.randn(tokens, d, device=dev, dtype=bf16)
    grad_y_perm = torch.randn(n, d, device=dev, dtype=bf16)
    a = torch.randn(n, i, device=dev, dtype=bf16)
    grad_h = torch.randn(n, 2 * i, device=dev, dtype=bf16)
    w_gu = torch.randn(E, 2 * i, d, device=dev, dtype=bf16) / d**0.5
    w_d = torch.randn(E, d, i, device=dev, dtype=bf16) / i**0.5
    w_d_cm = w_d.transpose(-2, -1).contiguous().transpose(-2, -1)  # the same values, column-major [E, D, I]
    gather = torch.compile(lambda t, idx: t[idx], dynamic=False)
    x_sorted, grad_y_sorted = gather(x, src), gather(grad_y_perm, dst)  # the copies the step materialises

    cases = [
        # name, CUTLASS call, Triton call(config), reference, flops
        ("forward gate+up (gathered rows)",
         lambda: F.grouped_mm(x_sorted, w_gu.transpose(-2, -1), offs=offs),
         lambda c: rows_mm(x, src, w_gu, offs, True, n, c),
         lambda: reference_rows_mm(x, src, w_gu, offs, True), 2 * n * d * 2 * i, CONFIGS_MM),
        ("forward down",
         lambda: F.grouped_mm(a, w_d.transpose(-2, -1), offs=offs),
         lambda c: rows_mm(a, None, w_d, offs, True, n, c),
         lambda: reference_rows_mm(a, None, w_d, offs, True), 2 * n * i * d, CONFIGS_MM),
        ("input grad of down (gathered rows)",
         lambda: F.grouped_mm(grad_y_sorted, w_d, offs=offs),
         lambda c: rows_mm(grad_y_perm, dst, w_d, offs, False, n, c),
         lambda: reference_rows_mm(grad_y_perm, dst, w_d, offs, False), 2 * n * d * i, CONFIGS_MM),
        ("input grad of down (gathered rows), weight column-major",  # the layout lever: CUTLASS only
         lambda: F.grouped_mm(grad_y_sorted, w_d_cm, offs=offs), None,
         lambda: reference_rows_mm(grad_y_perm, dst, w_d, offs, False), 2 * n * d * i, []),
        ("input grad of gate+up",
         lambda: F.grouped_mm(grad_h, w_gu, offs=offs),
         lambda c: rows_mm(grad_h, None, w_gu, offs, False, n, c),
         lambda: reference_rows_mm(grad_h, None, w_gu, offs, False), 2 * n * 2 * i * d, CONFIGS_MM),
        ("weight grad of down (gathered rows)",
         lambda: F.grouped_mm(grad_y_sorted.t(), a, offs=offs),
         lambda c: wgrad_gathered_g(grad_y_perm, dst, a, offs, c),
         lambda: reference_wgrad(grad_y_perm[dst], a, None, offs), 2 * n * d * i, CONFIGS_WGRAD),
        ("weight grad of gate+up (gathered rows)",
         lambda: F.grouped_mm(grad_h.t(), x_sorted, offs=offs),
         lambda c: wgrad(grad_h, x, src, offs, c),
         lambda: reference_wgrad(grad_h, x, src, offs), 2 * n * 2 * i * d, CONFIGS_WGRAD),
    ]
    results = [{"name": f"gather {what} ({n} x {d})", "gather_ms": gpu_median_ms(fn, warmup, reps)}
               for what, fn in (("x rows", lambda: gather(x, src)), ("output-grad rows", lambda: gather(grad_y_perm, dst)))]
    for r in results:
        print(f"{r['name']:>40}: {r['gather_ms']:.3f} ms", flush=True)
    for name, cutlass, trit, ref_fn, flops, configs in cases:
        ref = ref_fn()
        res = {"name": name, "flops": flops, "cutlass_rel_err": rel_err(cutlass(), ref)}
        res["cutlass_ms"] = gpu_median_ms(cutlass, warmup, reps)
        timings, errors = {}, {}
        for c in configs:
            key = "x".join(map(str, c))
            try:
                errors[key] = rel_err(trit(c), ref)
                if errors[key] > 2e-2:
                    raise AssertionError(f"relative error {errors[key]:.2e}")
                timings[key] = gpu_median_ms(lambda c=c, t=trit: t(c), warmup, reps)
            except Exception as ex:  # noqa: BLE001 - recorded: a config that does not compile or fit is skipped
                errors[key] = f"{type(ex).__name__}: {str(ex).splitlines()[0] if str(ex) else ''}"
        res["triton_ms_by_config"], res["triton_rel_err_by_config"] = timings, errors
        if timings:
            res["triton_best_config"], res["triton_ms"] = best(timings)
        for side in ("cutlass", "triton"):
            if f"{side}_ms" in res:
                res[f"{side}_tflops"] = flops / res[f"{side}_ms"] / 1e9
        results.append(res)
        line = f"{name:>40}: CUTLASS {res['cutlass_ms']:.3f} ms ({res['cutlass_tflops']:.0f} TFLOP/s)"
        if "triton_ms" in res:
            line += f", Triton {res['triton_ms']:.3f} ms ({res['triton_tflops']:.0f}) at {res['triton_best_config']}"
        print(line, flush=True)
    return results


def wgrad_gathered_g(g, g_rows, a, offs, config):
    """The down projection's weight gradient with the output gradient gathered: C[e] = g[g_rows]^T a, by swapping
    the roles (C[e]^T = a^T g[g_rows]) so the gathered operand is the kernel's second one."""
    return wgrad(a, g, g_rows, offs, config).transpose(-2, -1)


def main(argv=None) -> int:
    args = shape_parser(__doc__.split("\n\n")[0], "triton_grouped_mm", reps=30).parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        print("triton_grouped_mm.py needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    cfg = ModelConfig(**PRESETS[args.preset])
    tokens = args.batch * args.seq_len
    torch.manual_seed(0)
    gemms = measure(cfg, tokens, args.warmup, args.reps)
    result = record(args, triton=triton.__version__, gemms=gemms)
    products = [g for g in gemms if "flops" in g and "column-major" not in g["name"]]
    if all("triton_ms" in g for g in products):
        # as the step runs: the two row copies + CUTLASS on them; the fused way: Triton reading rows by index
        result["per_layer_ms"] = {
            "cutlass_and_copies": round(sum(g["cutlass_ms"] for g in products)
                                        + sum(g["gather_ms"] for g in gemms if "gather_ms" in g), 4),
            "triton_gathering": round(sum(g["triton_ms"] for g in products), 4)}
        print(f"per MoE layer (six products; the step's two row copies counted on CUTLASS's side): "
              f"{result['per_layer_ms']}")
    write(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
