"""DeepSeekMoE: grouped experts vs a per-expert loop, routing rules, balance losses, bias balancing, dropping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import max_diff_under_interpreter, requires_triton, worst_of
from model_helpers import SMALL_MODEL

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2
from deepseek_mini.model.moe import MoE

BASE = {**SMALL_MODEL, "num_hidden_layers": 2}


def cfg_of(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})


def make_moe(cfg: ModelConfig, dtype=torch.float64, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe.to(dtype)


def reference_moe(moe: MoE, cfg: ModelConfig, x_BSD: torch.Tensor, keep_TK: torch.Tensor | None = None):
    """Loop reference: route as DeepSeekMoE does (affinities = softmax or sigmoid of the router logits, the top-K
    experts by affinity, gate weights = their affinities, renormalised if norm_topk_prob, times
    routed_scaling_factor), then for each expert e run the rows routed to e through SwiGLU with e's own weights.
    keep_TK masks out dropped assignments."""
    B, S, D = x_BSD.shape
    x = x_BSD.reshape(B * S, D)
    inter = cfg.moe_intermediate_size
    logits = x @ moe.gate.weight.T
    scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
    idx = scores.topk(cfg.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    w = w * cfg.routed_scaling_factor
    if keep_TK is not None:
        w = w * keep_TK
    out = torch.zeros_like(x)
    for e in range(cfg.n_routed_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        gate_up, down = moe.experts.gate_up_proj[e], moe.experts.down_proj[e]
        h = x[tok]
        y = (F.silu(h @ gate_up[:inter].T) * (h @ gate_up[inter:].T)) @ down.T
        out = out.index_add(0, tok, y * w[tok, slot, None])
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out.view(B, S, D), idx, w


# ---------------------------------------------------------------------- grouped experts vs loop
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_grouped_experts_match_loop_reference_incl_idle_experts(dtype, tol):
    # fp32 runs the real F.grouped_mm kernel; fp64 the exact expert-by-expert fallback
    cfg = cfg_of()
    moe = make_moe(cfg, dtype)
    ref_moe = make_moe(cfg, dtype)  # same seed: same weights, separate graph for separate grads
    with torch.no_grad():
        # experts 6 and 7 get no tokens: positive inputs, and their router rows point the other way
        for m in (moe, ref_moe):
            m.gate.weight[6:] = -m.gate.weight[6:].abs() - 0.5
            m.gate.weight[:6] = m.gate.weight[:6].abs()
    x = torch.rand(2, 16, cfg.hidden_size, dtype=dtype, generator=torch.Generator().manual_seed(3))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    moe.train()
    out, _, stats = moe(x1)
    ref, idx, _ = reference_moe(ref_moe, cfg, x2)
    assert stats["tokens_per_expert"][6:].sum() == 0 and stats["tokens_per_expert"].sum() == 2 * 16 * 2
    torch.testing.assert_close(stats["tokens_per_expert"], torch.bincount(idx.flatten(), minlength=8).float())
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)

    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    pairs = [(moe.experts.gate_up_proj, ref_moe.experts.gate_up_proj),
             (moe.experts.down_proj, ref_moe.experts.down_proj), (moe.gate.weight, ref_moe.gate.weight), (x1, x2),
             (moe.shared_experts.down_proj.weight, ref_moe.shared_experts.down_proj.weight)]
    for got, want in pairs:
        assert got.grad is not None
        torch.testing.assert_close(got.grad, want.grad, atol=tol, rtol=tol)
    # idle experts are still in the graph: gradient present, exactly zero
    assert bool((moe.experts.gate_up_proj.grad[6:] == 0).all()) and bool((moe.experts.down_proj.grad[6:] == 0).all())
    assert moe.experts.gate_up_proj.grad[:6].abs().sum() > 0


def test_sigmoid_norm_topk_gates_sum_to_scaling_factor():
    cfg = cfg_of(scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, num_experts_per_tok=3)
    moe = make_moe(cfg)
    x = torch.randn(40, cfg.hidden_size, dtype=torch.float64)
    scores, idx, w = moe.gate(x)
    torch.testing.assert_close(w.sum(-1), torch.full((40,), 2.5, dtype=torch.float64))
    sel = scores.gather(1, idx)
    torch.testing.assert_close(w, 2.5 * sel / sel.sum(-1, keepdim=True))
    torch.testing.assert_close(scores, torch.sigmoid(x @ moe.gate.weight.T))
    # the full layer with sigmoid scoring still equals the loop reference
    out, _, _ = moe.eval()(x.view(4, 10, -1))
    torch.testing.assert_close(out, reference_moe(moe, cfg, x.view(4, 10, -1))[0], atol=1e-12, rtol=0)


def test_softmax_gates_are_unnormalised_scores_times_scaling():
    # V2: no renormalisation, gate = s_i * routed_scaling_factor, so the gates sum to less than the factor
    cfg = cfg_of(routed_scaling_factor=16.0)
    moe = make_moe(cfg)
    x = torch.randn(30, cfg.hidden_size, dtype=torch.float64)
    scores, idx, w = moe.gate(x)
    torch.testing.assert_close(scores.sum(-1), torch.ones(30, dtype=torch.float64))
    torch.testing.assert_close(w, 16.0 * scores.gather(1, idx))
    assert bool((w.sum(-1) < 16.0).all())
    # selected experts are the top-k scores
    torch.testing.assert_close(w.sort(-1).values, 16.0 * scores.topk(2, -1).values.sort(-1).values)


def test_group_limited_routing_stays_in_best_groups():
    cfg = cfg_of(n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy", n_group=4,
                 topk_group=2)
    moe = make_moe(cfg)
    x = torch.randn(2000, cfg.hidden_size, dtype=torch.float64)
    scores, idx, _ = moe.gate(x)
    group_of = idx // 4  # 4 experts per group, contiguous
    group_max = scores.view(-1, 4, 4).amax(-1)  # [T, G]
    best_groups = group_max.topk(2, dim=-1).indices
    escaped = 0
    for t in range(x.shape[0]):
        used = set(group_of[t].tolist())
        assert len(used) <= 2
        assert used <= set(best_groups[t].tolist())
        # and within those groups the choice is plain top-k
        allowed = torch.cat([torch.arange(4 * g, 4 * g + 4) for g in best_groups[t].tolist()])
        want = allowed[scores[t, allowed].topk(4).indices]
        assert set(idx[t].tolist()) == set(want.tolist())
        escaped += len(set((scores[t].topk(4).indices // 4).tolist())) > 2
    assert escaped > 100  # unrestricted top-k would have spanned more groups: the limit did something


# ---------------------------------------------------------------------- balance losses
def test_expert_loss_hand_computed():
    cfg = cfg_of(n_routed_experts=4, num_experts_per_tok=1, aux_loss_alpha=0.1)
    moe = make_moe(cfg)
    scores = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1]])
    routed = F.one_hot(torch.tensor([0, 0, 1, 2]), 4).float()
    # f = E/(K T) * counts = [2, 1, 1, 0]; P = column means = [0.35, 0.325, 0.225, 0.1]
    expected = 0.1 * (2 * 0.35 + 1 * 0.325 + 1 * 0.225 + 0 * 0.1)
    losses = moe.balance_losses(scores, routed, 1, 4)
    assert losses["expert_balance"].item() == pytest.approx(expected)


def test_expert_loss_is_alpha_at_balance_and_grows_under_collapse():
    cfg = cfg_of(aux_loss_alpha=0.01)
    moe = make_moe(cfg).train()
    # hand-built balanced routing (every expert twice, K=2, 8 tokens) with arbitrary scores: sum f.P = sum P = 1
    scores = torch.rand(8, 8, dtype=torch.float64).softmax(-1)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [0, 7], [1, 6], [2, 5], [3, 4]])
    routed = torch.zeros(8, 8).scatter_(1, idx, 1.0)
    assert moe.balance_losses(scores, routed, 1, 8)["expert_balance"].item() == pytest.approx(0.01)

    # zero router: uniform scores, P_i = 1/E, so the loss is alpha whatever the tie-breaking picks
    with torch.no_grad():
        moe.gate.weight.zero_()
    x = torch.randn(2, 16, cfg.hidden_size, dtype=torch.float64)
    assert moe(x)[1]["expert_balance"].item() == pytest.approx(0.01)

    # collapse: every token's router prefers expert 0 (positive inputs, big positive row 0)
    with torch.no_grad():
        moe.gate.weight[0] = 5.0
    _, aux, stats = moe(x.abs())
    assert stats["tokens_per_expert"][0] == 32
    # f_0 = E / K = 4 and P_0 ~ 1, so the loss approaches alpha * E / K
    assert aux["expert_balance"].item() > 3.5 * 0.01


def test_device_and_comm_losses_are_alpha_at_balance():
    cfg = cfg_of(n_routed_experts=4, num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=2,
                 topk_group=1, aux_loss_alpha=0.003, device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02)
    moe = make_moe(cfg)
    scores = torch.rand(4, 4, dtype=torch.float64).softmax(-1)
    # tokens 0, 1 go to device 0 (experts 0, 1), tokens 2, 3 to device 1 (experts 2, 3): all balanced
    routed = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    losses = moe.balance_losses(scores, routed, 1, 4)
    assert losses["expert_balance"].item() == pytest.approx(0.003)
    assert losses["device_balance"].item() == pytest.approx(0.05)
    assert losses["comm_balance"].item() == pytest.approx(0.02)

    # everything on device 0 and the scores agree: both device-level losses exceed their alpha
    skew_scores = torch.tensor([[0.45, 0.45, 0.05, 0.05]] * 4, dtype=torch.float64)
    skew = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.float32)
    losses = moe.balance_losses(skew_scores, skew, 1, 4)
    # f'_0 = mean(f_0, f_1) = 2, P'_0 = 0.9: 0.05 * 1.8; f''_0 = G / (M T) * 4 = 2: 0.02 * 1.8
    assert losses["device_balance"].item() == pytest.approx(0.05 * 1.8)
    assert losses["comm_balance"].item() == pytest.approx(0.02 * 1.8)


def test_sequence_wise_and_batch_wise_losses_differ():
    # each sequence is lopsided, the batch as a whole is balanced
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]], dtype=torch.float64)
    routed = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float32)
    kw = dict(n_routed_experts=2, num_experts_per_tok=1, aux_loss_alpha=1.0)
    seq = make_moe(cfg_of(seq_aux=True, **kw)).balance_losses(scores, routed, 2, 2)["expert_balance"]
    batch = make_moe(cfg_of(seq_aux=False, **kw)).balance_losses(scores, routed, 2, 2)["expert_balance"]
    assert batch.item() == pytest.approx(1.0)  # f = [1, 1], P = [0.5, 0.5]
    assert seq.item() == pytest.approx(1.8)  # per sequence f = [2, 0], P = [0.9, 0.1]


def test_balance_loss_in_forward_matches_recomputation_and_trains_router_only_through_P():
    cfg = cfg_of(aux_loss_alpha=0.01, device_aux_loss_alpha=0.0)
    moe = make_moe(cfg).train()
    x = torch.randn(3, 10, cfg.hidden_size, dtype=torch.float64)
    _, aux, _ = moe(x)
    assert set(aux) == {"expert_balance"}
    scores, idx, _ = moe.gate(x.view(30, -1))
    routed = torch.zeros(30, 8, dtype=torch.float64).scatter_(1, idx, 1.0).view(3, 10, 8)
    f = routed.sum(1) * 8 / (2 * 10)
    expected = 0.01 * (f * scores.view(3, 10, 8).mean(1)).sum(-1).mean()
    assert aux["expert_balance"].item() == pytest.approx(expected.item())
    aux["expert_balance"].backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_up_proj.grad is None  # the loss reaches only the router
    moe.eval()
    assert moe(x)[1] == {}  # no balance losses outside training


# ---------------------------------------------------------------------- bias balancing (V3)
def test_bias_balancing_reduces_imbalance():
    cfg = cfg_of(bias_update_speed=0.005, aux_loss_alpha=0.0)
    moe = make_moe(cfg).train()
    with torch.no_grad():
        moe.gate.weight.mul_(0.1)
        moe.gate.weight[0] += 0.03  # with positive inputs every token picks expert 0: max/mean load = E/K = 4
    x = torch.rand(4, 64, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    imbalance = []
    for _ in range(30):
        load = moe(x)[2]["tokens_per_expert"]
        imbalance.append((load.max() / load.mean()).item())
        moe.gate.update_bias()  # what model.update_expert_bias() calls on every router
    assert imbalance[0] > 3.5
    # the sign rule oscillates around balance once there, so judge the average of the last steps
    assert sum(imbalance[-4:]) / 4 < 2.0
    bias = moe.gate.e_score_correction_bias
    assert bias[0] < 0 and bias.sum().abs() < 1e-5  # the favoured expert is pushed down; zero-centred
    # the bias only selects: gate values are still the unbiased scores of the selected experts
    scores, idx, w = moe.gate(x.view(-1, cfg.hidden_size))
    torch.testing.assert_close(w, scores.gather(1, idx))
    assert (idx == 0).any(-1).float().mean() < 0.9


def test_model_update_expert_bias_reaches_every_router():
    cfg = cfg_of(num_hidden_layers=3, bias_update_speed=0.01)
    model = DeepSeekV2(cfg).train()
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())  # a buffer, not trained
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids)
    gates = [layer.mlp.gate for layer in model.model.layers[1:]]
    assert all(g.tokens_per_expert.sum() == 2 * 8 * 2 for g in gates)
    seen = []
    model.update_expert_bias(all_reduce=lambda t: seen.append(t.clone()) or t.mul_(2))
    assert len(seen) == 2
    for g in gates:
        assert g.e_score_correction_bias.abs().sum() > 0
        assert bool((g.tokens_per_expert == 0).all())


def test_bias_update_follows_sign_rule():
    cfg = cfg_of(bias_update_speed=0.1)
    moe = make_moe(cfg, torch.float32)
    moe.gate.tokens_per_expert.copy_(torch.tensor([10.0, 0, 2, 4, 4, 4, 4, 4]))  # mean 4
    moe.gate.update_bias()
    delta = 0.1 * torch.tensor([-1.0, 1, 1, 0, 0, 0, 0, 0])
    torch.testing.assert_close(moe.gate.e_score_correction_bias, delta - delta.mean())
    assert bool((moe.gate.tokens_per_expert == 0).all())
    # eval forwards do not count toward the next update
    moe.eval()(torch.randn(1, 4, cfg.hidden_size))
    assert bool((moe.gate.tokens_per_expert == 0).all())


# ---------------------------------------------------------------------- token dropping
def test_token_dropping_only_in_training_keeps_highest_affinity():
    cfg = cfg_of(capacity_factor=1.0)
    moe = make_moe(cfg)
    dropless = make_moe(cfg.replace(capacity_factor=None))
    with torch.no_grad():
        moe.gate.weight[0] += 1.0  # skew: expert 0 (positive inputs) is over capacity
        dropless.gate.weight.copy_(moe.gate.weight)
    x = torch.rand(2, 16, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    T, K, E = 32, 2, 8

    # eval: no dropping, output equals the dropless layer
    out_eval, _, stats = moe.eval()(x)
    torch.testing.assert_close(out_eval, dropless.eval()(x)[0], atol=1e-12, rtol=0)
    assert stats["dropped_fraction"].item() == 0.0

    # train: per expert keep the `capacity` assignments with the highest gate weight
    out_train, _, stats = moe.train()(x)
    _, idx, w = reference_moe(moe, cfg, x)
    capacity = math.ceil(1.0 * T * K / E)
    keep = torch.zeros(T, K, dtype=torch.float64)
    for e in range(E):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        best = w[tok, slot].argsort(descending=True)[:capacity]
        keep[tok[best], slot[best]] = 1.0
    assert stats["dropped_fraction"].item() > 0
    assert stats["dropped_fraction"].item() == pytest.approx(1 - keep.mean().item())
    assert int(torch.bincount(idx.flatten(), minlength=E).max()) > capacity
    torch.testing.assert_close(out_train, reference_moe(moe, cfg, x, keep)[0], atol=1e-12, rtol=0)
    assert (out_train - out_eval).abs().max() > 1e-3


def test_no_dropping_under_capacity():
    cfg = cfg_of(capacity_factor=100.0)
    moe = make_moe(cfg).train()
    x = torch.randn(2, 8, cfg.hidden_size, dtype=torch.float64)
    out, _, stats = moe(x)
    assert stats["dropped_fraction"].item() == 0.0
    torch.testing.assert_close(out, reference_moe(moe, cfg, x)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("K", [1, 3])
def test_dispatch_and_combine_backwards_are_the_gradients_of_their_forwards(K):
    """The hand-written backwards (gathers with the inverse permutation, no scatter) against finite differences."""
    from deepseek_mini.model.moe import _CombineRows, _DispatchRows

    g = torch.Generator().manual_seed(0)
    T, D = 5, 4
    order = torch.randperm(T * K, generator=g)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T * K)
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randn(T * K, D, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: _DispatchRows.apply(x, order, inverse, K), (x,))
    assert torch.autograd.gradcheck(lambda y: _CombineRows.apply(y, order, inverse, K), (y,))
    torch.testing.assert_close(_DispatchRows.apply(x, order, inverse, K), x.repeat_interleave(K, 0)[order], rtol=0, atol=0)
    torch.testing.assert_close(_CombineRows.apply(y, order, inverse, K), y[inverse].view(T, K, D).sum(1), rtol=0, atol=0)


def test_gated_swiglu_backward_is_the_gradient_of_its_forward():
    """_GatedSwiGLU's hand-written backward (PyTorch form) against finite differences and against autograd."""
    from deepseek_mini.model.moe import _GatedSwiGLU

    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 10, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_GatedSwiGLU.apply, (h, w))
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(_GatedSwiGLU.apply(h, w), F.silu(gate) * up * w[:, None], rtol=0, atol=0)


