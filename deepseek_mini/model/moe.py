"""DeepSeekMoE: shared experts + fine-grained routed experts, a DeepSeek router, and load balancing.

    out = shared(x) + sum_{i in topk(x)} g_i(x) * expert_i(x)

Router (scores and gates in fp32; under bf16 autocast its GEMM is bf16, as every GEMM is): affinity
s = softmax(x e^T) (V2) or sigmoid(x e^T) (V3). The top-k experts are chosen on s (+ a balancing bias
when the auxiliary-loss-free method is on), optionally only among the `topk_group` best of `n_group`
expert groups (V2's device-limited routing). Gate values come from the unbiased s, optionally
renormalised (norm_topk_prob, always for sigmoid), times routed_scaling_factor. Where the shared experts
read the same x, one GEMM computes the router's logits with their gate and up projections (MoE.forward); at
decode sizes the routed experts' kernels then finish the shared experts too (kernels/moe_decode.py).

Experts run dropless as grouped matmuls: the T*K (token, expert) assignments are sorted by expert and
every expert's rows are multiplied in one `grouped_mm` call with cumulative offsets. The gate values
scale each row inside the expert, before the down projection, so the outputs combine by a plain sum.
All shapes are static (T*K rows whatever the routing), so there is no host sync and no per-expert
Python loop, and every expert stays in the autograd graph even with zero rows (DDP sees no unused
parameters).

Balancing, each switchable from the config:
* expert-level loss      alpha1 * sum_i f_i P_i, per sequence (seq_aux) or over the batch
* device / comm losses   alpha2, alpha3 with the n_group expert groups standing in for devices (under
                         expert parallelism the groups are the real devices: model/expert_parallel.py)
* bias balancing (V3)    per-expert bias for selection only, nudged by gamma after each optimizer step
* token dropping         per-expert capacity while training; lowest-affinity assignments dropped first
The losses are returned, never hidden in backward: the trainer adds them to the loss itself.

Shape suffixes: T tokens (B*S flattened), D hidden, E routed experts, K experts per token,
G expert groups, N = T*K assignments, I expert width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini.config import ModelConfig
from deepseek_mini.kernels import moe_decode
from deepseek_mini.kernels import routing as routing_kernel
from deepseek_mini.kernels import swiglu as swiglu_kernel
from deepseek_mini.model.layers import SwiGLU, fused_linears, use_folded


def grouped_mm(x_ND: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by expert, expert e owns rows offsets[e-1]:offsets[e]) times w[e]^T. Rows after the last
    offset belong to no expert: their output is undefined (expert parallelism's padded dispatch masks them).

    w is stored nn.Linear-style [E, out, in]; the kernel wants [E, in, out], and a transposed view is
    the column-major operand the CUDA kernel prefers. On CUDA the bf16 CUTLASS kernel is the fast path
    (no host sync), so operands are cast to the autocast dtype; on CPU it runs exactly in x's dtype.
    """
    if x_ND.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x_ND, w_EOI = x_ND.to(dtype), w_EOI.to(dtype)
    else:
        w_EOI = w_EOI.to(x_ND.dtype)
    if x_ND.dtype == torch.float64:
        # F.grouped_mm takes fp32/bf16/fp16 only, so an fp64 model (the exactness tests) runs expert by
        # expert. Reading the offsets is a host sync, acceptable on this reference-precision path only;
        # an expert with no rows still multiplies a [0, in] slice, so its weights get a zero gradient.
        out, start = [], 0
        for e, end in enumerate(offsets_E.tolist()):
            out.append(x_ND[start:end] @ w_EOI[e].transpose(0, 1))
            start = end
        out.append(x_ND.new_zeros(x_ND.shape[0] - start, w_EOI.shape[1]))  # rows of no expert
        return torch.cat(out)
    if not x_ND.is_cuda and torch.compiler.is_compiling():
        return _cpu_grouped_mm(x_ND, w_EOI.contiguous(), offsets_E)
    return F.grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offsets_E)


