"""The routed experts at decode sizes for CUDA (Triton): grouped matrix-vector products that read each busy
expert's weights once.

At decode the routed experts see N = T*K rows: batch 32 x top-6 = 192 rows over 64 experts in `small`, ~3 per
expert; batch 1, 6 rows on 6 experts. Their two grouped GEMMs are then really grouped GEMVs: the multiply-adds cost
nothing, reading the expert weights is the whole cost (113 MB per MoE layer of `small` in bf16). F.grouped_mm's
CUTLASS tiles are built for large N; in the compiled, graph-captured decode step of `small` at batch 32 they took
2.3x the time to read those bytes (H200, issue 24). Here, per MoE layer, two kernels:

* _grouped_gate_up_swiglu, grid (expert, tile of BLOCK_N of the I outputs): streams the tile's gate rows and up
  rows of gate_up_proj[e] once, BLOCK_K of D at a time, against the expert's rows BLOCK_M at a time (16, the
  smallest tl.dot), and writes a = silu(g) * u * gate for its columns. The SwiGLU and the routing gate ride along
  in registers: the [N, 2I] gate/up projection never reaches memory.
* _grouped_down, grid (expert, tile of BLOCK_N of the D outputs): y = a @ down_proj[e]^T the same way.
* The shared experts, where the router's GEMM also computed their gate and up projections (MoE.fold): more
  programs of the gate/up kernel compute their SwiGLU, more of the down kernel their down projection, for every
  token (at decode those were a pointwise kernel and a small GEMM per layer, cuBLAS taking ~4 us for any GEMM of
  32 rows, each with its launch gap). They launch first (`_program`); a shared down program takes all the tokens at
  once and half an expert program's weight bytes (it also reads the SwiGLU's output). Programs streaming twice an
  expert's bytes, or their tile once per 16 rows, were the kernel's long pole (+6.5 and +4.8 us per layer against
  +1.4 now, H200, `small`, batch 32).
* _route_by_expert: the routing bookkeeping before them (which rows each expert owns, in which
  order), the order of model/moe.sort_by_expert. The gate/up kernel then reads each assignment's token row and
  gate where they are (`order`), so the rows are never copied into expert order: MoE._decode_experts takes route +
  these two kernels instead of the ~9 small kernels of the one-hot map, its scans, scatters and row copies.

Expert e's rows are offsets[e-1]:offsets[e], read on the device: no host sync, the call has static shapes and a
CUDA graph captures it. The programs of an expert without rows load nothing and end, so a call reads exactly the
weights of the experts that have rows (6 of 64 at batch 1). An expert with more than BLOCK_M rows streams its tile
again for each further block of rows (from L2: the tile is small), and the 16-row products start to count: the
kernel is for small N only, and MoE / GroupedExperts take it for inference with at most MAX_ROWS_PER_EXPERT rows
per expert on average (`available`); training and prefill keep grouped_mm.

Rounding follows the grouped_mm path under torch.compile: products accumulated in fp32, the gate/up projection
rounded to x's dtype (grouped_mm's output), silu(g) * u * gate in fp32 rounded once to x's dtype (_GatedSwiGLU as
Inductor fuses it), the down projection accumulated in fp32 and rounded to x's dtype. Weights are cast to x's dtype
as they are loaded, as grouped_mm casts them (under autocast with fp32 weights, without a cast copy of them). The
shared experts round as MoE.forward's PyTorch path does: gate and up rounded to x's dtype, silu(g) * u in fp32
rounded once, the down projection accumulated in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from deepseek_mini.kernels import runtime
from deepseek_mini.kernels.runtime import tl, triton

if triton is not None:

    @triton.jit
    def _expert_rows(offsets_ptr, e):
        """Expert e's rows: offsets[e-1] (0 for the first expert) to offsets[e]."""
        start = tl.where(e > 0, tl.load(offsets_ptr + tl.maximum(e - 1, 0)), 0)
        return start, tl.load(offsets_ptr + e)

    @triton.jit
    def _program(E, R):
        """This program of the grid (E + R, column tiles), by its place in the launch order (x fastest) ->
        (shared, e, col): the first R x column-tiles programs launched are the shared experts' (`shared` their index,
        else -1): they read more than one expert's tile, so they start first. The others are expert e's for column
        tile col, e fastest, as the grid (E, column tiles) would launch them."""
        n_cols = tl.num_programs(1)
        slot = tl.program_id(0) + tl.program_id(1) * (E + R)
        routed = tl.maximum(slot - R * n_cols, 0)
        return tl.where(slot < R * n_cols, slot, -1), routed % E, routed // E

    @triton.jit
    def _shared_swiglu(g_ptr, u_ptr, stride_g, stride_u, a_ptr, tile, T, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """a = silu(g) * u [T, WIDTH] for columns tile * BLOCK_N... (none for tile -1), from the shared experts' gate
        and up projections g, u [T, WIDTH] as the router's GEMM wrote them (fp32 when folded): each rounded to a's
        dtype, the SwiGLU in fp32 rounded once, as the PyTorch path under torch.compile rounds them."""
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < WIDTH
        for m0 in range(0, tl.where(tile >= 0, T, 0), BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask = (offs_m < T)[:, None] & n_mask[None, :]
            g = tl.load(g_ptr + offs_m[:, None] * stride_g + offs_n[None, :], mask=mask, other=0.0)
            u = tl.load(u_ptr + offs_m[:, None] * stride_u + offs_n[None, :], mask=mask, other=0.0)
            g = g.to(a_ptr.dtype.element_ty).to(tl.float32)
            u = u.to(a_ptr.dtype.element_ty).to(tl.float32)
            tl.store(a_ptr + offs_m[:, None] * WIDTH + offs_n[None, :], (g * tl.sigmoid(g) * u).to(a_ptr.dtype.element_ty),
                     mask=mask)

    @triton.jit
    def _grouped_gate_up_swiglu(x_ptr, w_ptr, offsets_ptr, gate_ptr, order_ptr, a_ptr, stride_we,
                                D: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                                GATHER: tl.constexpr, K: tl.constexpr, sg_ptr, su_ptr, stride_sg, stride_su, as_ptr, T,
                                E, R, SHARED: tl.constexpr, SHARED_WIDTH: tl.constexpr):
        shared, e, col = _program(E, R)
        if SHARED:  # R rows of programs more: the shared experts' SwiGLU, from the router's GEMM
            _shared_swiglu(sg_ptr, su_ptr, stride_sg, stride_su, as_ptr, shared, T, SHARED_WIDTH, BLOCK_M, BLOCK_N)
        start, end = _expert_rows(offsets_ptr, e)
        end = tl.where(shared < 0, end, start)  # a shared experts' program has no routed rows
        offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's columns of I = WIDTH
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < WIDTH
        w_gate = w_ptr + e.to(tl.int64) * stride_we + offs_n[:, None] * D  # rows [0, I) of gate_up_proj[e]
        w_up = w_gate + WIDTH * D  # rows [I, 2I)
        for m0 in range(start, end, BLOCK_M):  # no rows: no iteration, nothing read
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < end
            if GATHER:  # row m is assignment order[m] (token-major, t * K + k): token order[m] // K, its gate there
                src = tl.load(order_ptr + offs_m, mask=m_mask, other=0)
                x_row = src // K
            else:  # the rows come sorted by expert, their gates with them
                src = offs_m
                x_row = offs_m
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_mask = k0 + offs_k < D
                x = tl.load(x_ptr + x_row[:, None] * D + k0 + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                            other=0.0)
                w_mask = n_mask[:, None] & k_mask[None, :]
                wg = tl.load(w_gate + k0 + offs_k[None, :], mask=w_mask, other=0.0).to(x.dtype)
                wu = tl.load(w_up + k0 + offs_k[None, :], mask=w_mask, other=0.0).to(x.dtype)
                if UPCAST:  # the same values multiplied in fp32: see _dot_options
                    x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
                acc_g = tl.dot(x, tl.trans(wg), acc_g, input_precision=PRECISION)
                acc_u = tl.dot(x, tl.trans(wu), acc_u, input_precision=PRECISION)
            # h = [g | u] rounded as grouped_mm returns it; the SwiGLU and the row's gate in fp32, rounded once
            g = acc_g.to(x_ptr.dtype.element_ty).to(tl.float32)
            u = acc_u.to(x_ptr.dtype.element_ty).to(tl.float32)
            gate = tl.load(gate_ptr + src, mask=m_mask, other=0.0).to(tl.float32)
            a = g * tl.sigmoid(g) * u * gate[:, None]
            tl.store(a_ptr + offs_m[:, None] * WIDTH + offs_n[None, :], a.to(a_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _rows_down(a_ptr, w_ptr, y_ptr, start, end, col, D: tl.constexpr, WIDTH: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """y[start:end, columns col * BLOCK_N...] = a[start:end] @ w^T for a [., WIDTH], w [D, WIDTH], y [., D]:
        w's tile streamed once, BLOCK_K at a time, against the rows BLOCK_M at a time."""
        offs_n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < D
        w_row = w_ptr + offs_n[:, None] * WIDTH
        for m0 in range(start, end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, WIDTH, BLOCK_K):
                k_mask = k0 + offs_k < WIDTH
                a = tl.load(a_ptr + offs_m[:, None] * WIDTH + k0 + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                            other=0.0)
                w = tl.load(w_row + k0 + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(a.dtype)
                if UPCAST:
                    a, w = a.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
            tl.store(y_ptr + offs_m[:, None] * D + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _grouped_down(a_ptr, w_ptr, offsets_ptr, y_ptr, stride_we, D: tl.constexpr, WIDTH: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                      UPCAST: tl.constexpr, as_ptr, ws_ptr, ys_ptr, T, E, R, SHARED: tl.constexpr,
                      SHARED_WIDTH: tl.constexpr, SHARED_BLOCK_M: tl.constexpr, SHARED_BLOCK_N: tl.constexpr):
        shared, e, col = _program(E, R)
        if SHARED:  # R rows of programs more: the shared experts' down projection, SHARED_BLOCK_N columns each
            _rows_down(as_ptr, ws_ptr, ys_ptr, 0, tl.where(shared >= 0, T, 0), shared, D, SHARED_WIDTH, SHARED_BLOCK_M,
                       SHARED_BLOCK_N, BLOCK_K, PRECISION, UPCAST)
        start, end = _expert_rows(offsets_ptr, e)
        end = tl.where(shared < 0, end, start)
        _rows_down(a_ptr, w_ptr + e.to(tl.int64) * stride_we, y_ptr, start, end, col, D, WIDTH, BLOCK_M, BLOCK_N,
                   BLOCK_K, PRECISION, UPCAST)

    @triton.jit
    def _place(ids_n, rank, counts, offs_n, n_mask, offs_e, e_mask, p, ends_ptr, counts_ptr, order_ptr, inverse_ptr):
        """Assignments offs_n (expert ids_n, `rank` earlier ones to the same expert) to their rows in expert order,
        from every expert's count: inverse and order; program 0 also stores the counts and their ends."""
        ends = tl.cumsum(counts, axis=0)
        starts = ends - counts
        start_n = tl.sum(tl.where(ids_n[:, None] == offs_e[None, :], starts[None, :], 0), axis=1)
        inverse = start_n + rank
        tl.store(inverse_ptr + offs_n, inverse, mask=n_mask)
        tl.store(order_ptr + inverse, offs_n, mask=n_mask)
        first = e_mask & (offs_e * 0 + p == 0)  # the counts and their ends, once
        tl.store(ends_ptr + offs_e, ends, mask=first)
        tl.store(counts_ptr + offs_e, counts, mask=first)

    @triton.jit
    def _route_by_expert(ids_ptr, ends_ptr, counts_ptr, order_ptr, inverse_ptr, N, E,
                         BLOCK_E: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        """The N = T*K assignments (token-major) sorted by expert, by assignment within an expert. Program p places
        assignments p*BLOCK.. : it counts every expert's assignments itself (a few thousand comparisons), so no
        program waits for another; at decode sizes all N ids are one CHUNK, one load."""
        p = tl.program_id(0)
        offs_e = tl.arange(0, BLOCK_E)
        offs_n = p * BLOCK + tl.arange(0, BLOCK)
        n_mask = offs_n < N
        ids_n = tl.load(ids_ptr + offs_n, mask=n_mask, other=-1)
        counts = tl.zeros([BLOCK_E], tl.int32)
        rank = tl.zeros([BLOCK], tl.int32)  # earlier assignments to the same expert
        for m0 in range(0, N, CHUNK):
            offs_m = m0 + tl.arange(0, CHUNK)
            ids_m = tl.load(ids_ptr + offs_m, mask=offs_m < N, other=-2)
            counts += tl.sum((offs_e[:, None] == ids_m[None, :]).to(tl.int32), axis=1)
            earlier = (ids_n[:, None] == ids_m[None, :]) & (offs_m[None, :] < offs_n[:, None])
            rank += tl.sum(earlier.to(tl.int32), axis=1)
        _place(ids_n, rank, counts, offs_n, n_mask, offs_e, offs_e < E, p, ends_ptr, counts_ptr, order_ptr, inverse_ptr)


    @triton.jit
    def _top_k(logits_ptr, bias_ptr, offs_t, t_mask, offs_e, e_mask, offs_k, stride_lt, E, K: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Router.route for a block of tokens: each row's K best experts by score (+ the selection bias), the
        lowest index first among equal scores (a stable descending sort's order), and their scores."""
        logits = tl.load(logits_ptr + offs_t[:, None] * stride_lt + offs_e[None, :],
                         mask=t_mask[:, None] & e_mask[None, :], other=0.0)
        if SOFTMAX:
            logits = tl.where(e_mask[None, :], logits, float("-inf"))
            ex = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            scores = ex / tl.sum(ex, axis=1)[:, None]
        else:
            scores = tl.sigmoid(logits)
        select = scores
        if HAS_BIAS:  # selects, does not weigh
            select = select + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0)[None, :]
        select = tl.where(e_mask[None, :], select, float("-inf"))
        ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
        gates = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
        for k in tl.static_range(K):
            best = tl.max(select, axis=1)
            # the lowest index among the best (at most E - 1: a NaN row must not index past the experts)
            idx = tl.minimum(tl.min(tl.where(select == best[:, None], offs_e[None, :], E), axis=1), E - 1)
            hit = offs_e[None, :] == idx[:, None]
            ids = tl.where(offs_k[None, :] == k, idx[:, None], ids)
            gates = tl.where(offs_k[None, :] == k, tl.sum(tl.where(hit, scores, 0.0), axis=1)[:, None], gates)
            select = tl.where(hit, float("-inf"), select)
        return ids, gates

    @triton.jit
    def _route_logits(logits_ptr, bias_ptr, gates_ptr, ends_ptr, counts_ptr, order_ptr, inverse_ptr, T, E, stride_lt,
                      scaling, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
        """The router's selection and _route_by_expert in one kernel. Program p places assignments p*BLOCK.. as
        _route_by_expert does, but takes the expert ids from the router's logits itself: every program selects the
        top K of every token (BLOCK_T tokens at a time, a few thousand scores), so none waits for another.
        Program 0 also writes the gates [T, K]."""
        p = tl.program_id(0)
        N = T * K
        offs_e = tl.arange(0, BLOCK_E)
        e_mask = offs_e < E
        offs_k = tl.arange(0, BLOCK_K)
        offs_n = p * BLOCK + tl.arange(0, BLOCK)
        n_mask = offs_n < N
        counts = tl.zeros([BLOCK_E], tl.int32)  # assignments per expert in the tokens before this block of tokens
        ids_n = tl.zeros([BLOCK], tl.int32)
        rank = tl.zeros([BLOCK], tl.int32)  # earlier assignments to the same expert
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            t_mask = offs_t < T
            ids, gates = _top_k(logits_ptr, bias_ptr, offs_t, t_mask, offs_e, e_mask, offs_k, stride_lt, E, K, BLOCK_T,
                                BLOCK_K, SOFTMAX, HAS_BIAS)
            valid = t_mask[:, None] & (offs_k[None, :] < K)
            if NORM:
                gates = gates / (tl.sum(gates, axis=1)[:, None] + 1e-20)
            tl.store(gates_ptr + offs_t[:, None] * K + offs_k[None, :], gates * scaling,
                     mask=valid & (offs_k[None, :] * 0 + p == 0))
            # this block's assignments among these tokens: their experts, and their ranks among the same expert's
            ids_m = tl.reshape(tl.where(valid, ids, -1), [BLOCK_T * BLOCK_K])
            n_m = tl.reshape(offs_t[:, None] * K + offs_k[None, :], [BLOCK_T * BLOCK_K])
            here = n_m[None, :] == offs_n[:, None]  # [BLOCK, M]; an invalid m never matches (its id is -1)
            mine = n_mask & (offs_n >= t0 * K) & (offs_n < (t0 + BLOCK_T) * K)
            id_here = tl.sum(tl.where(here & (ids_m[None, :] >= 0), ids_m[None, :], 0), axis=1)
            earlier = (ids_m[None, :] == id_here[:, None]) & (n_m[None, :] < offs_n[:, None])
            before = tl.sum(tl.where(offs_e[None, :] == id_here[:, None], counts[None, :], 0), axis=1)
            ids_n = tl.where(mine, id_here, ids_n)
            rank = tl.where(mine, before + tl.sum(earlier.to(tl.int32), axis=1), rank)
            counts += tl.sum((offs_e[:, None] == ids_m[None, :]).to(tl.int32), axis=1)
        _place(ids_n, rank, counts, offs_n, n_mask, offs_e, e_mask, p, ends_ptr, counts_ptr, order_ptr, inverse_ptr)

# At most this many rows per expert on average (N <= 16 * E: T <= 170 tokens of `small`, top-6 of 64): one BLOCK_M
# block per expert, so each weight tile is streamed once. Decode (batch x top-k) and speculative verification stay
# far below; prefill and training (thousands of rows) are GEMMs, where grouped_mm's large tiles win.
# scripts/bench/moe_decode_tune.py --crossover times both paths across N.
MAX_ROWS_PER_EXPERT = 16


def available(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
              n_rows: int | None = None) -> bool:
    """Inference at decode sizes: 16-bit rows on CUDA (or under the interpreter), nothing that needs a gradient (the
    kernels have no backward), the autocast dtype if autocast is on (grouped_mm would cast to it), few rows (n_rows,
    default one per gate in `weights`; `weights` may be what the gates come from, the router's logits)."""
    if not (runtime.runs_on(x) and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up_proj, down_proj, weights)):
        return False
    if x.is_cuda and torch.is_autocast_enabled("cuda") and x.dtype != torch.get_autocast_dtype("cuda"):
        return False
    return (weights.numel() if n_rows is None else n_rows) <= MAX_ROWS_PER_EXPERT * gate_up_proj.shape[0]


@dataclass(frozen=True)
class LaunchConfig:
    """One kernel's launch: BLOCK_N output columns per program, the reduction BLOCK_K at a time, rows BLOCK_M at a time."""

    block_n: int
    block_k: int = 128
    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 3


def default_config(n_rows: int, n_experts: int, out_cols: int, reduce_dim: int, n_sm: int) -> LaunchConfig:
    """Streaming the weights is the whole cost, so the programs that have rows should cover the SMs, each streaming
    long contiguous weight rows. At most min(N, E) experts have rows; each has one program per BLOCK_N output columns.
    BLOCK_N halves from 128 (down to 32) until those programs cover the SMs twice; BLOCK_K is 128 (256 bytes of each
    weight row per step), 64 with BLOCK_N = 128 (the 3-stage pipeline's tiles stay the same size).
    Measured on an H200 (132 SMs, 2026-11-30, scripts/bench/moe_decode_tune.py, `small`, 24 configurations per kernel
    and batch): at batch 32 (~62 busy experts) gate/up gets 64 x 128 (20.6 us; the best 20.2) and down 128 x 64 (6.9 us,
    the best; 9.1 with 64 x 128); at batch 1 (6 experts) both get 32 x 128 (5.9 and 4.1 us; the best 5.9 and 4.0;
    BLOCK_N = 16, a first rule's choice there, took 14.2 us for the two kernels together, 9.9 with these)."""
    busy = max(1, min(n_rows, n_experts))
    block_n = 128
    while block_n > 32 and busy * triton.cdiv(out_cols, block_n) < 2 * n_sm:
        block_n //= 2
    block_n = min(block_n, max(16, triton.next_power_of_2(out_cols)))
    block_k = 64 if block_n >= 128 else 128
    return LaunchConfig(block_n=block_n, block_k=min(block_k, max(16, triton.next_power_of_2(reduce_dim))))


choose_config = default_config  # the rule the op uses; scripts/bench/moe_decode_tune.py compares others


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter, on CPU tensors
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_options(t: torch.Tensor) -> dict:
    """fp32 rows (the tests) multiply in full fp32, not TF32. Triton's interpreter (3.9) multiplies bf16 tiles as
    their raw uint16 bits, so there bf16 operands are widened to fp32 first: the products of two bf16 values are exact
    in fp32 and the sums are fp32 either way, so the result is what the GPU's bf16 MMA computes."""
    upcast = runtime.INTERPRET and t.dtype == torch.bfloat16
    return dict(PRECISION="ieee" if t.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def _shared_rows(tiles: int, n_cols: int) -> int:
    """Rows of programs the shared experts add to a grid of n_cols column tiles, for `tiles` programs of theirs."""
    return triton.cdiv(tiles, n_cols)


def gate_up_swiglu(x: torch.Tensor, gate_up_proj: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor,
                   config: LaunchConfig, order: torch.Tensor | None = None, k: int = 1,
                   shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [N, D] sorted by expert, gate_up_proj [E, 2I, D], offsets int32 [E], weights [N] ->
    a = silu(g) * u * weights [N, I] in x's dtype, for h = [g | u] = x @ gate_up_proj[e]^T.
    With `order` [N] (route()'s), x is [T, D] in token order and weights [T, K] (N = T*K): row m of the result is
    assignment order[m], read from token order[m] // K with its gate, so the rows are never copied into expert order.
    With `shared` = the shared experts' gate and up projections (g, u [T, S], any float dtype), also their
    silu(g) * u [T, S] in x's dtype (else None), in more programs of the same launch."""
    D = x.shape[1]
    N = weights.numel()
    E, H, _ = gate_up_proj.shape
    x, w = x.contiguous(), gate_up_proj.contiguous()
    a = torch.empty(N, H // 2, device=x.device, dtype=x.dtype)
    gather = order is not None
    n_cols = triton.cdiv(H // 2, config.block_n)
    g, u = (a, a) if shared is None else (runtime.rows_contiguous(t) for t in shared)
    T, width = (0, 16) if shared is None else g.shape
    a_shared = a if shared is None else torch.empty(T, width, device=x.device, dtype=x.dtype)
    R = _shared_rows(triton.cdiv(width, config.block_n), n_cols) if T else 0
    _grouped_gate_up_swiglu[(E + R, n_cols)](
        x, w, offsets, weights.contiguous(), order if gather else offsets, a, w.stride(0), D=D, WIDTH=H // 2,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages, GATHER=gather, K=k, sg_ptr=g, su_ptr=u, stride_sg=g.stride(0),
        stride_su=u.stride(0), as_ptr=a_shared, T=T, E=E, R=R, SHARED=shared is not None, SHARED_WIDTH=width,
        **_dot_options(x))
    return a, (None if shared is None else a_shared)


def down(a: torch.Tensor, down_proj: torch.Tensor, offsets: torch.Tensor, config: LaunchConfig,
         shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """a [N, I] sorted by expert, down_proj [E, D, I] -> y = a @ down_proj[e]^T [N, D] in a's dtype.
    With `shared` = (a_s [T, S], w [D, S]): the shared experts' a_s @ w^T follows as T more rows, [N + T, D], from
    more programs of the same launch. Each takes all T rows at once (up to 64: their weight tile streamed once) and
    half an expert program's weight bytes (fewer columns), since it also reads a_s: the shared programs were the
    kernel's long pole when each streamed its tile twice, for two blocks of 16 rows (H200, `small`, batch 32)."""
    N, width = a.shape
    E, D, _ = down_proj.shape
    a, w = a.contiguous(), down_proj.contiguous()
    a_s, w_s = (a, a) if shared is None else (t.contiguous() for t in shared)
    T, shared_width = (0, 16) if shared is None else a_s.shape
    y = torch.empty(N + T, D, device=a.device, dtype=a.dtype)
    n_cols = triton.cdiv(D, config.block_n)
    shared_block_n = max(16, min(config.block_n, triton.next_power_of_2(config.block_n * width // shared_width // 2)))
    R = _shared_rows(triton.cdiv(D, shared_block_n), n_cols) if T else 0
    _grouped_down[(E + R, n_cols)](
        a, w, offsets, y, w.stride(0), D=D, WIDTH=width, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages, as_ptr=a_s, ws_ptr=w_s,
        ys_ptr=y[N:], T=T, E=E, R=R, SHARED=shared is not None, SHARED_WIDTH=shared_width,
        SHARED_BLOCK_M=min(64, max(16, triton.next_power_of_2(T))), SHARED_BLOCK_N=shared_block_n,
        **_dot_options(a))
    return y


def launch(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, offsets: torch.Tensor,
           weights: torch.Tensor, up_config: LaunchConfig, down_config: LaunchConfig, order: torch.Tensor | None = None,
           k: int = 1, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Both kernels with explicit launch configurations; `shared` = (g, u, w): grouped_swiglu_experts'."""
    offsets = offsets.to(torch.int32)
    a, a_shared = gate_up_swiglu(x, gate_up_proj, offsets, weights, up_config, order, k,
                                 None if shared is None else shared[:2])
    return down(a, down_proj, offsets, down_config, None if shared is None else (a_shared, shared[2]))


def grouped_swiglu_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                           offsets: torch.Tensor, weights: torch.Tensor, order: torch.Tensor | None = None,
                           k: int = 1, shared_gate: torch.Tensor | None = None, shared_up: torch.Tensor | None = None,
                           shared_down: torch.Tensor | None = None) -> torch.Tensor:
    """GroupedExperts.forward: x [N, D] sorted by expert (expert e owns rows offsets[e-1]:offsets[e]), gate_up_proj
    [E, 2I, D] (gate rows first), down_proj [E, D, I], offsets int32 [E], weights [N] (each row's gate) ->
    (silu(g) * u * weights) @ down_proj[e]^T for [g | u] = x @ gate_up_proj[e]^T, [N, D] in x's dtype, rows in
    expert order. With `order` (route()'s), x [T, D] and weights [T, K] stay in token order (gate_up_swiglu).
    With the shared experts' gate and up projections [T, S] and their down_proj weight [D, S], their output
    (silu(g) * u) @ w^T comes as T more rows, [N + T, D] (`down`): no kernels of their own for the SwiGLU and the
    down projection, which at decode cost a pointwise kernel and a small GEMM per layer, each with its launch gap."""
    return torch.ops.deepseek_mini.moe_decode(x, gate_up_proj, down_proj, offsets, weights, order, k, shared_gate,
                                              shared_up, shared_down)


def launch_configs(x: torch.Tensor, gate_up_proj: torch.Tensor, n_rows: int | None = None
                   ) -> tuple[LaunchConfig, LaunchConfig]:
    """The launches of the gate/up kernel (I outputs, reducing D) and of the down kernel (D outputs, reducing I) for
    these rows (n_rows, default x's) and experts, by the op's rule (choose_config)."""
    N = x.shape[0] if n_rows is None else n_rows
    D = x.shape[1]
    E, H, _ = gate_up_proj.shape
    n_sm = _sm_count(x.device)
    return choose_config(N, E, H // 2, D, n_sm), choose_config(N, E, D, H // 2, n_sm)


def _moe_decode(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor, order: torch.Tensor | None, k: int, shared_gate: torch.Tensor | None,
                shared_up: torch.Tensor | None, shared_down: torch.Tensor | None) -> torch.Tensor:
    shared = None if shared_down is None else (shared_gate, shared_up, shared_down)
    return launch(x, gate_up_proj, down_proj, offsets, weights, *launch_configs(x, gate_up_proj, weights.numel()),
                  order, k, shared)


def route(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_idx [T, K] -> (offsets int32 [E]: expert e owns rows offsets[e-1]:offsets[e], counts int32 [E],
    order int64 [N]: the assignments (t * K + k) in expert order, by assignment within an expert, inverse int64 [N]:
    where each assignment went). The order of model/moe.sort_by_expert, in one kernel instead of the ~9 small ones
    the one-hot map, its scans, gathers and scatters take at decode sizes (it counts pairs: O(N^2) comparisons).
    The order is sort_by_expert's; no tie is broken differently."""
    return torch.ops.deepseek_mini.moe_route(topk_idx, n_experts)


def _moe_route(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    ids = topk_idx.reshape(-1).contiguous()
    N = ids.numel()
    ends = torch.empty(n_experts, device=ids.device, dtype=torch.int32)
    counts = torch.empty_like(ends)
    order = torch.empty(N, device=ids.device, dtype=torch.int64)
    inverse = torch.empty_like(order)
    block = 32
    _route_by_expert[(triton.cdiv(N, block),)](ids, ends, counts, order, inverse, N, n_experts,
                                               BLOCK_E=max(16, triton.next_power_of_2(n_experts)), BLOCK=block,
                                               CHUNK=min(256, max(16, triton.next_power_of_2(N))), num_warps=4)
    return ends, counts, order, inverse


def route_logits(logits_TE: torch.Tensor, k: int, softmax: bool, bias: torch.Tensor | None, norm: bool,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router.route and route() in one kernel: logits_TE [T, E] (>= fp32, rows may be strided) -> (gates fp32 [T, k]:
    the selected scores, renormalised if `norm`, times `scaling`, then route()'s offsets, counts, order, inverse).
    Scores are softmax(logits) or sigmoid(logits); `bias` [E] (V3's e_score_correction_bias) only selects. The
    experts are the k best by score + bias, the lower index first among equal ones, as Router.route's stable sort.
    One launch where the compiled PyTorch selection took two and route() a third (kernels, not bytes, cost here)."""
    return torch.ops.deepseek_mini.moe_route_logits(logits_TE, k, softmax, bias, norm, scaling)


def _moe_route_logits(logits_TE: torch.Tensor, k: int, softmax: bool, bias: torch.Tensor | None, norm: bool,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = logits_TE.shape
    logits_TE = runtime.rows_contiguous(logits_TE)
    gates = torch.empty(T, k, device=logits_TE.device, dtype=torch.float32)
    ends = torch.empty(E, device=logits_TE.device, dtype=torch.int32)
    counts = torch.empty_like(ends)
    order = torch.empty(T * k, device=logits_TE.device, dtype=torch.int64)
    inverse = torch.empty_like(order)
    block = 32
    _route_logits[(triton.cdiv(T * k, block),)](
        logits_TE, logits_TE if bias is None else bias, gates, ends, counts, order, inverse, T, E, logits_TE.stride(0),
        scaling, K=k, BLOCK_T=min(32, max(2, triton.next_power_of_2(T))), BLOCK_E=max(16, triton.next_power_of_2(E)),
        BLOCK_K=max(2, triton.next_power_of_2(k)), BLOCK=block, SOFTMAX=softmax, HAS_BIAS=bias is not None, NORM=norm,
        num_warps=4)
    return gates, ends, counts, order, inverse


if triton is not None:
    # Opaque custom ops, so torch.compile can fuse the code around them without a graph break.
    torch.library.custom_op("deepseek_mini::moe_decode", _moe_decode, mutates_args=())
    torch.library.custom_op("deepseek_mini::moe_route", _moe_route, mutates_args=())
    torch.library.custom_op("deepseek_mini::moe_route_logits", _moe_route_logits, mutates_args=())

    @torch.library.register_fake("deepseek_mini::moe_route_logits")
    def _moe_route_logits_fake(logits_TE, k, softmax, bias, norm, scaling):
        T, E = logits_TE.shape
        ends = logits_TE.new_empty(E, dtype=torch.int32)
        order = logits_TE.new_empty(T * k, dtype=torch.int64)
        return logits_TE.new_empty(T, k, dtype=torch.float32), ends, torch.empty_like(ends), order, torch.empty_like(order)

    @torch.library.register_fake("deepseek_mini::moe_decode")
    def _moe_decode_fake(x, gate_up_proj, down_proj, offsets, weights, order, k, shared_gate, shared_up, shared_down):
        T = 0 if shared_down is None else shared_gate.shape[0]
        return x.new_empty(weights.numel() + T, down_proj.shape[1])  # contiguous, like the real op's result

    @torch.library.register_fake("deepseek_mini::moe_route")
    def _moe_route_fake(topk_idx, n_experts):
        ends = topk_idx.new_empty(n_experts, dtype=torch.int32)
        order = topk_idx.new_empty(topk_idx.numel(), dtype=torch.int64)
        return ends, torch.empty_like(ends), order, torch.empty_like(order)
