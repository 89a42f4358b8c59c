"""Expert parallelism: each rank of an EP group holds E/ep of the routed experts; tokens travel to them.

    rank r of the EP group holds experts r*L .. r*L + L-1   (L = E/ep, contiguous: expert groups = ranks = devices)

As in DeepSeek-V2, a token is sent ONCE to every device that holds at least one of its K experts (at most M
devices under device-limited routing), that device runs all of the token's experts it holds and sums their
gated outputs, and one row per (token, device) comes back. Per MoE layer:

1. sender: the unique (token, device) pairs (`moe.tokens_to_groups`, the same definition that the
   communication loss and the logged `device<d>_tokens_received` count), ordered by device, then token;
2. counts: an all_to_all of [ep, 1 + L] counts (rows per device, and per local expert the (token, expert)
   pairs), so each rank learns how many rows every source sends it and how many pairs each of its experts gets;
3. one host sync: the send / receive split sizes and the number of received pairs (`.tolist()`):
   all_to_all_single takes its splits as Python ints and the receive buffers are sized by the routing;
4. three all_to_all_single with those uneven splits: the hidden rows [R, D] and the gates [R, K] (autograd),
   the local expert ids [R, K] (-1 = none; integers, no gradient);
5. receiver: each row expanded to its (row, local expert) pairs, sorted by local expert (stable: within an
   expert by source rank, then token, the order of one process), one grouped GEMM (GroupedExperts, the
   one-process kernel; the gate scales each pair inside it), and the pairs of each row summed (>= fp32);
6. the reverse all_to_all returns one row per (token, device) and the sender sums each token's device rows.

The gates travel forward through the autograd all_to_all and are applied on the receiving device. Their
gradient <grad_y, expert activation> is then computed there, where the expert's activation is, and the
backward all_to_all brings it home: exact, and the return trip stays one row per (token, device). The
alternative, returning one output per (token, expert) and gating on the sender, would undo the
deduplication on the way back (up to K rows per token again).

The row gathers and sums are written as transposes of each other (_Expand / _Reduce): every backward is a
gather plus a sum over a few slots, no atomics. Per MoE layer and forward: one small counts all_to_all, one
host sync, three all_to_alls out and one back; backward runs the autograd ones again with the splits swapped
and no host sync. Nothing loops over experts in Python. Under torch.compile this dispatch runs eager (a graph
break per MoE layer), and CUDA graphs are refused with it (training/expert_parallel.check_expert_parallel).

Padded dispatch (`dispatch="padded"`): the same exchange with sizes that do not depend on the routing. Every token
goes to every device of its EP group (T rows to each, where the exact dispatch sends only the (token, device)
pairs in use: ~1.33x the rows at EP=2 and top-6 of 64 experts, ep/M x at larger degrees), with its local expert ids
(-1 where it has none there) and gates (0) beside it in one tensor; a device computes only the pairs it owns (the
grouped GEMM stops at the last offset; the pair buffer is sized for every slot) and returns T rows to each source,
zeros for tokens it did not serve. No counts exchange and no host sync, so torch.compile traces the MoE layer whole
(no graph break, nothing the host waits for; the whole model can run as CUDA graphs), and the result equals the
exact dispatch's: the same pairs in the same order, plus zero rows. The exact dispatch moves fewer bytes; the padded
one keeps the GPU fed (on two H200s the exact dispatch's host syncs left the GPU idle two thirds of a profiled
forward; the padded one as CUDA graphs trained at 0.93x DDP's speed: docs/benchmarks.md).

Pure PyTorch: torch.distributed only. The training side (meshes, gradient averaging, checkpoints) is in
deepseek_mini/training/expert_parallel.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

from deepseek_mini.model.moe import MoE, tokens_to_groups, waited


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    # torch's functional collective with an autograd formula (backward: the same exchange, splits swapped).
    # It returns an AsyncCollectiveTensor, waited for by the first op that reads it.
    if torch.is_grad_enabled() and x.requires_grad:
        return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    # Without autograd (validation and generation run under torch.inference_mode) the plain functional op:
    # the autograd op has no CUDA kernel of its own, so under inference_mode (which skips the autograd
    # dispatch keys) torch 2.11 raised "Could not run '_c10d_functional_autograd::all_to_all_single' with
    # arguments from the 'CUDA' backend" on two H200s.
    return waited(all_to_all_single(x.contiguous(), out_splits, in_splits, group))


def _slots(keys_TX: torch.Tensor, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T sources with X slots each, every slot keyed (an unused slot by a key above all used ones). The n_valid
    used slots, ordered by key and stably by source within a key, become the rows. Returns order_R (the flat slot t*X + x of each row: its source
    is order // X) and slot_TX (the row each slot went to; n_valid, a zero padding row, for an unused one)."""
    T, X = keys_TX.shape
    order_R = torch.argsort(keys_TX.reshape(-1), stable=True)[:n_valid]
    slot_TX = torch.full((T * X,), n_valid, dtype=torch.long, device=keys_TX.device)
    slot_TX.scatter_(0, order_R, torch.arange(n_valid, device=keys_TX.device))
    return order_R, slot_TX.view(T, X)