# torch.compile on CPU: the eager CPU kernel of grouped_mm takes fp32, but the shape function that dynamo
# traces with ("meta" kernel) insists on bf16 ("Expected inputs of BF16 type"), so a compiled CPU model
# would fail. While compiling on CPU, the same eager kernel runs as an opaque custom op: dynamo only sees
# its output shape, and the backward is a second opaque op made of the same eager kernel. The ops take and
# return contiguous tensors (Inductor checks a custom op's output strides against its fake). The eager
# path (and CUDA) never goes through these.
@torch.library.custom_op("deepseek_mini::cpu_grouped_mm", mutates_args=())
def _cpu_grouped_mm(x_ND: torch.Tensor, w_EOI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x_ND, w_EOI.transpose(-2, -1), offs=offsets_E).contiguous()


@_cpu_grouped_mm.register_fake
def _(x_ND, w_EOI, offsets_E):
    return x_ND.new_empty(x_ND.shape[0], w_EOI.shape[1])


@torch.library.custom_op("deepseek_mini::cpu_grouped_mm_backward", mutates_args=())
def _cpu_grouped_mm_backward(grad_NO: torch.Tensor, x_ND: torch.Tensor, w_EOI: torch.Tensor,
                             offsets_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # out[rows of e] = x[rows of e] @ w[e]^T, so grad_x = grad @ w[e] per group and grad_w[e] = grad^T @ x
    # over e's rows (grouped_mm's 2d x 2d form: the groups split the reduced dimension)
    grad_x = F.grouped_mm(grad_NO, w_EOI, offs=offsets_E)
    grad_w = F.grouped_mm(grad_NO.t(), x_ND, offs=offsets_E)
    return grad_x.contiguous(), grad_w.contiguous()


@_cpu_grouped_mm_backward.register_fake
def _(grad_NO, x_ND, w_EOI, offsets_E):
    return x_ND.new_empty(x_ND.shape), w_EOI.new_empty(w_EOI.shape)


def _cpu_grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _cpu_grouped_mm_grad(ctx, grad_NO):
    x_ND, w_EOI, offsets_E = ctx.saved_tensors
    grad_x, grad_w = _cpu_grouped_mm_backward(grad_NO.contiguous(), x_ND, w_EOI, offsets_E)
    return grad_x, grad_w, None


_cpu_grouped_mm.register_autograd(_cpu_grouped_mm_grad, setup_context=_cpu_grouped_mm_setup)


def sort_by_expert(topk_idx_TK: torch.Tensor, routed_TE: torch.Tensor,
                   start_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The T*K assignments (flattened t*K + k) in expert order, by token within an expert, and the inverse.

    A counting sort on the one-hot routing map: assignment (t, e) goes to position start[e] (the rows of the
    experts before e) + the number of earlier tokens routed to e, a running count down each expert's column.
    It gives exactly the order of a stable argsort of the expert ids, from a scan instead of a radix sort of
    T*K keys.
    """
    T, K = topk_idx_TK.shape
    routed_ET = routed_TE.t().to(torch.int32)
    # earlier tokens with the same expert; scanned along rows of the transposed map, which the GPU scans in
    # one pass per row (down the columns it took a multi-block scan, 1.4x slower)
    before_TE = (routed_ET.cumsum(dim=1) - routed_ET).t()
    inverse_N = (start_E + before_TE).gather(1, topk_idx_TK).reshape(-1).long()
    order_N = torch.empty_like(inverse_N).scatter_(0, inverse_N, torch.arange(T * K, device=inverse_N.device))
    return order_N, inverse_N


def _copies(x_TD: torch.Tensor, order_N: torch.Tensor, k: int) -> torch.Tensor:
    """Rows sorted by expert: row n is a copy of token order[n] // K (K copies of every token)."""
    return x_TD[order_N // k]


def _sum_copies(x_ND: torch.Tensor, inverse_N: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The transpose of _copies: out[t] = sum_k x[inverse[t*K + k]], a gather plus a sum of K rows."""
    return x_ND[inverse_N].view(-1, k, x_ND.shape[-1]).sum(dim=1, dtype=dtype)


class _DispatchRows(torch.autograd.Function):
    """x_TD -> K copies of every token, sorted by expert.

    Autograd would turn the gather's backward into a scatter-add with atomics. Each (token, k) slot is
    hit exactly once, so the backward is itself a gather with the inverse permutation, followed by a
    sum over the K copies of each token: no atomics, deterministic, and much faster on the GPU.
    """

    @staticmethod
    def forward(ctx, x_TD, order_N, inverse_N, k: int):
        ctx.save_for_backward(inverse_N)
        ctx.k = k
        return _copies(x_TD, order_N, k)

    @staticmethod
    def backward(ctx, grad_ND):
        (inverse_N,) = ctx.saved_tensors
        return _sum_copies(grad_ND, inverse_N, ctx.k, grad_ND.dtype), None, None, None


class _CombineRows(torch.autograd.Function):
    """Expert outputs back to token order, out[t] = sum of its K rows, summed in >= fp32.

    The transpose of _DispatchRows. The gates were already applied inside the experts, so combining is a
    pure gather and sum, and its backward is a pure dispatch of the output gradient: one [T*K, D] copy in
    y's dtype (bf16 under autocast). Nothing of the forward is saved but the permutation.
    """

    @staticmethod
    def forward(ctx, y_ND, order_N, inverse_N, k: int):
        ctx.save_for_backward(order_N)
        ctx.k, ctx.dtype = k, y_ND.dtype
        return _sum_copies(y_ND, inverse_N, k, torch.promote_types(y_ND.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_TD):
        (order_N,) = ctx.saved_tensors
        return _copies(grad_TD.to(ctx.dtype), order_N, ctx.k), None, None, None


class _GatedSwiGLU(torch.autograd.Function):
    """a = silu(g) * u * w for h = [g | u]: the experts' activation, each row weighted by its gate value w.

    The gate multiplies in its >= fp32 dtype and the result is rounded to h's dtype (torch.compile computes
    the whole row in fp32 and rounds once). The backward is one pass over the rows
    (kernels/swiglu.py on CUDA; the same formulas in PyTorch elsewhere): w's gradient <grad_a, silu(g) * u> is
    computed while h is read for grad_h, instead of in a second pass over h.
    """

    @staticmethod
    def forward(ctx, h_NH, w_N):
        ctx.save_for_backward(h_NH, w_N)
        g_NI, u_NI = h_NH.chunk(2, dim=-1)
        return (F.silu(g_NI) * u_NI * w_N[:, None]).to(h_NH.dtype)

    @staticmethod
    def backward(ctx, grad_NI):
        h_NH, w_N = ctx.saved_tensors
        if swiglu_kernel.available(h_NH):
            return swiglu_kernel.swiglu_backward(grad_NI, h_NH, w_N)
        dtype = torch.promote_types(h_NH.dtype, w_N.dtype)
        g_NI, u_NI = h_NH.to(dtype).chunk(2, dim=-1)
        grad_NI = grad_NI.to(dtype)
        sig_NI = torch.sigmoid(g_NI)
        silu_NI = g_NI * sig_NI
        grad_w_N = (grad_NI * silu_NI * u_NI).sum(dim=-1)
        grad_NI = grad_NI * w_N[:, None]
        grad_g_NI = grad_NI * u_NI * sig_NI * (1 + g_NI * (1 - sig_NI))
        return torch.cat([grad_g_NI, grad_NI * silu_NI], dim=-1).to(h_NH.dtype), grad_w_N.to(w_N.dtype)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj [E, 2I, D] (gate rows first), down_proj [E, D, I].

    Each row's gate value scales the activation before the down projection, g * (a W_down^T) =
    (g * a) W_down^T. Applied there, the weighting fuses into the SwiGLU kernel, the gate's gradient
    <a, grad(g a)> is an I-wide dot in the SwiGLU backward, and combining the expert outputs needs
    neither the gates nor a saved copy of the [T*K, D] outputs.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def forward(self, x_ND: torch.Tensor, offsets_E: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
        if moe_decode.available(x_ND, self.gate_up_proj, self.down_proj, weights_N):
            # inference at decode sizes on CUDA (a few rows per expert): the products are weight-bandwidth bound, and
            # kernels/moe_decode.py reads each busy expert's weights once, with the SwiGLU and the gates fused in
            return moe_decode.grouped_swiglu_experts(x_ND, self.gate_up_proj, self.down_proj, offsets_E, weights_N)
        h_NH = grouped_mm(x_ND, self.gate_up_proj, offsets_E)  # H = 2I: [gate | up]
        return grouped_mm(_GatedSwiGLU.apply(h_NH, weights_N), self.down_proj, offsets_E)


def fp32_out_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the router's fp32 logits of a 16-bit model may come from a 16-bit GEMM that writes fp32
    (torch.mm's out_dtype, CUDA only): the same logits as the fp32 GEMM of upcast copies, since a product of two
    16-bit values is exact in fp32 and both sum in fp32. Without TF32 that fp32 GEMM is a SIMT kernel plus a
    split-K reduction, 6.5 us per layer in a decode step of `small` at batch 32 (H200, issue 24); this one runs on
    tensor cores. Inference only: training keeps the GEMM its runs were measured with."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def mm_fp32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x w^T in fp32 from 16-bit x and w (fp32_out_mm_available): torch.mm's out_dtype on CUDA, elsewhere the fp32 GEMM
    of upcast copies, the same values."""
    if x.is_cuda:
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return F.linear(x.float(), w.float())


class Router(nn.Module):
    """Scores, selection and gate values. `weight` is the hub's `mlp.gate.weight` [E, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        if cfg.bias_update_speed > 0:
            # V3's aux-loss-free balancing: a selection-only bias, not trained by gradients (HF: this name).
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
            # Assignments per expert since the last bias update; reset after each optimizer step, when
            # checkpoints are taken, so it need not be saved.
            self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts), persistent=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x_TD: torch.Tensor):
        return self.route(self.logits(x_TD))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The router's logits [T, E] in >= fp32 (an fp64 model routes in fp64)."""
        if fp32_out_mm_available(x_TD, self.weight):
            return mm_fp32_out(x_TD, self.weight)
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        return F.linear(x_TD.to(dtype), self.weight.to(dtype))

    def route(self, logits_TE: torch.Tensor):
        """Router logits -> (scores, top-k expert ids, gate values); scores and gates in >= fp32."""
        logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
        if self.cfg.scoring_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        select_TE = scores_TE.detach()
        if self.e_score_correction_bias is not None:
            select_TE = select_TE + self.e_score_correction_bias
        if self.cfg.topk_method == "group_limited_greedy":
            select_TE = self._limit_to_groups(select_TE)
        # the first K of a stable descending sort (ties: the lower expert id first). On CUDA one small Triton
        # kernel (kernels/routing.py); elsewhere the sort itself. Not torch.topk: a separate radix-select pass
        # that was slower in the compiled step
        if routing_kernel.available(select_TE, self.top_k):
            topk_idx_TK = routing_kernel.top_k(select_TE, self.top_k)
        else:
            topk_idx_TK = select_TE.sort(dim=-1, descending=True, stable=True).indices[:, : self.top_k]
        weights_TK = scores_TE.gather(1, topk_idx_TK)
        if self.cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.cfg.routed_scaling_factor
        return scores_TE, topk_idx_TK, weights_TK

    def route_by_expert(self, logits_TE: torch.Tensor):
        """route() for the decode kernels (kernels/moe_decode): (gates [T, K], then moe_decode.route's offsets,
        counts, order and inverse of the selected experts). One kernel, route_logits, when the selection is the
        plain top-k of fp32 scores; else route() and moe_decode.route."""
        if self.cfg.topk_method == "greedy" and logits_TE.dtype == torch.float32:
            return moe_decode.route_logits(logits_TE, self.top_k, self.cfg.scoring_func == "softmax",
                                           self.e_score_correction_bias, self.cfg.norm_topk_prob,
                                           self.cfg.routed_scaling_factor)
        _, topk_idx_TK, weights_TK = self.route(logits_TE)
        return (weights_TK, *moe_decode.route(topk_idx_TK, self.n_experts))

    def _limit_to_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group groups with the highest best-expert score; mask the rest out."""
        T, G = select_TE.shape[0], self.cfg.n_group
        group_scores_TG = select_TE.view(T, G, -1).amax(dim=-1)
        top_groups_TM = group_scores_TG.topk(self.cfg.topk_group, dim=-1, sorted=False).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, top_groups_TM, True)
        keep_TE = keep_TG.repeat_interleave(self.n_experts // G, dim=1)
        return select_TE.masked_fill(~keep_TE, float("-inf"))

    @torch.no_grad()
    def update_bias(self, all_reduce=None) -> None:
        """b_i += gamma * sign(mean load - load_i), zero-centred, from the counts since the last update."""
        if self.e_score_correction_bias is None:
            return
        counts_E = self.tokens_per_expert
        if all_reduce is not None:
            all_reduce(counts_E)
        delta_E = self.cfg.bias_update_speed * torch.sign(counts_E.mean() - counts_E)
        self.e_score_correction_bias += delta_E - delta_E.mean()
        counts_E.zero_()


def waited(t: torch.Tensor) -> torch.Tensor:
    """A functional collective's result as a plain tensor. Eager, it is an AsyncCollectiveTensor to wait for; in
    code torch.compile traced it can be a plain tensor already: an unconditional .wait() failed there on two H200s
    ("'Tensor' object has no attribute 'wait'", the padded EP dispatch in a compiled validation step; not
    reproduced on CPU with gloo)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return t.wait() if isinstance(t, AsyncCollectiveTensor) else t


def _sum_over(counts: torch.Tensor, group) -> torch.Tensor:
    """Hard counts summed over the ranks of an expert-parallel group (they carry no gradient). The functional
    collective, which torch.compile traces (an in-place c10d all_reduce would break the graph)."""
    from torch.distributed._functional_collectives import all_reduce

    return waited(all_reduce(counts.detach(), "sum", group))


def tokens_to_groups(routed_XE: torch.Tensor, n_groups: int) -> torch.Tensor:
    """1 where a token has at least one expert in group g, over the last dim ([..., E] -> [..., G]).

    The one definition of "tokens a device receives" (DeepSeek-V2's L_CommBal): a token goes once to each
    device holding any of its experts, however many. The communication loss, the logged tokens received
    per device and the expert-parallel dispatcher (the rows it sends) all count with it.
    """
    return routed_XE.view(*routed_XE.shape[:-1], n_groups, -1).amax(-1)


def training_kernels(cfg: ModelConfig, activation_dtype: torch.dtype) -> dict:
    """The Triton kernels a training step of this model launches, as kernels/runtime.compile_ahead jobs: the
    router's top-k (fp32 selection scores, Router.route) and, for 16-bit activations (bf16/fp16 autocast or
    weights), the routed experts' SwiGLU backward (_GatedSwiGLU; gate values in fp32). Empty for a dense model."""
    if not cfg.num_moe_layers:
        return {}
    jobs = {}
    if 0 < cfg.num_experts_per_tok <= cfg.n_routed_experts <= routing_kernel.MAX_EXPERTS:
        jobs.update(routing_kernel.warm_up(cfg.n_routed_experts, cfg.num_experts_per_tok))
    if activation_dtype in (torch.bfloat16, torch.float16):
        jobs.update(swiglu_kernel.warm_up(cfg.moe_intermediate_size, activation_dtype, torch.float32))
    return jobs


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = GroupedExperts(self.n_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts else None)
        # Expert parallelism (model/expert_parallel.py): None in one process; else this rank holds only its
        # E/ep experts and the dispatcher sends each token once to every rank owning one of its experts. A
        # plain attribute, not a submodule: it holds a process group, no parameters.
        self.expert_parallel = None
        # [router ; shared gate ; shared up] rows, concatenated once for inference (fold(); never saved)
        self.register_buffer("router_shared_folded", None, persistent=False)

    @torch.no_grad()
    def fold(self) -> bool:
        """Concatenate the router's weight and the shared experts' gate and up weights once, for inference: a 16-bit
        model then computes all three in one GEMM that writes fp32 (the router's logits need fp32; the gate and up
        values are the 16-bit GEMM's, rounded from the same fp32 sums), one kernel per layer instead of two. False
        when already folded, without shared experts, or with weights of different dtypes."""
        shared = self.shared_experts
        if self.router_shared_folded is not None or shared is None:
            return False
        weights = (self.gate.weight, shared.gate_proj.weight, shared.up_proj.weight)
        if len({w.dtype for w in weights}) > 1:
            return False
        self.router_shared_folded = torch.cat(weights)
        return True

    def unfold(self) -> None:
        self.router_shared_folded = None

    def forward(self, x_BSD: torch.Tensor):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        T, K, E = B * S, self.top_k, self.n_experts
        x_in = x_TD
        if x_TD.is_cuda and torch.is_autocast_enabled("cuda"):  # move copies of bf16, not of fp32
            x_in = x_TD.to(torch.get_autocast_dtype("cuda"))
        fused = self._router_and_shared(x_TD)
        logits_TE = self.gate.logits(x_TD) if fused is None else fused[0]
        if not self.training and self.expert_parallel is None and moe_decode.available(
                x_in, self.experts.gate_up_proj, self.experts.down_proj, logits_TE, n_rows=T * K):
            out_TD, shared_TD, counts_E = self._decode_experts(x_in, logits_TE, fused)
            out_BSD, stats = self._finish(out_TD, x_BSD, shared_TD, counts_E, x_TD.new_zeros((), dtype=torch.float32))
            return out_BSD, {}, stats
        shared_TD = None
        if fused is not None:  # the shared experts' output from the fused GEMM's gate and up projections
            # fp32 values for 16-bit rows are the folded GEMM's: rounded as the 16-bit GEMM's would be
            low = x_TD.dtype in (torch.bfloat16, torch.float16)
            shared_TD = self.shared_experts.down(*(t.to(x_TD.dtype) if low and t.dtype == torch.float32 else t
                                                   for t in fused[1:]))
        scores_TE, topk_idx_TK, weights_TK = self.gate.route(logits_TE)

        # one-hot routing map; its column sums are the per-expert loads (no bincount: no host sync)
        routed_TE = torch.zeros(T, E, device=x_TD.device, dtype=torch.float32)
        routed_TE.scatter_(1, topk_idx_TK, 1.0)
        counts_E = routed_TE.sum(dim=0)
        if self.training and self.gate.e_score_correction_bias is not None:
            self.gate.tokens_per_expert += counts_E

        # expert e owns rows start[e]:offsets[e] of the N = T*K assignments sorted by expert
        offsets_E = counts_E.cumsum(0).to(torch.int32)
        start_E = offsets_E - counts_E.to(torch.int32)
        # sort the assignments by expert (order), and where each one went (inverse)
        drop = self.training and self.cfg.capacity_factor is not None
        gate_TK = weights_TK
        dropped_fraction = x_TD.new_zeros((), dtype=torch.float32)
        if drop:  # by descending affinity within an expert, so the capacity keeps the best assignments
            by_affinity_N = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
            order_N = by_affinity_N[torch.argsort(topk_idx_TK.reshape(-1)[by_affinity_N], stable=True)]
            inverse_N = torch.empty_like(order_N)
            inverse_N[order_N] = torch.arange(T * K, device=x_TD.device)
            # a dropped assignment is still computed (shapes stay static) but contributes nothing
            capacity = math.ceil(self.cfg.capacity_factor * T * K / E)
            rank_in_expert_N = torch.arange(T * K, device=x_TD.device) - start_E[topk_idx_TK.reshape(-1)[order_N]]
            keep_TK = (rank_in_expert_N < capacity)[inverse_N].view(T, K)
            gate_TK = torch.where(keep_TK, gate_TK, torch.zeros_like(gate_TK))
            dropped_fraction = 1.0 - keep_TK.float().mean()
        elif self.expert_parallel is None:
            order_N, inverse_N = sort_by_expert(topk_idx_TK, routed_TE, start_E)

        if self.expert_parallel is None:
            x_ND = _DispatchRows.apply(x_in, order_N, inverse_N, K)
            # each assignment's gate in expert order: the [T*K, 1] gates dispatched with one copy each
            gate_N = _DispatchRows.apply(gate_TK.reshape(-1, 1), order_N, inverse_N, 1).view(-1)
            y_ND = self.experts(x_ND, offsets_E, gate_N)
            # back to token order, summed over each token's K (already weighted) expert outputs
            out_TD = _CombineRows.apply(y_ND, order_N, inverse_N, K)
        else:  # each token goes once to every device holding one of its experts; one summed row per device returns
            out_TD = self.expert_parallel(self.experts, x_in, topk_idx_TK, gate_TK, routed_TE)
        aux = self.balance_losses(scores_TE, routed_TE, B, S) if self.training else {}
        out_BSD, stats = self._finish(out_TD, x_BSD, shared_TD, counts_E, dropped_fraction)
        if self.expert_parallel is not None:  # tokens this rank sends to each device: the dispatcher's rows
            stats["tokens_per_device"] = tokens_to_groups(routed_TE, self.expert_parallel.size).sum(0)
        return out_BSD, aux, stats

    def _router_and_shared(self, x_TD: torch.Tensor):
        """The router's logits and the shared experts' gate and up projections from one GEMM, as they all read x:
        (logits_TE, gate_TI, up_TI), or None where the router takes its own GEMM (Router.forward).
        The router's own GEMM is narrow (E = 64 outputs in `small`), its backward two more small GEMMs and another
        [T, D] gradient to add. One GEMM needs the router's dtype to be the shared experts': under autocast or in an
        fp32 / fp64 model (layers.fused_linears), or, in a 16-bit model at inference, with the weights folded
        (fold()): a GEMM that writes fp32 (mm_fp32_out), whose gate and up values rounded to x's dtype are the 16-bit
        GEMM's. Gate and up come in the GEMM's dtype (fp32 when folded): the caller rounds them."""
        shared = self.shared_experts
        if shared is None:
            return None
        if torch.is_autocast_enabled(x_TD.device.type) or x_TD.dtype in (torch.float32, torch.float64):
            return fused_linears(x_TD, self.gate.weight, shared.gate_proj.weight, shared.up_proj.weight)
        if use_folded(self.router_shared_folded) and fp32_out_mm_available(x_TD, self.router_shared_folded):
            width = shared.gate_proj.weight.shape[0]
            return mm_fp32_out(x_TD, self.router_shared_folded).split([self.n_experts, width, width], dim=-1)
        return None

    def _decode_experts(self, x_TD: torch.Tensor, logits_TE: torch.Tensor, fused):
        """Inference at decode sizes on CUDA (kernels/moe_decode.py): one kernel selects the experts and sorts the
        assignments by expert (the order of sort_by_expert; Router.route_by_expert), the expert kernels read each
        token's row and gate where they are, and the sum over each token's K outputs is a gather that torch.compile
        fuses with what follows. The one-hot map, its scans and the copies of the rows in expert order (about 9 small
        kernels per layer) are not needed here. Where the router's GEMM also gave the shared experts' gate and up
        projections (`fused`, _router_and_shared), the same two kernels compute their SwiGLU and down projection.
        -> (routed output [T, D] in >= fp32, shared experts' output [T, D] or None, tokens per expert)."""
        T, K = x_TD.shape[0], self.top_k
        weights_TK, offsets_E, counts_E, order_N, inverse_N = self.gate.route_by_expert(logits_TE)
        shared = () if fused is None else (*fused[1:], self.shared_experts.down_proj.weight)
        y_ND = moe_decode.grouped_swiglu_experts(x_TD, self.experts.gate_up_proj, self.experts.down_proj, offsets_E,
                                                 weights_TK, order_N, K, *shared)
        out_TD = _sum_copies(y_ND[:T * K], inverse_N, K, torch.promote_types(y_ND.dtype, torch.float32))
        return out_TD, (None if fused is None else y_ND[T * K:]), counts_E.float()

    def _finish(self, out_TD, x_BSD, shared_TD, counts_E, dropped_fraction):
        """The routed output in x's dtype plus the shared experts', as [B, S, D], and the layer's statistics."""
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        out_TD = out_TD.to(x_TD.dtype)
        if self.shared_experts is not None:
            out_TD = out_TD + (self.shared_experts(x_TD) if shared_TD is None else shared_TD)
        stats = {"tokens_per_expert": counts_E.detach(), "dropped_fraction": dropped_fraction.detach()}
        return out_TD.view(x_BSD.shape), stats

    def balance_losses(self, scores_TE, routed_TE, B, S) -> dict[str, torch.Tensor]:
        """DeepSeek-V2 eqs 23-31, per sequence when seq_aux (as released), else over the whole batch.

        f counts are hard (no gradient); gradients reach the router through the mean scores P. Each
        loss equals its alpha at perfect balance.
        """
        cfg, E, K, G = self.cfg, self.n_experts, self.top_k, self.cfg.n_group
        if cfg.scoring_func == "sigmoid":  # V3's complementary loss normalises sigmoid scores to sum 1
            scores_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        if cfg.seq_aux:
            scores_BSE, routed_BSE = scores_TE.view(B, S, E), routed_TE.view(B, S, E)
        else:
            scores_BSE, routed_BSE = scores_TE.view(1, B * S, E), routed_TE.view(1, B * S, E)
        n_tok = scores_BSE.shape[1]
        counts_BE = routed_BSE.sum(dim=1)
        ep = self.expert_parallel
        # Under expert parallelism the groups are the real devices (n_group = ep, checked at start). Per
        # sequence (seq_aux) every count is local; over the batch, the hard counts f are those of the whole EP
        # group's batch, the tokens its devices really computed and received (one small all-reduce; P keeps
        # its gradient and is averaged over ranks with the other gradients).
        batch_counts = ep is not None and not cfg.seq_aux
        if batch_counts:
            counts_BE = _sum_over(counts_BE, ep.group)
            n_tok *= ep.size
        f_BE = counts_BE * (E / (K * n_tok))
        P_BE = scores_BSE.mean(dim=1)
        losses = {}
        if cfg.aux_loss_alpha > 0:
            losses["expert_balance"] = cfg.aux_loss_alpha * (f_BE * P_BE).sum(-1).mean()
        if cfg.device_aux_loss_alpha > 0 or cfg.comm_aux_loss_alpha > 0:
            P_BG = P_BE.view(-1, G, E // G).sum(-1)
            if cfg.device_aux_loss_alpha > 0:
                f_BG = f_BE.view(-1, G, E // G).mean(-1)
                losses["device_balance"] = cfg.device_aux_loss_alpha * (f_BG * P_BG).sum(-1).mean()
            if cfg.comm_aux_loss_alpha > 0:
                # M = devices a token may be sent to: topk_group when routing is group-limited
                M = cfg.topk_group if cfg.topk_method == "group_limited_greedy" else min(K, G)
                received_BG = tokens_to_groups(routed_BSE, G).sum(dim=1)  # tokens each device receives
                if batch_counts:
                    received_BG = _sum_over(received_BG, ep.group)
                f_comm_BG = received_BG * (G / (M * n_tok))
                losses["comm_balance"] = cfg.comm_aux_loss_alpha * (f_comm_BG * P_BG).sum(-1).mean()
        return losses
