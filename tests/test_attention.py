"""RoPE, MLA (naive vs absorbed decode, latent cache) and the MHA / GQA / MQA baselines.

Exactness checks run in float64 so that "equal" can mean 1e-10, not "close in fp32".
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import max_diff_under_interpreter, requires_triton, worst_of
from model_helpers import SMALL_MODEL, rope_rows

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2
from deepseek_mini.model.attention import MLA, GroupedQueryAttention, KVCache, LatentCache
from deepseek_mini.model.rope import RotaryEmbedding

BASE = {**SMALL_MODEL, "num_hidden_layers": 2, "qk_rope_head_dim": 8}
YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def cfg_of(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})


def build(cfg: ModelConfig, seed: int = 0) -> DeepSeekV2:
    torch.manual_seed(seed)
    model = DeepSeekV2(cfg).double().eval()
    # larger-than-default weights so attention is far from uniform and differences show up in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(5.0)
    return model


# ---------------------------------------------------------------------- RoPE
def complex_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Independent reference: adjacent pairs (2i, 2i+1) as complex numbers times e^{i pos theta_i}."""
    dim = x.shape[-1]
    theta = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * theta[None]  # [T, dim/2]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], dim // 2, 2).contiguous())
    rot = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # [1, T, 1, dim/2]
    return torch.view_as_real(xc * rot).flatten(-2)


def test_rope_matches_complex_reference():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, 128, base=10000.0)
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64)
    positions = torch.tensor([0, 1, 5, 17, 63, 100, 127])
    out = rope(x, positions)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, complex_rope(x, positions), atol=1e-5, rtol=0)
    # NeoX pairing (i, i + dim/2) is a different function: the test would notice a convention swap
    neox = torch.cat([x[..., 8:], x[..., :8]], -1)
    assert (complex_rope(neox, positions) - torch.cat([out[..., 8:], out[..., :8]], -1)).abs().max() > 1e-2


def test_rope_keeps_fp64_and_bf16_rotates_in_fp32():
    rope = RotaryEmbedding(8, 16)
    pos = torch.arange(16)
    cos, sin = rope.cos.double()[None, :, None], rope.sin.double()[None, :, None]

    def manual(x):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)

    x = torch.randn(1, 16, 2, 8, dtype=torch.float64)
    # same tables, so an fp64 input must be rotated in fp64: exact to rounding, not to fp32's 1e-7
    torch.testing.assert_close(rope(x, pos), manual(x), atol=1e-14, rtol=0)
    xb = x.bfloat16()
    out = rope(xb, pos)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, manual(xb.double()).bfloat16(), atol=0, rtol=0)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(1)
    rope = RotaryEmbedding(16, 64)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        qm = rope(q, torch.tensor([m]))
        kn = rope(k, torch.tensor([n]))
        return (qm * kn).sum().item()

    assert score(5, 3) == pytest.approx(score(2, 0), abs=1e-5)
    assert score(5, 3) == pytest.approx(score(40, 38), abs=1e-5)
    assert score(9, 9) == pytest.approx(score(0, 0), abs=1e-5)
    assert abs(score(5, 3) - score(5, 4)) > 1e-3  # and it does depend on the offset
    assert abs(score(5, 3) - score(3, 5)) > 1e-3