def compare_swiglu_kernel_with_pytorch() -> float:
    """Largest difference, in bf16 ulps of each output's scale, between the Triton backward and the PyTorch one."""
    from deepseek_mini.kernels import runtime
    from deepseek_mini.kernels import swiglu as swiglu_kernel
    from deepseek_mini.model import moe

    assert runtime.INTERPRET and runtime.triton is not None
    available, worst = swiglu_kernel.available, 0.0
    try:
        for n, inter in ((37, 24), (130, 384)):  # rows not a multiple of the block, I not a power of two
            g = torch.Generator().manual_seed(n)
            h = torch.randn(n, 2 * inter, generator=g).bfloat16()
            w = torch.rand(n, generator=g)
            grad = torch.randn(n, inter, generator=g).bfloat16()
            results = []
            for use_kernel in (True, False):
                swiglu_kernel.available = (lambda t: True) if use_kernel else (lambda t: False)
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                moe._GatedSwiGLU.apply(hh, ww).backward(grad)
                results.append((hh.grad, ww.grad))
            (kh, kw), (th, tw) = results
            assert kh.dtype == torch.bfloat16 and kw.dtype == torch.float32
            worst = worst_of(worst, float((kh.float() - th.float()).abs().max() / th.float().abs().max() * 128),
                        float((kw - tw).abs().max() / tw.abs().max() * 128))
    finally:
        swiglu_kernel.available = available
    return worst


