"""Expert parallelism: each rank of an EP group holds E/ep of the routed experts; tokens travel to them.

    rank r of the EP group holds experts r*L .. r*L + L-1   (L = E/ep, contiguous: expert groups = ranks)

MoE.forward routes every local token over all E experts exactly as in one process and sorts the T*K
(token, expert) rows by expert. Because each rank's experts are contiguous, rows sorted by expert are also
sorted by destination rank, so the dispatch is:

1. counts: an all_to_all of the [ep, L] per-expert row counts, so each rank learns how many rows every
   source sends to each of its L experts;
2. one host sync: the send and receive split sizes (`.tolist()`), which all_to_all_single needs as
   Python ints (the buffer sizes depend on the routing);
3. rows (and their gate values) by all_to_all_single with those uneven splits;
4. the received rows arrive by source rank, then by expert; a stable sort by local expert makes them one
   grouped GEMM over L experts (GroupedExperts, the same kernel as in one process), then back to source order;
5. the outputs return by the reverse all_to_all and MoE combines them with the gates as in one process.

The all_to_alls are torch's autograd functional collectives: backward runs the same exchange with the
splits swapped, so an expert's gradient sums the contributions of every rank's tokens. Nothing here loops
over experts in Python. Per MoE layer and step: one small counts all_to_all and one host sync in forward,
two all_to_alls each way for the rows (features and gates) and one back for the outputs; backward adds
no host sync (the splits are remembered).

Pure PyTorch: torch.distributed only. The training side (meshes, gradient averaging, checkpoints) is in
deepseek_mini/training/expert_parallel.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from deepseek_mini.model.moe import MoE, _DispatchRows


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    # torch's functional collective with an autograd formula (backward: the same exchange, splits swapped).
    # It returns an AsyncCollectiveTensor, waited for by the first op that reads it.
    return all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)


class ExpertParallel:
    """The dispatcher an MoE calls instead of running all E experts itself (MoE.expert_parallel)."""

    def __init__(self, group, n_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if n_experts % self.size:
            raise ValueError(f"n_routed_experts={n_experts} is not divisible by the expert-parallel degree {self.size}")
        self.n_experts, self.n_local = n_experts, n_experts // self.size
        self.first = self.rank * self.n_local  # global id of this rank's first expert
        self.last_received = 0  # rows this rank's experts received in the last forward (for logging)

    def __call__(self, experts: nn.Module, x_ND: torch.Tensor, counts_E: torch.Tensor,
                 gate_N: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert (counts_E rows each) -> their expert outputs, in the same order."""
        ep, L = self.size, self.n_local
        send_RL = counts_E.detach().to(torch.int64).view(ep, L)
        recv_RL = torch.empty_like(send_RL)
        dist.all_to_all_single(recv_RL, send_RL, group=self.group)  # equal splits: L counts per rank
        # the one host sync: all_to_all_single takes its split sizes as Python ints
        sizes = torch.cat([send_RL.sum(1), recv_RL.sum(1), recv_RL.reshape(-1)]).tolist()
        send_splits, recv_splits = sizes[:ep], sizes[ep:2 * ep]
        n_recv = sum(recv_splits)
        self.last_received = n_recv

        x_MD = _all_to_all(x_ND, recv_splits, send_splits, self.group)
        gate_M = _all_to_all(gate_N, recv_splits, send_splits, self.group)
        # received rows: by source rank, within a source by local expert; regroup by local expert (stable
        # in source rank, so the order of rows within an expert is that of one process: by source, then token)
        expert_M = torch.repeat_interleave(torch.arange(L, device=x_ND.device).repeat(ep), recv_RL.reshape(-1),
                                           output_size=n_recv)
        order_M = torch.argsort(expert_M, stable=True)
        inverse_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(n_recv, device=order_M.device))
        offsets_L = recv_RL.sum(0).cumsum(0).to(torch.int32)
        x_sorted = _DispatchRows.apply(x_MD, order_M, inverse_M, 1)
        gate_sorted = _DispatchRows.apply(gate_M.view(-1, 1), order_M, inverse_M, 1).view(-1)
        if n_recv:
            y_sorted = experts(x_sorted, offsets_L, gate_sorted)
        else:  # nothing routed here: no GEMM over zero rows, but keep the graph connected so that backward
            # still reaches both all_to_alls, which the other ranks' backward waits for
            y_sorted = x_sorted * 0 + gate_sorted[:, None] * 0
        y_MD = _DispatchRows.apply(y_sorted, inverse_M, order_M, 1)  # back to the received (source) order
        return _all_to_all(y_MD, send_splits, recv_splits, self.group)


@torch.no_grad()
def shard_experts(model: nn.Module, group) -> list[str]:
    """Keep only this rank's E/ep experts in every MoE of `model` and attach the dispatcher.

    The model is built whole first (same seed on every rank), so the experts a rank keeps are exactly the
    ones the single-process model holds at those indices. Returns the names of the sharded parameters.
    """
    names = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, MoE) or module.expert_parallel is not None:
            continue
        ep = ExpertParallel(group, module.n_experts)
        rows = slice(ep.first, ep.first + ep.n_local)
        for pname, p in list(module.experts.named_parameters(recurse=False)):
            setattr(module.experts, pname, nn.Parameter(p[rows].clone(), requires_grad=p.requires_grad))
            names.append(f"{mod_name}.experts.{pname}" if mod_name else f"experts.{pname}")
        module.expert_parallel = ep
    return names


__all__ = ["ExpertParallel", "shard_experts"]