def test_yarn_frequencies():
    # V2's YaRN on a 64-dim rope: dims below low=10 keep theta_i, dims from high=23 on are divided by 40
    # (YaRN's correction dims for beta_fast=32 / beta_slow=1 over the original 4096 positions: 64 * ln(4096 /
    # (2 pi beta)) / (2 ln 10000) = 10.5 -> 10 and 22.5 -> 23), the ramp in between; cos/sin keep unit norm
    # (mscale ratio is 1).
    rope = RotaryEmbedding(64, 8, base=10000.0, scaling=YARN)
    inv = torch.atan2(rope.sin[1].double(), rope.cos[1].double())  # angle at position 1 = inv_freq
    theta = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(inv[:10], theta[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv[23:], theta[23:] / 40, rtol=1e-6, atol=0)
    assert bool(((inv[10:23] < theta[10:23]) & (inv[10:23] > theta[10:23] / 40)).all())
    torch.testing.assert_close(rope.cos ** 2 + rope.sin ** 2, torch.ones_like(rope.cos), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- MLA against the paper's formulas
def reference_mla(attn: MLA, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """MLA as the DeepSeek-V2 paper (Sec. 2.1) defines it, written out: per-head K/V up-projected from the latent,
    one roped key shared by all heads, causal softmax."""
    B, T, _ = x.shape
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    pos = torch.arange(T)
    if cfg.q_lora_rank is None:
        q = x @ attn.q_proj.weight.T
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(x @ attn.q_a_proj.weight.T))
    q = q.view(B, T, H, dn + dr)
    q_c, q_r = q[..., :dn], attn.rotary(q[..., dn:], pos)
    a = x @ attn.kv_a_proj_with_mqa.weight.T
    c_kv = attn.kv_a_layernorm(a[..., :cfg.kv_lora_rank])
    k_r = attn.rotary(a[..., cfg.kv_lora_rank:].unsqueeze(2), pos)  # [B, T, 1, dr]
    kv = (c_kv @ attn.kv_b_proj.weight.T).view(B, T, H, dn + dv)
    k_c, v = kv[..., :dn], kv[..., dn:]
    scores = torch.einsum("bthd,bshd->bhts", q_c, k_c) + torch.einsum("bthd,bsd->bhts", q_r, k_r[:, :, 0])
    scores = scores * cfg.softmax_scale()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    o = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * dv)
    return o @ attn.o_proj.weight.T


MLA_VARIANTS = {"lite": {}, "q_lora": dict(q_lora_rank=12), "yarn": dict(rope_scaling=YARN),
                "q_lora_yarn": dict(q_lora_rank=12, rope_scaling=YARN)}


@pytest.mark.parametrize("changes", MLA_VARIANTS.values(), ids=list(MLA_VARIANTS))
def test_mla_forward_matches_formulas(changes):
    cfg = cfg_of(**changes)
    torch.manual_seed(0)
    attn = MLA(cfg).double()
    for p in attn.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    assert attn.scale == pytest.approx(cfg.softmax_scale())
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    out = attn(x, torch.arange(9))
    torch.testing.assert_close(out, reference_mla(attn, cfg, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("attention,kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_baseline_attention_matches_formulas(attention, kv_heads):
    cfg = cfg_of(attention=attention, num_key_value_heads=kv_heads, head_dim=8)
    torch.manual_seed(0)
    attn = GroupedQueryAttention(cfg).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, T, H, hd = 2, 7, 4, 8
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64)
    pos = torch.arange(T)
    q = complex_rope((x @ attn.q_proj.weight.T).view(B, T, H, hd), pos)
    k = complex_rope((x @ attn.k_proj.weight.T).view(B, T, kv_heads, hd), pos)
    v = (x @ attn.v_proj.weight.T).view(B, T, kv_heads, hd)
    group = H // kv_heads  # query head h reads kv head h // group
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    p = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    ref = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * hd) @ attn.o_proj.weight.T
    # rope tables are fp32, so the model's rotation is exact to ~1e-7 relative, not 1e-15
    torch.testing.assert_close(attn(x, pos), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- MLA decode: naive vs absorbed
def cached_logits(model: DeepSeekV2, ids: torch.Tensor, prefill: int, chunks: list[int]) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest in chunks of the given sizes; logits of every position."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prefill], cache=cache, start_pos=0).logits]
    pos = prefill
    for n in chunks:
        out.append(model(ids[:, pos:pos + n], cache=cache, start_pos=pos).logits)
        pos += n
    assert pos == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("changes", MLA_VARIANTS.values(), ids=list(MLA_VARIANTS))
def test_mla_absorbed_decode_equals_naive_and_full_forward(changes):
    model = build(cfg_of(**changes))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        model.set_mla_decode("naive")
        naive = cached_logits(model, ids, 5, [1, 3, 1, 2])
        model.set_mla_decode("absorb")
        absorbed = cached_logits(model, ids, 5, [1, 3, 1, 2])
        # the decode steps must really read the cache: without it, the same tokens give other logits
        no_cache = model(ids[:, 5:6]).logits
    assert (absorbed - naive).abs().max() < 1e-10
    assert (absorbed - full).abs().max() < 1e-10
    assert (naive - full).abs().max() < 1e-10
    assert (no_cache[:, 0] - full[:, 5]).abs().max() > 1e-3


@pytest.mark.parametrize("changes", [{}, dict(q_lora_rank=12)], ids=["lite", "q_lora"])
def test_folded_absorption_equals_the_two_step_one_and_is_what_decoding_reads(changes):
    """MLA.fold: W_UK folded into the query projection (DeepSeekV2.folded_weights, as generate() decodes): the same
    logits as the per-step products, and the decode steps really read the folded copies."""
    model = build(cfg_of(**changes))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    attns = [layer.self_attn for layer in model.model.layers]
    with torch.no_grad():
        full = model(ids).logits
        with model.folded_weights():
            assert all(a.down_folded is not None for a in attns)
            assert all((a.q_folded is None) == (model.config.q_lora_rank is None) for a in attns)
            folded = cached_logits(model, ids, 4, [1, 3, 2])
            for a in attns:  # the folded copies do not follow the weights: scaling them must move the decode
                (a.q_folded if a.q_folded is not None else a.down_folded).mul_(0.5)
            moved = cached_logits(model, ids, 4, [1, 3, 2])
        assert all(a.down_folded is None and a.q_folded is None for a in attns)
    assert (folded - full).abs().max() < 1e-10
    assert (moved[:, :4] - full[:, :4]).abs().max() < 1e-10  # the prefill does not absorb
    assert (moved[:, 4:] - full[:, 4:]).abs().max() > 1e-3


def test_folded_weights_are_never_differentiated_and_nest():
    """A forward that differentiates inside folded_weights() uses the weights themselves (the copies would take the
    gradient away from them); an inner block leaves the outer one's copies in place."""
    model = build(cfg_of(q_lora_rank=12))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    attn = model.model.layers[0].self_attn

    def grads():
        model.zero_grad()
        out = model(ids, cache=None)
        out.logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    with model.folded_weights():
        with model.folded_weights():
            pass
        assert attn.down_folded is not None  # the inner block did not drop the outer one's copies
        inside = grads()
    assert attn.down_folded is None
    assert plain.keys() == inside.keys() and "model.layers.0.self_attn.q_b_proj.weight" in plain
    assert all(torch.equal(plain[n], inside[n]) for n in plain)


def test_set_mla_decode_switches_every_layer_and_rejects_unknown():
    model = build(cfg_of())
    model.set_mla_decode("naive")
    assert all(layer.self_attn.decode_mode == "naive" for layer in model.model.layers)
    with pytest.raises(ValueError):
        model.set_mla_decode("flash")


# ---------------------------------------------------------------------- what is cached
def test_mla_cache_holds_latent_and_roped_key_only():
    cfg = cfg_of(num_hidden_layers=3, rope_scaling=YARN)
    model = build(cfg)
    cache = model.new_cache(2, 10)
    assert len(cache) == 3
    for c in cache:
        assert isinstance(c, LatentCache)
        assert c.kv.shape == (2, 10, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        assert c.numel_per_token() == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert cfg.kv_cache_elements_per_token() == sum(c.kv.shape[-1] for c in cache)

    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, cache=cache)
        # layer 0's cache must be [RMSNorm(c_KV) ; RoPE(k_R)] of its own input: MLA caches the normalised latent
        # and the shared roped key, never per-head K/V
        attn = model.model.layers[0].self_attn
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        a = attn.kv_a_proj_with_mqa(h)
        c_kv = attn.kv_a_layernorm(a[..., :cfg.kv_lora_rank])
        k_r = attn.rotary(a[..., cfg.kv_lora_rank:].unsqueeze(2), torch.arange(6)).squeeze(2)
    torch.testing.assert_close(cache[0].kv[:, :6], torch.cat([c_kv, k_r], -1), atol=1e-12, rtol=0)
    assert bool((cache[0].kv[:, 6:] == 0).all())  # positions not yet written stay empty


@pytest.mark.parametrize("attention,kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_baseline_cache_size(attention, kv_heads):
    cfg = cfg_of(attention=attention, num_key_value_heads=kv_heads, head_dim=12)
    model = build(cfg)
    cache = model.new_cache(1, 8)
    for c in cache:
        assert isinstance(c, KVCache)
        assert c.k.shape == c.v.shape == (1, kv_heads, 8, 12)
        assert c.numel_per_token() == 2 * kv_heads * 12
    assert cfg.kv_cache_elements_per_token() == 2 * kv_heads * 12 * cfg.num_hidden_layers


def test_mla_cache_much_smaller_than_mha_at_v2_scale():
    v2 = ModelConfig.preset("v2")
    ratio = v2.kv_cache_elements_per_token() / v2.replace(attention="mha").kv_cache_elements_per_token()
    assert ratio == pytest.approx(576 / (2 * 128 * 128))


def test_padding_v_to_the_query_width_is_exact():
    """attend(pad_v=True), the path for SDPA's flash kernel, equals unpadded attention, output and gradients."""
    from deepseek_mini.model.attention import attend

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 9, 12, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    outs = []
    for pad in (False, True):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        o = attend(qq, kk, vv, scale=0.3, is_causal=True, pad_v=pad)
        (o * torch.arange(o.numel()).view_as(o)).sum().backward()
        outs.append((o, qq.grad, kk.grad, vv.grad))
    assert outs[1][0].shape == (2, 3, 9, 8)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def compare_mla_decode_kernel_with_reference() -> float:
    """The fused decode kernel (split + merge, several launch configurations) against fp64 softmax attention over
    each row's own valid prefix: ragged lengths, splits that end past a row's length or are empty, heads padded to
    the block. Under TRITON_INTERPRET=1 the kernel runs on CPU tensors (fp32 here)."""
    from deepseek_mini.kernels import mla_decode

    B, H, C, R, L = 3, 6, 32, 16, 600
    g = torch.Generator().manual_seed(0)
    q_lat, q_pe = torch.randn(B, H, C, generator=g), torch.randn(B, H, R, generator=g)
    kv = torch.randn(B, L, C + R, generator=g)
    kv_len = torch.tensor([600, 37, 1], dtype=torch.int32)  # row 2: one valid position, most splits empty
    scale = (C + R) ** -0.5
    scores = torch.einsum("bhc,blc->bhl", torch.cat([q_lat, q_pe], -1).double(), kv.double()) * scale
    scores = scores.masked_fill(torch.arange(L)[None, None, :] >= kv_len[:, None, None], float("-inf"))
    ref = torch.einsum("bhl,blc->bhc", scores.softmax(-1), kv[..., :C].double())
    worst = 0.0
    for cfg in (mla_decode.LaunchConfig(splits=1, block_n=16), mla_decode.LaunchConfig(splits=3, block_n=32),
                mla_decode.LaunchConfig(splits=13, block_n=16, num_warps=8, num_stages=3),
                mla_decode.LaunchConfig(splits=40, block_n=16),  # more splits than the merge takes at once
                mla_decode.LaunchConfig(splits=3, block_n=32, tma=True),  # tiles by TMA descriptors
                mla_decode.LaunchConfig(splits=13, block_n=16, num_warps=8, tma=True),
                mla_decode.default_config(B, L, C, n_sm=4),  # the rule for GPUs with less shared memory
                mla_decode.default_config(B, L, C, n_sm=4, smem_per_sm=228 * 1024)):  # Hopper's
        out = mla_decode.launch(q_lat, q_pe, kv, kv_len, scale, cfg)
        assert out.shape == (B, H, C) and out.dtype == q_lat.dtype
        worst = worst_of(worst, float((out.double() - ref).abs().max()))
    # W_UV applied by the merge: a strided view, as MLA passes kv_b_proj's value rows (V = 24 < its block of 32)
    w_kv = torch.randn(H, 8 + 24, C, generator=g)
    out = mla_decode.launch(q_lat, q_pe, kv, kv_len, scale, mla_decode.LaunchConfig(splits=3, block_n=32), w_kv[:, 8:])
    assert out.shape == (B, H, 24)
    worst = worst_of(worst, float((out.double() - torch.einsum("bhc,hvc->bhv", ref, w_kv[:, 8:].double())).abs().max()))
    # q_pe unrotated, rotated by the kernel at each row's new position (kv_len - 1) from RotaryEmbedding's tables,
    # read through strided views and a broadcast length, as a decode step passes them
    rotary = RotaryEmbedding(R, L)
    q = torch.cat([q_lat, torch.randn(B, H, R, generator=g)], dim=-1)  # one row per head: [latent ; rope]
    for lengths in (kv_len, kv_len.long()[:1].expand(B)):  # int32 [B]; an int64 [1] broadcast over the rows
        roped = rope_rows(q[..., C:].double(), rotary.cos, rotary.sin, lengths.long() - 1)
        scores = torch.einsum("bhc,blc->bhl", torch.cat([q_lat.double(), roped], -1), kv.double()) * scale
        scores = scores.masked_fill(torch.arange(L)[None, None, :] >= lengths[:, None, None], float("-inf"))
        ref_rope = torch.einsum("bhl,blc->bhc", scores.softmax(-1), kv[..., :C].double())
        out = mla_decode.launch(q[..., :C], q[..., C:], kv, lengths, scale, mla_decode.LaunchConfig(splits=3, block_n=32),
                                cos=rotary.cos, sin=rotary.sin)
        worst = worst_of(worst, float((out.double() - ref_rope).abs().max()))
    return worst


def compare_append_latent_with_pytorch() -> float:
    """kernels/mla_decode.append_latent against the PyTorch path it replaces (RMSNorm of c_KV and of c_Q, RoPE of the
    shared key, the cache write): rows at their own positions and a [1] position broadcast over the rows, inputs read
    through strided views of one GEMM output, YaRN tables; the cache is changed only at the written slots."""
    from deepseek_mini.kernels import mla_decode
    from deepseek_mini.model.layers import RMSNorm

    B, Q, C, R, L = 3, 12, 16, 8, 40
    g = torch.Generator().manual_seed(0)
    down = torch.randn(B, 5 + Q + C + R, generator=g)[:, 5:]  # rows of a wider tensor: strided
    q_norm, kv_norm = RMSNorm(Q, eps=1e-6), RMSNorm(C, eps=1e-5)
    with torch.no_grad():
        for n in (q_norm, kv_norm):
            n.weight.uniform_(0.5, 1.5, generator=g)
    rotary = RotaryEmbedding(R, L, scaling=YARN)
    worst = 0.0
    for pos in (torch.tensor([3, 17, 39]), torch.tensor([21]).expand(B)):
        cache = torch.randn(B + 1, L, C + R, generator=g)
        before = cache.clone()
        q_out, kv_len = mla_decode.append_latent(down[:, Q:], kv_norm, cache, pos, rotary.cos, rotary.sin,
                                                 down[:, :Q], q_norm)
        with torch.no_grad():
            k_ref = rotary(down[:, None, None, Q + C:], pos[:, None])[:, 0, 0]  # [B, 1, 1, R] at each row's position
            ref = torch.cat([kv_norm(down[:, Q:Q + C]), k_ref], dim=-1)
            rows = torch.arange(B)
            written = cache[rows, pos]
            worst = worst_of(worst, float((written - ref).abs().max()), float((q_out - q_norm(down[:, :Q])).abs().max()))
            before[rows, pos] = written  # nothing else changed
            if not torch.equal(cache, before) or not torch.equal(kv_len, (pos + 1).to(torch.int32)):
                return math.inf
    q_none, _ = mla_decode.append_latent(down[:, Q:], kv_norm, cache, pos, rotary.cos, rotary.sin)
    return worst if q_none is None else math.inf


def compare_append_latent_given_a_nan_query() -> float:
    """The comparison above against a cache-write kernel whose normalised query row 1 is NaN: it must report that as
    infinitely wrong (a running max() would have passed over the NaN and called the kernel exact)."""
    from deepseek_mini.kernels import mla_decode

    append = mla_decode.append_latent

    def nan_query(*args, **kw):
        q_out, kv_len = append(*args, **kw)
        if q_out is not None:
            q_out[1] = float("nan")
        return q_out, kv_len

    mla_decode.append_latent = nan_query
    try:
        return compare_append_latent_with_pytorch()
    finally:
        mla_decode.append_latent = append


def compare_mla_decode_step_with_pytorch(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """A whole model's decode through MLA.decode_step (the Triton kernels: cache write, attention, W_UV) against the
    PyTorch path (fused_decode off), fp32 under the interpreter (bf16 on CUDA): without and with q_lora, folded weights
    and not, every row at one position (an int start_pos, generate()'s plain decode) and rows at their own (a [B]
    tensor, speculative decoding's); the logits and every cache written, relative to their largest values."""
    from deepseek_mini.kernels import mla_decode

    append, calls, worst = mla_decode.append_latent, [], 0.0
    mla_decode.append_latent = lambda *args, **kw: calls.append(1) or append(*args, **kw)
    for changes in ({}, dict(q_lora_rank=12)):
        model = build(cfg_of(**changes)).to(device, dtype)
        ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1)).to(device)
        for folded in (False, True):
            runs = []
            for fused in (True, False):
                for layer in model.model.layers:
                    layer.self_attn.fused_decode = fused
                with torch.no_grad(), (model.folded_weights() if folded else contextlib.nullcontext()):
                    cache = model.new_cache(3, 16)
                    logits = [model(ids[:, :5], cache=cache, start_pos=0).logits[:, -1]]
                    logits += [model(ids[:, p:p + 1], cache=cache, start_pos=p).logits[:, -1] for p in (5, 6)]
                    start = torch.tensor([7, 4, 6], device=device)  # per row: rows 1, 2 overwrite slots they had
                    logits.append(model(ids[:, 7:8], cache=cache, start_pos=start).logits[:, -1])
                runs.append((torch.stack(logits), [c.kv for c in cache]))
            (fused_logits, fused_kv), (ref_logits, ref_kv) = runs
            worst = worst_of(worst, float((fused_logits - ref_logits).abs().max() / ref_logits.abs().max()),
                        *(float((a - b).abs().max() / b.abs().max()) for a, b in zip(fused_kv, ref_kv)))
    mla_decode.append_latent = append
    # the fused runs took the kernels: 3 decode steps x 2 layers, for 2 configurations x folded or not
    return worst if len(calls) == 3 * 2 * 2 * 2 else math.inf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA (CPU: the interpreter test)")
def test_mla_decode_step_matches_pytorch_on_cuda():
    """bf16 on the GPU: within a few bf16 roundings (the kernels round where the PyTorch path does, and sum in
    another order); a wrong position, length or rotation is off by O(1)."""
    assert compare_mla_decode_step_with_pytorch("cuda", torch.bfloat16) < 3e-2


@requires_triton
def test_mla_decode_kernels_match_pytorch_under_the_interpreter():
    """The attention kernel alone, the cache-write kernel alone, and a model decoding through both."""
    diffs = max_diff_under_interpreter("test_attention", ["compare_mla_decode_kernel_with_reference",
                                                          "compare_append_latent_with_pytorch",
                                                          "compare_mla_decode_step_with_pytorch",
                                                          "compare_append_latent_given_a_nan_query"])
    assert diffs.pop("compare_append_latent_given_a_nan_query") == math.inf  # a NaN output fails the comparison
    assert all(d < 1e-5 for d in diffs.values()), diffs