def _routed_rows(counts: list[int], D: int, width: int):
    """Rows sorted by expert (expert e owns counts[e] of them), stacked expert weights, offsets and gates (fp32)."""
    g = torch.Generator().manual_seed(sum(counts))
    E, N = len(counts), sum(counts)
    x = torch.randn(N, D, generator=g)
    gate_up = torch.randn(E, 2 * width, D, generator=g) * D**-0.5
    down = torch.randn(E, D, width, generator=g) * width**-0.5
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    gate = torch.rand(N, generator=g) + 0.5
    return x, gate_up, down, offsets, gate


# ragged rows: experts without rows (the first and the last among them), one with more rows than BLOCK_M; one row
ROUTINGS = ([0, 3, 0, 1, 37, 2, 5, 0], [0, 0, 0, 0, 0, 1, 0, 0])


def compare_moe_decode_kernel_fp32() -> float:
    """The routed experts' decode kernels (kernels/moe_decode.py) on fp32 rows against the plain math in fp64, as the
    largest difference relative to the output's largest value, without and with the shared experts' programs.
    D = 48 and I = 24 are not multiples of every tile (masked tails); the launches take one or several reduction
    steps and row blocks of 16 or 32, and the default rule."""
    from deepseek_mini.kernels import moe_decode as md

    D, width, worst = 48, 24, 0.0
    for counts in ROUTINGS:
        x, gate_up, down, offsets, gate = _routed_rows(counts, D, width)
        N, E = x.shape[0], len(counts)
        ref, start = [], 0
        for e, n in enumerate(counts):
            h = x[start:start + n].double() @ gate_up[e].double().t()
            ref.append((F.silu(h[:, :width]) * h[:, width:] * gate[start:start + n, None].double()) @ down[e].double().t())
            start += n
        ref = torch.cat(ref)
        # the shared experts (width 40) for T = 19 tokens, their gate and up read through strided rows
        T, shared_width = 19, 40
        g = torch.Generator().manual_seed(N)
        gate_up_TS = torch.randn(T, 2 * shared_width + 3, generator=g)[:, 3:]
        shared_down = torch.randn(D, shared_width, generator=g) * shared_width**-0.5
        s_gate, s_up = gate_up_TS.double().chunk(2, dim=-1)
        ref = torch.cat([ref, (F.silu(s_gate) * s_up) @ shared_down.double().t()])
        for up_cfg, down_cfg in ((md.default_config(N, E, width, D, 4), md.default_config(N, E, D, width, 4)),
                                 (md.LaunchConfig(16, 16), md.LaunchConfig(16, 16)),
                                 (md.LaunchConfig(32, 64, block_m=32, num_warps=8), md.LaunchConfig(64, 32, block_m=32))):
            y = md.launch(x, gate_up, down, offsets, gate, up_cfg, down_cfg)
            assert y.shape == (N, D) and y.dtype == torch.float32
            worst = worst_of(worst, float((y.double() - ref[:N]).abs().max() / ref.abs().max()))
            y = md.launch(x, gate_up, down, offsets, gate, up_cfg, down_cfg,
                          shared=(*gate_up_TS.chunk(2, dim=-1), shared_down))
            assert y.shape == (N + T, D)
            worst = worst_of(worst, float((y.double() - ref).abs().max() / ref.abs().max()))
    return worst