class _Expand(torch.autograd.Function):
    """rows_R = x_T[src_R]: each source copied to its used slots. Backward: a source's gradient is the sum of
    its slots' rows (a gather over slot_TX with a zero padding row, no scatter-add)."""

    @staticmethod
    def forward(ctx, x_TD, src_R, slot_TX):
        ctx.save_for_backward(slot_TX)
        return x_TD[src_R]

    @staticmethod
    def backward(ctx, grad_RD):
        (slot_TX,) = ctx.saved_tensors
        return _sum_slots(grad_RD, slot_TX, grad_RD.dtype), None, None


class _Reduce(torch.autograd.Function):
    """out_T = the sum of the rows of its used slots, in >= fp32 (the transpose of _Expand)."""

    @staticmethod
    def forward(ctx, y_RD, src_R, slot_TX):
        ctx.save_for_backward(src_R)
        ctx.dtype = y_RD.dtype
        return _sum_slots(y_RD, slot_TX, torch.promote_types(y_RD.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_TD):
        (src_R,) = ctx.saved_tensors
        return grad_TD.to(ctx.dtype)[src_R], None, None


def _sum_slots(y_RD: torch.Tensor, slot_TX: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    padded = torch.cat([y_RD, y_RD.new_zeros(1, y_RD.shape[-1])])
    return padded[slot_TX].sum(dim=1, dtype=dtype)


DISPATCH_MODES = ("exact", "padded")


class ExpertParallel:
    """The dispatcher an MoE calls instead of running all E experts itself (MoE.expert_parallel)."""

    def __init__(self, group, n_experts: int, dispatch: str = "exact"):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"n_routed_experts={n_experts} is not divisible by the expert-parallel degree {self.size}")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch={dispatch!r}: use one of {', '.join(DISPATCH_MODES)}")
        self.n_experts, self.n_local = n_experts, n_experts // self.size
        self.first = self.rank * self.n_local  # global id of this rank's first expert
        self.dispatch = dispatch

    def __call__(self, experts: nn.Module, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, gate_TK: torch.Tensor,
                 routed_TE: torch.Tensor) -> torch.Tensor:
        """Tokens, their K experts and gates -> sum_k gate_k * expert_k(x) per token ([T, D], >= fp32)."""
        if self.dispatch == "padded":
            return self.padded(experts, x_TD, topk_idx_TK, gate_TK)
        return self.exact(experts, x_TD, topk_idx_TK, gate_TK, routed_TE)

    # Never traced by torch.compile: the split sizes are host ints read from the routing (step 3 above) and the
    # buffers are sized by them, so a compiled model breaks its graph here and runs the dispatch eager, between the
    # compiled code before (attention, router, shared experts) and after it (the residual, the next block).
    @torch.compiler.disable
    def exact(self, experts: nn.Module, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, gate_TK: torch.Tensor,
              routed_TE: torch.Tensor) -> torch.Tensor:
        """Each token sent once to every device holding one of its experts (steps 1-6 above)."""
        ep, L = self.size, self.n_local
        T, K = topk_idx_TK.shape
        dev = x_TD.device
        sent_TG = tokens_to_groups(routed_TE, ep)  # 1 where the token goes to device g (once, whatever its experts)
        send_GC = torch.cat([sent_TG.sum(0)[:, None], routed_TE.view(T, ep, L).sum(0)], dim=1).to(torch.int64)
        recv_GC = torch.empty_like(send_GC)
        dist.all_to_all_single(recv_GC, send_GC, group=self.group)  # equal splits: 1 + L counts per rank
        # the one host sync: all_to_all_single takes its split sizes as Python ints, and the buffers below are
        # sized by the routing (rows sent / received per rank, pairs received)
        sizes = torch.cat([send_GC[:, 0], recv_GC[:, 0], recv_GC[:, 1:].sum().view(1)]).tolist()
        send_splits, recv_splits, n_pairs = sizes[:ep], sizes[ep:2 * ep], sizes[-1]
        n_send, n_recv = sum(send_splits), sum(recv_splits)

        # sender: (token, device) rows by device, then token; per row its local expert ids (-1 = not on that
        # device) and gates (0 there)
        order_R, slot_TG = _slots(torch.where(sent_TG.bool(), torch.arange(ep, device=dev), ep), n_send)
        token_R, device_R = order_R // ep, order_R % ep
        x_RD = _Expand.apply(x_TD, token_R, slot_TG)
        here_RK = topk_idx_TK[token_R] // L == device_R[:, None]
        local_RK = torch.where(here_RK, topk_idx_TK[token_R] % L, -1)
        gate_RK = torch.where(here_RK, _Expand.apply(gate_TK, token_R, slot_TG), 0.0)

        x_MD = _all_to_all(x_RD, recv_splits, send_splits, self.group)
        gate_MK = _all_to_all(gate_RK, recv_splits, send_splits, self.group)
        local_MK = torch.empty(n_recv, K, dtype=local_RK.dtype, device=dev)
        dist.all_to_all_single(local_MK, local_RK.contiguous(), recv_splits, send_splits, group=self.group)

        # receiver: (row, local expert) pairs by expert, then row; one grouped GEMM; each row's pairs summed
        order_P, slot_MK = _slots(torch.where(local_MK >= 0, local_MK, L), n_pairs)
        row_P = order_P // K
        offsets_L = recv_GC[:, 1:].sum(0).cumsum(0).to(torch.int32)
        x_PD = _Expand.apply(x_MD, row_P, slot_MK)
        gate_P = _Expand.apply(gate_MK.reshape(-1, 1), order_P, slot_MK.reshape(-1, 1)).view(-1)
        if n_pairs:
            y_PD = experts(x_PD, offsets_L, gate_P)
        else:  # nothing routed here: no GEMM over zero rows, but keep the graph connected so that backward
            # still reaches the all_to_alls, which the other ranks' backward waits for
            y_PD = x_PD * 0 + gate_P[:, None] * 0
        y_MD = _Reduce.apply(y_PD, row_P, slot_MK).to(y_PD.dtype)  # summed in >= fp32, sent in the experts' dtype

        y_RD = _all_to_all(y_MD, send_splits, recv_splits, self.group)
        return _Reduce.apply(y_RD, token_R, slot_TG)  # each token: the sum of its device rows

    def padded(self, experts: nn.Module, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
               gate_TK: torch.Tensor) -> torch.Tensor:
        """Every token to every device, with its ids and gates there (module docstring): static sizes, no host sync."""
        ep, L = self.size, self.n_local
        (T, K), D = topk_idx_TK.shape, x_TD.shape[-1]
        M = ep * T  # rows every rank receives: T from each source
        splits = [T] * ep
        # sender: block g of T rows goes to device g; per row the local expert ids there (-1: none) and the gates (0),
        # one tensor in the gates' >= fp32 dtype (ids below 2^24 are exact): one collective for both, the gates' part
        # differentiable
        here_GTK = topk_idx_TK[None] // L == torch.arange(ep, device=x_TD.device)[:, None, None]
        local_GTK = torch.where(here_GTK, topk_idx_TK[None] % L, -1)
        meta_dtype = torch.promote_types(gate_TK.dtype, torch.float32)
        gate_GTK = torch.where(here_GTK, gate_TK[None].to(meta_dtype), 0.0)
        meta_GT2K = torch.cat([gate_GTK, local_GTK.to(meta_dtype)], dim=-1)
        x_MD = _all_to_all(x_TD[None].expand(ep, T, D).reshape(M, D), splits, splits, self.group)
        meta_M2K = _all_to_all(meta_GT2K.reshape(M, 2 * K), splits, splits, self.group)
        gate_MK, local_MK = meta_M2K[:, :K], meta_M2K[:, K:].detach().long()

        # receiver: all M*K (row, slot) pairs sorted by local expert, the unused ones (-1 -> L) last; the grouped GEMM
        # stops at the last expert's offset, the rows after it (undefined there) are masked on the way in and out
        order_P, slot_MK = _slots(torch.where(local_MK >= 0, local_MK, L), M * K)
        row_P = order_P // K
        counts_L = (local_MK[..., None] == torch.arange(L, device=x_TD.device)).sum((0, 1))
        offsets_L = counts_L.cumsum(0).to(torch.int32)
        used_P = (torch.arange(M * K, device=x_TD.device) < offsets_L[-1])[:, None]
        x_PD = torch.where(used_P, _Expand.apply(x_MD, row_P, slot_MK), 0.0)
        gate_P = _Expand.apply(gate_MK.reshape(-1, 1), order_P, slot_MK.reshape(-1, 1)).view(-1)
        y_PD = torch.where(used_P, experts(x_PD, offsets_L, gate_P), 0.0)
        y_MD = _Reduce.apply(y_PD, row_P, slot_MK).to(y_PD.dtype)  # summed in >= fp32, sent in the experts' dtype

        # back: T rows from every device (zeros where it served none of a token's experts), summed per token
        y_GTD = _all_to_all(y_MD, splits, splits, self.group).view(ep, T, D)
        return y_GTD.sum(0, dtype=torch.promote_types(y_GTD.dtype, torch.float32))


@torch.no_grad()
def shard_experts(model: nn.Module, group, dispatch: str = "exact") -> list[str]:
    """Keep only this rank's E/ep experts in every MoE of `model` and attach the dispatcher.

    The model is built whole first (same seed on every rank), so the experts a rank keeps are exactly the
    ones the single-process model holds at those indices. Returns the names of the sharded parameters.
    """
    names = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, MoE) or module.expert_parallel is not None:
            continue
        ep = ExpertParallel(group, module.n_experts, dispatch)
        rows = slice(ep.first, ep.first + ep.n_local)
        for pname, p in list(module.experts.named_parameters(recurse=False)):
            setattr(module.experts, pname, nn.Parameter(p[rows].clone(), requires_grad=p.requires_grad))
            names.append(f"{mod_name}.experts.{pname}" if mod_name else f"experts.{pname}")
        module.expert_parallel = ep
    return names


__all__ = ["DISPATCH_MODES", "ExpertParallel", "shard_experts"]
