"""The whole model: outputs and losses, causality, cached generation vs full forwards, init, training, autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import SMALL_MODEL

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2, sample
from deepseek_mini.model.layers import RMSNorm

BASE = dict(SMALL_MODEL)
ATTENTION = {"mla": {}, "mla_q_lora": dict(q_lora_rank=12), "mha": dict(attention="mha", head_dim=8),
             "gqa": dict(attention="gqa", num_key_value_heads=2, head_dim=8),
             "mqa": dict(attention="mqa", head_dim=8)}
FFN = {"moe": {}, "dense": dict(n_routed_experts=None)}
VARIANTS = {f"{a}-{f}": {**ATTENTION[a], **FFN[f]} for a in ATTENTION for f in FFN}


def cfg_of(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})


def build(cfg: ModelConfig, seed: int = 0, dtype=torch.float64) -> DeepSeekV2:
    torch.manual_seed(seed)
    model = DeepSeekV2(cfg).to(dtype).eval()
    with torch.no_grad():  # sharper weights than the 0.02 init: distinct, non-flat logits
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.0)
    return model


def ids_of(B, T, seed=0, vocab=64):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- outputs
def test_forward_outputs_and_loss():
    cfg = cfg_of(num_hidden_layers=4)
    model = build(cfg, dtype=torch.float32).train()
    B, T = 2, 10
    ids, labels = ids_of(B, T), ids_of(B, T, seed=1)
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (B, T, cfg.vocab_size)
    ref = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)
    # balance losses are reported, not folded into loss
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    torch.testing.assert_close(out.aux_loss, sum(out.aux_losses.values()))
    assert set(out.aux_losses) == {"expert_balance"}
    assert len(out.router_stats) == cfg.num_moe_layers == 3
    for stats in out.router_stats:
        assert stats["tokens_per_expert"].shape == (8,)
        assert stats["tokens_per_expert"].sum().item() == B * T * cfg.num_experts_per_tok
        assert not stats["tokens_per_expert"].requires_grad
    (out.loss + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())

    assert model(ids, labels=labels, return_logits=False).logits is None
    model.eval()
    out = model(ids)
    assert out.loss is None and out.aux_loss.dim() == 0 and out.aux_loss.item() == 0 and out.aux_losses == {}
    assert len(out.router_stats) == 3


@pytest.mark.parametrize("dtype", [torch.float64, "bf16-autocast"])
def test_fused_head_loss_equals_cross_entropy_of_the_logits(dtype):
    """The training step's loss (head and cross-entropy fused, loss.py) against F.cross_entropy of the head's
    logits: the loss and the gradients of every parameter, with ignored labels and an upstream gradient
    that is not 1 (a scaled loss)."""
    cfg = cfg_of(num_hidden_layers=2)
    autocast = dtype == "bf16-autocast"
    models = [build(cfg, dtype=torch.float32 if autocast else dtype).train() for _ in range(2)]
    ids, labels = ids_of(2, 10), ids_of(2, 10, seed=1)
    labels[0, :4] = -100
    grads = []
    for model, return_logits in zip(models, (False, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        (2.5 * out.loss).backward()
        grads.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (fused_loss, fused), (ref_loss, ref) = grads
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_loss, ref_loss, **tol)
    assert fused.keys() == ref.keys() and fused["lm_head.weight"].abs().sum() > 0
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], **tol, msg=name)


def test_fused_head_loss_ignores_unlabelled_rows():
    from deepseek_mini.model.loss import linear_cross_entropy

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, -100, 0, 6, -100, 2])
    torch.autograd.gradcheck(lambda x, w: linear_cross_entropy(x, w, labels), (x, w))
    loss = linear_cross_entropy(x, w, labels)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.t(), labels))
    loss.backward()
    assert x.grad[1].abs().max() == 0 and x.grad[4].abs().max() == 0  # ignored rows get no gradient
    assert linear_cross_entropy(x, w, torch.full((6,), -100)).item() == 0  # nothing labelled: 0, not nan


def test_dense_model_has_no_router_outputs():
    model = build(cfg_of(n_routed_experts=None)).train()
    out = model(ids_of(2, 6), labels=ids_of(2, 6, seed=1))
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() == 0
    assert out.router_stats == [] and out.aux_losses == {}


def test_group_limited_model_reports_all_three_losses():
    cfg = cfg_of(topk_method="group_limited_greedy", n_group=4, topk_group=2, aux_loss_alpha=0.003,
                 device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02)
    out = build(cfg).train()(ids_of(2, 8))
    assert set(out.aux_losses) == {"expert_balance", "device_balance", "comm_balance"}
    assert all(v.item() > 0 for v in out.aux_losses.values())


def test_too_long_input_raises():
    model = build(cfg_of(max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids_of(1, 17))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids_of(1, 10), 7, temperature=0)


# ---------------------------------------------------------------------- causality
@pytest.mark.parametrize("changes", VARIANTS.values(), ids=list(VARIANTS))
def test_causal(changes):
    model = build(cfg_of(**changes))
    ids = ids_of(2, 10)
    t = 6
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert (a[:, :t] - b[:, :t]).abs().max() < 1e-12
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-6  # every later position does see it


# ---------------------------------------------------------------------- cached decoding
@pytest.mark.parametrize("changes", VARIANTS.values(), ids=list(VARIANTS))
def test_greedy_generate_equals_argmax_of_full_forwards(changes):
    model = build(cfg_of(**changes))
    prompt = ids_of(2, 4)
    out = model.generate(prompt, 8, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert out[:, 4:].unique().numel() > 2  # not a degenerate constant continuation


@pytest.mark.parametrize("changes", VARIANTS.values(), ids=list(VARIANTS))
def test_chunked_decode_equals_full_forward(changes):
    model = build(cfg_of(**changes))
    ids = ids_of(2, 9, seed=2)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 9)
        pre = model(ids[:, :5], cache=cache, start_pos=0).logits  # prefill
        chunk = model(ids[:, 5:8], cache=cache, start_pos=5).logits  # 3 tokens at once, start_pos > 0
        last = model(ids[:, 8:9], cache=cache, start_pos=8).logits
    torch.testing.assert_close(torch.cat([pre, chunk, last], 1), full, atol=1e-10, rtol=0)


def test_generate_restores_training_mode_and_stops_at_eos():
    model = build(cfg_of()).train()
    prompt = ids_of(2, 3)
    greedy = model.generate(prompt, 6, temperature=0)
    assert model.training
    eos = int(greedy[0, 4])  # row 0 emits it as its 2nd new token
    out = model.generate(prompt, 6, temperature=0, eos_token_id=eos)
    assert torch.equal(out[0, :5], greedy[0, :5])
    assert bool((out[0, 5:] == eos).all())  # after eos the finished row only repeats eos


def test_sample():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, temperature=0).tolist() == [1, 3]
    assert sample(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 3]
    assert sample(logits, temperature=1.0, top_p=0.01, generator=g).tolist() == [1, 3]
    draws = torch.stack([sample(logits, 1.0, top_k=2, generator=g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {0, 3}
    with pytest.raises(ValueError):
        sample(logits, temperature=-1.0)


# ---------------------------------------------------------------------- init
def test_init_scales_residual_outputs():
    layers = 8
    cfg = cfg_of(hidden_size=128, num_hidden_layers=layers, num_attention_heads=8, kv_lora_rank=64,
                 qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, q_lora_rank=64)
    torch.manual_seed(0)
    model = DeepSeekV2(cfg)
    std = cfg.initializer_range

    def pooled_std(suffix):
        ws = [p.detach().flatten() for n, p in model.named_parameters() if n.endswith(suffix)]
        return torch.cat(ws).std().item()

    ratio = pooled_std("self_attn.q_b_proj.weight") / pooled_std("self_attn.o_proj.weight")
    assert ratio == pytest.approx(math.sqrt(2 * layers), rel=0.05)
    assert pooled_std("self_attn.q_b_proj.weight") == pytest.approx(std, rel=0.05)
    out_std = std / math.sqrt(2 * layers)
    assert pooled_std("mlp.experts.down_proj") == pytest.approx(out_std, rel=0.05)
    assert pooled_std("mlp.shared_experts.down_proj.weight") == pytest.approx(out_std, rel=0.05)
    assert pooled_std("mlp.experts.gate_up_proj") == pytest.approx(std, rel=0.05)
    assert pooled_std("mlp.gate.weight") == pytest.approx(std, rel=0.05)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * layers + 1 + 2 * layers  # block norms, final norm, q_a / kv_a latent norms
    assert all(bool((m.weight == 1).all()) for m in norms)


def test_rms_norm_precision():
    norm = RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 16, dtype=torch.float64) * 100
    ref = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), ref, atol=1e-13, rtol=0)  # fp64 in, fp64 math (not fp32's 1e-7)
    xb = x.bfloat16()
    want = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(norm.float()(xb), norm.weight.float() * want)  # bf16: normalised in fp32


def test_tied_embeddings_share_one_tensor():
    model = DeepSeekV2(cfg_of(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---------------------------------------------------------------------- training / precision
def test_tiny_moe_overfits_one_batch():
    torch.manual_seed(0)
    cfg = cfg_of(num_hidden_layers=2)
    model = DeepSeekV2(cfg).train()
    ids = ids_of(4, 16, seed=3)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(60):
        out = model(x, labels=y)
        loss = out.loss + out.aux_loss
        first = first if first is not None else out.loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(64), rel=0.05)  # starts at chance
    assert out.loss.item() < 0.25 * first


@pytest.mark.parametrize("changes", [{}, dict(attention="gqa", num_key_value_heads=2, head_dim=8)], ids=["mla", "gqa"])
def test_bf16_autocast_cpu(changes):
    model = build(cfg_of(**changes), dtype=torch.float32).train()
    ids = ids_of(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16
        assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.loss)
        (out.loss + out.aux_loss).backward()
        model.eval()
        gen = model.generate(ids[:, :4], 3, temperature=0)  # cached decode path under autocast too
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert gen.shape == (2, 7)
    # and bf16 stays close to fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids).logits.float()
    with torch.no_grad():
        high = model(ids).logits
    assert (low - high).abs().max() < 0.1 * high.abs().max()