def compare_moe_decode_kernel_fp32_given_a_nan_row() -> float:
    """The comparison above against a kernel whose last output row is NaN: it must report that as infinitely wrong
    (a running max() would have passed over the NaN and called the kernel exact)."""
    from deepseek_mini.kernels import moe_decode as md

    launch = md.launch

    def nan_last_row(*args, **kw):
        y = launch(*args, **kw)
        y[-1] = float("nan")
        return y

    md.launch = nan_last_row
    try:
        return compare_moe_decode_kernel_fp32()
    finally:
        md.launch = launch


def compare_moe_decode_kernel_bf16() -> float:
    """GroupedExperts on bf16 rows without autograd, where the model takes the decode kernel, against its grouped_mm path,
    in bf16 roundings of the output's largest value; bf16 weights, and fp32 weights (cast as loaded, as grouped_mm
    casts them). With autograd on, the model keeps grouped_mm."""
    from deepseek_mini.kernels import moe_decode as md
    from deepseek_mini.model.moe import GroupedExperts

    D, width, worst = 48, 24, 0.0
    available, launch, calls = md.available, md.launch, []
    md.launch = lambda *args: calls.append(args[0].shape) or launch(*args)
    try:
        for counts in ROUTINGS:
            x, gate_up, down, offsets, gate = _routed_rows(counts, D, width)
            experts = GroupedExperts(len(counts), D, width)
            x = x.bfloat16()
            for weight_dtype in (torch.bfloat16, torch.float32):
                with torch.no_grad():
                    experts.gate_up_proj.copy_(gate_up)
                    experts.down_proj.copy_(down)
                experts.to(weight_dtype)
                n_calls = len(calls)
                with torch.no_grad():
                    y = experts(x, offsets, gate)
                    md.available = lambda *args: False
                    ref = experts(x, offsets, gate)
                    md.available = available
                assert len(calls) == n_calls + 1 and y.dtype == ref.dtype == torch.bfloat16
                worst = worst_of(worst, float((y.float() - ref.float()).abs().max() / ref.float().abs().max() * 128))
            experts(x, offsets, gate)  # autograd: the PyTorch path
            assert len(calls) == n_calls + 1
    finally:
        md.available, md.launch = available, launch
    return worst


