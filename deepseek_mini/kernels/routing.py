"""The router's top-k for training (Triton): each token's K best experts by selection score, as one small kernel.

Router.route picks, per row of the [T, E] selection scores, the K highest, the lowest index first among equal
scores: the first K of a stable descending sort. Written as that sort, torch.compile fuses a bitonic sorting
network into the routing kernel. It runs fast (torch.topk's separate radix select cost 0.65 ms per `small` step on
an H100), but the network is large to compile: on an H200 its three Triton configurations finished ~19 s after the
kernels compiled with them, the largest 13 s after the one before (docs/benchmarks.md). Here K rounds of "take
the row's maximum, mark it taken" select the same experts in the same order. Inductor calls the kernel as an
opaque custom op, and Triton compiles it once, in one configuration: a cold `small_gpu` start compiled for 14.7 s
instead of 27.1 s on one machine, at the same tokens/s.

fp32 scores only (what the router selects on in a bf16 or fp32 model): an fp64 model's scores would be rounded
first, which could merge two scores the sort keeps apart. Elsewhere the caller sorts.
"""

from __future__ import annotations

import torch

from deepseek_mini.kernels import runtime
from deepseek_mini.kernels.runtime import tl, triton

MAX_EXPERTS = 512  # one row per program row: E scores in registers

if triton is not None:

    @triton.jit(do_not_specialize=["T"])  # T only bounds a mask: one compiled variant for every number of rows
    def _top_k_rows(select_ptr, ids_ptr, T, E, stride_t, K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_E: tl.constexpr):
        offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, BLOCK_E)
        t_mask = offs_t < T
        select = tl.load(select_ptr + offs_t[:, None] * stride_t + offs_e[None, :],
                         mask=t_mask[:, None] & (offs_e < E)[None, :], other=float("-inf"))
        taken = (offs_t[:, None] < 0) | (offs_e >= E)[None, :]  # [BLOCK_T, BLOCK_E]: the padding columns
        for k in tl.static_range(K):
            candidates = tl.where(taken, float("-inf"), select)
            best = tl.max(candidates, axis=1)
            # the lowest untaken index among the best: a stable sort's order, also among -inf scores; a NaN row
            # matches nothing and gets index E - 1 (never out of range)
            idx = tl.min(tl.where((candidates == best[:, None]) & ~taken, offs_e[None, :], BLOCK_E), axis=1)
            idx = tl.minimum(idx, E - 1)
            tl.store(ids_ptr + offs_t * K + k, idx.to(tl.int64), mask=t_mask)
            taken = taken | (offs_e[None, :] == idx[:, None])


def available(select: torch.Tensor, k: int) -> bool:
    """Triton can run on these scores (CUDA, or the interpreter), they are fp32 rows, and there are enough; and,
    outside torch.compile, the kernel is not still being compiled ahead (kernels/runtime.py): the caller's sort
    selects the same experts in the same order meanwhile, so the validation before fit waits for no compiler."""
    return (runtime.runs_on(select) and select.dtype == torch.float32 and select.dim() == 2
            and 0 < k <= select.shape[1] <= MAX_EXPERTS
            and (torch.compiler.is_compiling() or not runtime.compiling(_top_k_rows)))


def _top_k_op(select: torch.Tensor, k: int) -> torch.Tensor:
    T, E = select.shape
    select = runtime.rows_contiguous(select)
    ids = torch.empty(T, k, dtype=torch.long, device=select.device)
    if T == 0:  # no rows, no programs
        return ids
    _launch(select, ids, T, E, select.stride(0), k)
    return ids


def _launch(select, ids, T: int, E: int, stride_t: int, k: int, warmup: bool = False):
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T = max(1, min(64, 4096 // BLOCK_E))  # ~4K scores per program
    return runtime.launch(_top_k_rows, (triton.cdiv(T, BLOCK_T),), select, ids, T, E, stride_t, K=k,
                          BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, num_warps=4, warmup=warmup)


def warm_up(n_experts: int, k: int) -> dict:
    """The compile_ahead job (kernels/runtime.py) for the top-k of contiguous fp32 [T, n_experts] scores."""
    if triton is None:
        return {}
    return {f"route_top_k E={n_experts} K={k}": (_top_k_rows, lambda: _launch(
        torch.float32, torch.int64, 1024, n_experts, n_experts, k, warmup=True))}


def top_k(select: torch.Tensor, k: int) -> torch.Tensor:
    """select [T, E] fp32 -> [T, k] int64 expert ids: `select.sort(dim=-1, descending=True, stable=True)
    .indices[:, :k]` (call `available` first)."""
    return torch.ops.deepseek_mini.route_top_k(select, k)


if triton is not None:
    # an opaque custom op: torch.compile calls the kernel instead of compiling a sort of its own
    torch.library.custom_op("deepseek_mini::route_top_k", _top_k_op, mutates_args=())

    @torch.library.register_fake("deepseek_mini::route_top_k")
    def _top_k_fake(select, k):
        return select.new_empty((select.shape[0], k), dtype=torch.long)