def compare_moe_route_kernel_with_the_counting_sort() -> float:
    """kernels/moe_decode.route against model/moe.sort_by_expert: 0.0 when offsets, counts, order and inverse are all
    equal, for routings with an idle expert, N from 6 to 300 (one and two 256-wide chunks), E not a power of 2."""
    from deepseek_mini.kernels import moe_decode as md
    from deepseek_mini.model.moe import sort_by_expert

    g = torch.Generator().manual_seed(0)
    for T, K, E in ((1, 6, 64), (5, 3, 8), (32, 6, 64), (11, 6, 64), (40, 4, 10), (50, 6, 64)):
        scores = torch.rand(T, E, generator=g)
        scores[:, 1] = -1.0  # an expert without assignments
        idx = scores.topk(K, dim=-1, sorted=False).indices
        routed = torch.zeros(T, E).scatter_(1, idx, 1.0)
        counts = routed.sum(0).to(torch.int32)
        order, inverse = sort_by_expert(idx, routed, counts.cumsum(0) - counts)
        ends, k_counts, k_order, k_inverse = md.route(idx, E)
        if not (torch.equal(ends, counts.cumsum(0).to(torch.int32)) and torch.equal(k_counts, counts)
                and torch.equal(k_order, order) and torch.equal(k_inverse, inverse)):
            return 1.0
    return 0.0


def compare_moe_route_logits_with_the_router(device: str = "cpu") -> float:
    """kernels/moe_decode.route_logits (the selection and the routing in one kernel) against Router.route followed by
    route(): the same order, inverse, offsets and counts exactly, and the gates, for softmax and sigmoid scoring, V3's
    selection bias, renormalised and scaled gates, T from 1 to 70 tokens (several blocks of tokens), E not a power
    of 2, logits read through strided rows, and rows of equal logits (a tie goes to the lower index)."""
    from deepseek_mini.kernels import moe_decode as md
    from deepseek_mini.model.moe import Router

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    cases = [(dict(n_routed_experts=64, num_experts_per_tok=6), 32), (dict(n_routed_experts=64, num_experts_per_tok=6), 1),
             (dict(n_routed_experts=10, num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=2.5), 70),
             (dict(n_routed_experts=16, num_experts_per_tok=4, scoring_func="sigmoid", norm_topk_prob=True,
                   bias_update_speed=0.01), 33)]
    for fields, T in cases:
        router = Router(cfg_of(**fields))
        E, K = router.n_experts, router.top_k
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0.0, 0.1, generator=g)
        router.to(device)
        logits = torch.randn(T, E + 3, generator=g).to(device)[:, 3:]  # strided rows, as the folded GEMM's split
        logits[0, :] = 0.5  # a row of ties: experts 0..K-1, in order
        _, idx, gates = router.route(logits)
        ends, counts, order, inverse = md.route(idx, E)
        k_gates, k_ends, k_counts, k_order, k_inverse = md.route_logits(
            logits, K, router.cfg.scoring_func == "softmax", router.e_score_correction_bias, router.cfg.norm_topk_prob,
            router.cfg.routed_scaling_factor)
        if not (torch.equal(k_ends, ends) and torch.equal(k_counts, counts) and torch.equal(k_order, order)
                and torch.equal(k_inverse, inverse)):
            return math.inf
        worst = worst_of(worst, float((k_gates - gates).abs().max()))
    return worst


def compare_route_top_k_kernel_with_the_sort() -> float:
    """kernels/routing.top_k against the stable descending sort it replaces: 0.0 when every row's experts and their
    order are the same. E a power of 2 (64, as `small`) or not (10, 160), rows not a multiple of the kernel's block,
    K from 1 to 8, strided rows, many equal scores (values on a coarse grid: ties go to the lower index), a row of
    one value, -inf scores (group-limited routing's masked experts, more of them than K leaves: the lower index
    first), and no rows at all; inside a torch.compile'd function too (the custom op)."""
    from deepseek_mini.kernels import routing

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for T, E, K in ((37, 64, 6), (130, 10, 3), (5, 160, 8), (70, 64, 1), (0, 64, 6)):
        select = (torch.rand(T, E + 2, generator=g) * 8).floor()[:, 2:] / 8  # strided rows, ties on a grid
        if T > 2:
            select[0] = 0.25  # one value: experts 0..K-1
            select[1, : E - 2] = float("-inf")  # two finite scores, then the lowest masked ids
        assert routing.available(select, K)
        want = select.sort(dim=-1, descending=True, stable=True).indices[:, :K]
        for got in (routing.top_k(select, K), torch.compile(routing.top_k, backend="aot_eager")(select, K)):
            if got.shape != want.shape or got.dtype != torch.long:
                return math.inf
            worst = worst_of(worst, float((got != want).sum()))
    return worst


def compare_moe_layer_decode_paths_bf16() -> float:
    """A bf16 MoE layer at decode sizes without autograd, where it routes through route_logits (plain top-k) or
    Router.route + route() (group-limited selection, which route_logits does not do) and the expert kernels read the
    tokens' rows in place, against the same layer on the grouped_mm path (kernels off), in bf16 roundings of the
    output's largest value; and the kernels given rows already in expert order must give the same bits."""
    from deepseek_mini.kernels import moe_decode as md
    from deepseek_mini.model import moe as moe_module

    available, route, route_logits, worst, calls = md.available, md.route, md.route_logits, 0.0, []
    fp32_out, experts_kernel = moe_module.fp32_out_mm_available, md.grouped_swiglu_experts
    md.route = lambda *args: calls.append("route") or route(*args)
    md.route_logits = lambda *args: calls.append("route_logits") or route_logits(*args)
    md.grouped_swiglu_experts = lambda *args: (len(args) > 7 and calls.append("shared experts in the expert kernels")
                                               or experts_kernel(*args))
    try:
        for fields, kernel, folded in ((dict(), "route_logits", False),
                                       (dict(topk_method="group_limited_greedy", n_group=4, topk_group=2), "route",
                                        False),
                                       (dict(n_shared_experts=2), "route_logits", True)):
            cfg = cfg_of(n_routed_experts=16, num_experts_per_tok=4, **{"n_shared_experts": 1, **fields})
            moe = make_moe(cfg, dtype=torch.bfloat16).eval()
            # folded: the router and shared gate/up in one GEMM writing fp32 (CUDA's; here its CPU equivalent), the
            # shared experts' SwiGLU and down projection in the routed experts' kernels
            moe_module.fp32_out_mm_available = (lambda *args: True) if folded else fp32_out
            if folded:
                assert moe.fold()
                kernel = [kernel, "shared experts in the expert kernels"]
            else:
                kernel = [kernel]
            x = torch.randn(3, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
            calls.clear()
            with torch.no_grad():
                y, _, stats = moe(x)
                if calls != kernel:  # the layer did not take this decode path
                    return 1e9
                md.available = lambda *args, **kw: False
                ref, _, ref_stats = moe(x)
                md.available = available
                worst = worst_of(worst, float((y.float() - ref.float()).abs().max() / ref.float().abs().max() * 128))
                if not torch.equal(stats["tokens_per_expert"], ref_stats["tokens_per_expert"]):
                    return 1e9
                x_TD = x.reshape(-1, cfg.hidden_size)
                _, idx, gates = moe.gate(x_TD)
                offsets, _, order, _ = route(idx, cfg.n_routed_experts)
                experts = (moe.experts.gate_up_proj, moe.experts.down_proj)
                gathered = experts_kernel(x_TD, *experts, offsets, gates, order, idx.shape[1])
                sorted_rows = experts_kernel(x_TD[order // idx.shape[1]], *experts, offsets,
                                             gates.reshape(-1)[order])
                if not torch.equal(gathered, sorted_rows):
                    return 1e9
    finally:
        md.available, md.route, md.route_logits = available, route, route_logits
        moe_module.fp32_out_mm_available, md.grouped_swiglu_experts = fp32_out, experts_kernel
    return worst


def test_worst_of_counts_a_nan_as_infinite():
    assert max(0.0, float("nan")) == 0.0  # why the kernel comparisons do not keep their running worst with max()
    assert worst_of(0.0, float("nan"), 1.0) == math.inf and worst_of(float("nan")) == math.inf
    assert worst_of(0.5, 0.25, 0.0) == 0.5


@requires_triton
def test_expert_kernels_match_pytorch_under_the_interpreter():
    """The SwiGLU backward, the router's top-k and the decode kernels of the routed experts, in one interpreter
    process."""
    diffs = max_diff_under_interpreter("test_moe", ["compare_swiglu_kernel_with_pytorch",
                                                    "compare_moe_decode_kernel_fp32", "compare_moe_decode_kernel_bf16",
                                                    "compare_moe_decode_kernel_fp32_given_a_nan_row",
                                                    "compare_moe_route_kernel_with_the_counting_sort",
                                                    "compare_moe_route_logits_with_the_router",
                                                    "compare_moe_layer_decode_paths_bf16",
                                                    "compare_route_top_k_kernel_with_the_sort"])
    assert diffs["compare_swiglu_kernel_with_pytorch"] <= 1.0  # within one bf16 rounding of the largest value
    assert diffs["compare_moe_route_kernel_with_the_counting_sort"] == 0.0  # the same order, exactly
    assert diffs["compare_route_top_k_kernel_with_the_sort"] == 0.0  # the router's top-k: the same experts, in order
    assert diffs["compare_moe_route_logits_with_the_router"] < 1e-6  # the same experts and order, the gates in fp32
    assert diffs["compare_moe_layer_decode_paths_bf16"] <= 3.0  # as the kernels alone, below (a wrong row is > 10)
    assert diffs["compare_moe_decode_kernel_fp32"] < 1e-5
    assert diffs["compare_moe_decode_kernel_fp32_given_a_nan_row"] == math.inf  # a NaN output fails the comparison
    # Rounded where the compiled grouped_mm path rounds (h, a, y), but the interpreter (Triton 3.9) truncates fp32 to
    # bf16 where the GPU rounds to nearest: up to a rounding each (measured 1.9; a missing gate or row is > 10)
    assert diffs["compare_moe_decode_kernel_bf16"] <= 3.0


def test_counting_sort_is_the_stable_argsort_of_the_expert_ids():
    from deepseek_mini.model.moe import sort_by_expert

    T, K, E = 50, 3, 8
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(T, E, generator=g)
    scores[:, 5] = -1.0  # expert 5 gets no tokens
    idx = scores.topk(K, dim=-1, sorted=False).indices
    routed = torch.zeros(T, E).scatter_(1, idx, 1.0)
    counts = routed.sum(0).to(torch.int32)
    order, inverse = sort_by_expert(idx, routed, counts.cumsum(0) - counts)
    assert torch.equal(order, torch.argsort(idx.reshape(-1), stable=True))
    assert torch.equal(inverse[order], torch.arange(T * K))


def test_router_of_a_16_bit_model_takes_the_fp32_output_gemm_only_for_cuda_inference():
    from deepseek_mini.model.moe import fp32_out_mm_available

    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    assert not fp32_out_mm_available(x, w)  # CPU: torch.mm has no out_dtype kernel there
    if torch.cuda.is_available():
        x, w = x.cuda(), w.cuda()
        assert fp32_out_mm_available(x, w) and not fp32_out_mm_available(x, w.float())
        assert not fp32_out_mm_available(x, w.requires_grad_())  # training keeps the fp32 GEMM


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA (CPU: the interpreter test)")
def test_route_logits_kernel_equals_the_router_on_cuda():
    assert compare_moe_route_logits_with_the_router("cuda") < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm's out_dtype runs on CUDA only")
def test_router_fp32_logits_from_16_bit_weights_equal_the_upcast_gemm_on_cuda():
    """The logits from the bf16 GEMM writing fp32 are the fp32 GEMM's of the upcast copies (products of bf16 values
    are exact in fp32; only the summation order may differ), and the routing they give is the same."""
    cfg = cfg_of(n_routed_experts=64, num_experts_per_tok=6, hidden_size=768)
    router = make_moe(cfg, dtype=torch.bfloat16).gate.cuda()
    x = torch.randn(32, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fast = router(x)
        ref = router.route(F.linear(x.float(), router.weight.float()))
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)  # scores
    assert torch.equal(fast[1], ref[1])  # the experts chosen
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-5, atol=1e-6)  # their gates


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.mm's out_dtype runs on CUDA only")
def test_folded_router_and_shared_experts_in_one_gemm_on_cuda():
    """MoE.fold: a bf16 layer at inference computes its router logits and shared gate/up in one GEMM writing fp32;
    the same experts and the layer's output within bf16 roundings of the separate GEMMs, and the folded rows are the
    ones read (scaling them moves the output)."""
    cfg = cfg_of(n_routed_experts=64, num_experts_per_tok=6, hidden_size=768, n_shared_experts=2)
    moe = make_moe(cfg, dtype=torch.bfloat16).cuda().eval()
    x = torch.randn(4, 8, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, _, ref_stats = moe(x)
        assert moe.fold() and not moe.fold()
        out, _, stats = moe(x)
        moe.router_shared_folded[moe.n_experts:].mul_(2.0)
        moved, _, _ = moe(x)
        moe.unfold()
    assert torch.equal(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])
    assert float((out.float() - ref.float()).abs().max() / ref.float().abs().max()) < 2 ** -6
    assert float((moved.float() - ref.float()).abs().max() / ref.float().abs().max()) > 0.1
