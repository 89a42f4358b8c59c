"""Attention: Multi-head Latent Attention (DeepSeek-V2) and the MHA / GQA / MQA baselines.

MLA in one paragraph. Keys and values are not projected per head from the hidden state; instead every
token is squeezed into one small latent c_KV (kv_lora_rank wide, RMS-normalised) from which per-head
keys and values are re-expanded by kv_b_proj. Position goes through a separate, small, *shared* key
k_R (qk_rope_head_dim wide) that is rotated by RoPE. A cache therefore only needs
[c_KV ; k_R] = kv_lora_rank + qk_rope_head_dim values per token per layer.

Two ways to attend over that cache:
* naive: rebuild K and V for every cached token from c_KV, then ordinary attention. Cheap in FLOPs,
  used for training and for prefill (no past tokens to rebuild).
* absorbed: fold W_UK into the query (q~ = W_UK^T q_nope, kv_lora_rank wide) and W_UV into the output,
  so scores are taken directly against the cached latents and the per-head K/V never exist. This is
  MQA with one 576-wide shared key (for V2), and it is what makes decoding memory-cheap.

Weight layouts follow the released checkpoints: q rows per head are [nope ; rope], kv_b_proj rows per
head are [k_nope ; v], kv_a_proj_with_mqa rows are [latent ; rope key].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini.config import ModelConfig
from deepseek_mini.kernels import mla_decode
from deepseek_mini.model.layers import RMSNorm, fused_linears, use_folded
from deepseek_mini.model.rope import RotaryEmbedding


@dataclass
class LatentCache:
    """MLA cache for one layer: [c_KV ; k_R] per token, in one tensor so a decode step reads it once."""

    kv: torch.Tensor  # [B, max_len, kv_lora_rank + qk_rope_head_dim]

    def numel_per_token(self) -> int:
        return self.kv.shape[-1]


@dataclass
class KVCache:
    """Standard cache for one layer of the baselines: per-KV-head keys and values."""

    k: torch.Tensor  # [B, n_kv_heads, max_len, head_dim]
    v: torch.Tensor

    def numel_per_token(self) -> int:
        return 2 * self.k.shape[1] * self.k.shape[-1]


def attend(q, k, v, scale, is_causal, mask=None, pad_v=False):
    """SDPA over [B, H, T, D] tensors. q/k and v may differ in width (MLA: 96 vs 64 in `small`).

    PyTorch's flash kernel needs equal widths; cuDNN's does not. Where flash would be SDPA's pick
    (`pad_v`, see pad_v_for_flash), v is zero-padded to q's width and the output sliced back (exact:
    the padded columns stay zero), rather than falling to the slower memory-efficient kernel.
    """
    dv = v.shape[-1]
    if pad_v and dv != q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    enable_gqa = k.shape[1] != q.shape[1]
    # SDPA's is_causal aligns to the top-left, so it is only right when queries and keys are the same
    # tokens; a decode step (1 query, S keys) passes neither a mask nor is_causal: it sees everything.
    is_causal = is_causal and mask is None and q.shape[-2] == k.shape[-2]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         scale=scale, enable_gqa=enable_gqa)
    return out[..., :dv]


@torch.compiler.assume_constant_result
def pad_v_for_flash(device_index: int) -> bool:
    """Pad MLA's narrower v on this CUDA device? Not on Hopper and later with cuDNN attention on: SDPA picks
    cuDNN there, which takes v as it is (bit-identical output, without the pad and slice copies); elsewhere
    flash is SDPA's fused kernel."""
    return not (torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(device_index) >= (9, 0))


def decode_mask(t: int, start_pos: int, device) -> torch.Tensor | None:
    """Boolean mask [t, start_pos + t]: query i (at position start_pos + i) sees keys 0..start_pos + i."""
    if t == 1:
        return None  # one new token sees every cached one
    q_pos = torch.arange(t, device=device)[:, None] + start_pos
    k_pos = torch.arange(start_pos + t, device=device)[None, :]
    return k_pos <= q_pos


def row_decode_mask(t: int, start_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Per-row decode_mask [B, t, length] over a whole preallocated cache: row b's query i (at position
    start_pos[b] + i) sees keys 0..start_pos[b] + i, so each row attends to its own valid prefix only (speculative
    decoding, where rows sit at different positions of one batched cache). The static length, not the furthest
    row's, so no layer waits for the device to say where that row is."""
    q_pos = start_pos[:, None, None] + torch.arange(t, device=start_pos.device)[None, :, None]
    k_pos = torch.arange(length, device=start_pos.device)[None, None, :]
    return k_pos <= q_pos


def row_slots(start_pos: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pair (rows [B, 1], positions [B, t]) of the cache slots row b writes at start_pos[b] .. + t - 1."""
    rows = torch.arange(start_pos.shape[0], device=start_pos.device)[:, None]
    return rows, start_pos[:, None] + torch.arange(t, device=start_pos.device)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads = h
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)  # eps as released (not rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)
        self.rotary = RotaryEmbedding(self.rope_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.scale = cfg.softmax_scale()
        self.decode_mode = "absorb"  # or "naive": rebuild K/V from the latents at every step
        self.fused_decode = True  # absorbed single-token decode through the Triton kernel on CUDA
        self.pad_v = "auto"  # zero-pad v to q's width for flash attention: "auto" (pad_v_for_flash), True, False
        # W_UK folded into the query projection, for inference only (fold(); DeepSeekV2.folded_weights): None
        # otherwise. Non-persistent buffers: they follow .to() but are never saved.
        self.register_buffer("down_folded", None, persistent=False)
        self.register_buffer("q_folded", None, persistent=False)

    def new_cache(self, batch_size, max_len, device, dtype) -> LatentCache:
        return LatentCache(torch.zeros(batch_size, max_len, self.rank + self.rope_dim, device=device, dtype=dtype))

    # ------------------------------------------------------------------ the absorption, folded once
    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's two halves per head: W_UK [H, nope, rank] and W_UV [H, v, rank]."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, :self.nope], w[:, self.nope:]

    @torch.no_grad()
    def fold(self) -> bool:
        """Fold W_UK into the query projection, as the paper writes the absorption: the latent query comes from one
        GEMM instead of a GEMM, a per-head product and a permute (a decode step of a small model is bound by its
        number of kernels, not its bytes). Also concatenates the two down-projections of x once instead of at every
        step (layers.fused_linears). Products in fp32, rounded once. False when already folded. The folded query
        projection has rank + rope rows per head instead of nope + rope (3x in `small`): memory for kernels.
        W_UV is not folded into W_O, the paper's other half: that GEMM would be H x rank wide instead of H x v (4x in
        `small`), and on an H200 it took longer than W_UV and W_O apart; the decode kernel applies W_UV instead
        (kernels/mla_decode.py, in the merge of its splits)."""
        if self.down_folded is not None:
            return False
        H, nope, rope, rank = self.n_heads, self.nope, self.rope_dim, self.rank
        dtype = self.kv_b_proj.weight.dtype
        f32 = torch.promote_types(dtype, torch.float32)
        w_q = self.q_proj.weight if self.cfg.q_lora_rank is None else self.q_b_proj.weight
        w_q = w_q.view(H, nope + rope, -1).to(f32)
        # per head [W_UK^T W_UQ ; W_QR]: rank latent-query rows over the head's rope rows
        q_lat = torch.einsum("hdc,hdj->hcj", self._w_uk_uv()[0].to(f32), w_q[:, :nope])
        q = torch.cat([q_lat, w_q[:, nope:]], dim=1).reshape(H * (rank + rope), -1).to(dtype)
        if self.cfg.q_lora_rank is None:  # x -> [folded query ; kv_a] in one GEMM
            self.down_folded = torch.cat([q, self.kv_a_proj_with_mqa.weight])
        else:
            self.down_folded = torch.cat([self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight])
            self.q_folded = q
        return True

    def unfold(self) -> None:
        self.down_folded = self.q_folded = None

    # ------------------------------------------------------------------ forward
    def decode_kernel(self, T: int, cache_kv: torch.Tensor) -> bool:
        """Does absorbed decoding of T new tokens over this cache run the fused Triton kernel (one token, CUDA,
        16-bit cache)?"""
        return T == 1 and self.fused_decode and mla_decode.available(cache_kv)

    def _down(self, x, absorbed: bool):
        """x's one GEMM -> (q, kv, folded): q is c_Q [B, T, q_lora_rank] before its norm (with q_lora) or the query
        itself (without; latent when `folded` and absorbed), kv is [c_KV ; k_R] [B, T, rank + rope] as projected."""
        lora = self.cfg.q_lora_rank is not None
        folded = use_folded(self.down_folded) and (absorbed or lora)  # without q_lora the folded down-projection holds the query
        if folded:
            q, kv = F.linear(x, self.down_folded).split(
                [self.down_folded.shape[0] - self.rank - self.rope_dim, self.rank + self.rope_dim], dim=-1)
        else:
            # both projections of x in one GEMM, as DeepSeek-V3's own code fuses wq_a and wkv_a
            w_q = self.q_a_proj.weight if lora else self.q_proj.weight
            q, kv = fused_linears(x, w_q, self.kv_a_proj_with_mqa.weight)
        return q, kv, folded

    def _queries(self, q, absorbed: bool, folded: bool, normed: bool = False):
        """_down's q (c_Q already normalised when `normed`) -> q_nope [B, T, H, nope] (absorbed: the latent query
        W_UK^T q_nope [B, T, H, rank]) and the unrotated q_pe [B, T, H, rope]."""
        B, T, _ = q.shape
        if self.cfg.q_lora_rank is not None:
            if not normed:
                q = self.q_a_layernorm(q)
            q = F.linear(q, self.q_folded) if folded and absorbed else self.q_b_proj(q)
        width = self.rank if folded and absorbed else self.nope
        q_nope, q_pe = q.view(B, T, self.n_heads, width + self.rope_dim).split([width, self.rope_dim], dim=-1)
        if absorbed and not folded:
            q_nope = torch.einsum("bthd,hdc->bthc", q_nope, self._w_uk_uv()[0])
        return q_nope, q_pe

    def project(self, x, positions, absorbed: bool = False):
        """x [B, T, d] -> q_nope [B, T, H, nope], roped q_pe [B, T, H, rope], normalised latent c_kv
        [B, T, rank] and the roped shared key k_pe [B, T, 1, rope]: what the cache stores is (c_kv, k_pe).
        absorbed=True: the first result is the latent query W_UK^T q_nope [B, T, H, rank] instead (absorbed decode),
        from the folded weights when there are some."""
        q, kv, folded = self._down(x, absorbed)
        q_nope, q_pe = self._queries(q, absorbed, folded)
        q_pe = self.rotary(q_pe, positions)
        c_kv, k_pe = kv.split([self.rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = self.rotary(k_pe.unsqueeze(2), positions)  # [B, T, 1, rope]: one key shared by all heads
        return q_nope, q_pe, c_kv, k_pe

    def decode_step(self, x, pos, cache_kv, past=None):
        """One new token per row through the Triton kernels (decode_kernel): x [B, 1, d] at positions pos ([B], or
        [1] for every row) -> the heads' outputs [B, 1, H, v]. The token's normalised latent and roped key go into
        cache_kv [>= B, L, rank + rope] at [b, pos[b]] on the way (kernels/mla_decode.append_latent, which also
        normalises the query's latent), then the attention over `past` (default cache_kv[:B]; each row's positions
        beyond its own are ignored) rotates the query's rope part and applies W_UV itself: four kernels per layer
        between the down-projection and o_proj (this one, the query's GEMM, the attention's split and merge)."""
        B = x.shape[0]
        q, kv, folded = self._down(x, absorbed=True)
        lora = self.cfg.q_lora_rank is not None
        cos, sin = self.rotary.cos, self.rotary.sin
        q_c, kv_len = mla_decode.append_latent(kv[:, 0], self.kv_a_layernorm, cache_kv, pos.reshape(-1).expand(B), cos,
                                               sin, q[:, 0] if lora else None, self.q_a_layernorm if lora else None)
        q_lat, q_pe = self._queries(q_c[:, None] if lora else q, absorbed=True, folded=folded, normed=True)
        o = mla_decode.mla_decode_attention(q_lat[:, 0], q_pe[:, 0], cache_kv[:B] if past is None else past, kv_len,
                                            self.scale, self._w_uk_uv()[1], cos, sin)
        return o[:, None]

    def forward(self, x, positions, cache: LatentCache | None = None, start_pos: int | torch.Tensor = 0):
        """`start_pos`: where these T tokens go in the cache, one int for the batch, or a [B] tensor of per-row
        positions (then `positions` is [B, T]): the per-row path writes and masks each row at its own place."""
        B, T, _ = x.shape
        per_row = isinstance(start_pos, torch.Tensor)
        # decoding over cached tokens (not training, not the prefill, which has nothing cached before it)
        absorb = cache is not None and self.decode_mode == "absorb" and (per_row or start_pos > 0)
        if absorb and self.decode_kernel(T, cache.kv):
            past = cache.kv[:B] if per_row else cache.kv[:B, :start_pos + 1]
            o = self.decode_step(x, start_pos if per_row else positions, cache.kv, past)
            return self.o_proj(o.reshape(B, T, -1))
        q_nope, q_pe, c_kv, k_pe = self.project(x, positions, absorbed=absorb)
        if cache is None:
            return self.o_proj(self._naive(q_nope, q_pe, c_kv, k_pe, mask=None).reshape(B, T, -1))
        new = torch.cat([c_kv, k_pe.squeeze(2)], dim=-1).to(cache.kv.dtype)
        if per_row:
            cache.kv[row_slots(start_pos, T)] = new
            past = cache.kv[:B]
            mask = row_decode_mask(T, start_pos, past.shape[1])
        else:
            cache.kv[:B, start_pos:start_pos + T] = new
            if start_pos == 0:  # the prefill: rebuild K/V for these tokens only
                return self.o_proj(self._naive(q_nope, q_pe, c_kv, k_pe, mask=None).reshape(B, T, -1))
            past = cache.kv[:B, :start_pos + T]
            mask = decode_mask(T, start_pos, x.device)
        if absorb:
            o = self._absorbed(q_nope, q_pe, past, mask)
        else:
            c_past, kpe_past = past.to(x.dtype).split([self.rank, self.rope_dim], dim=-1)
            o = self._naive(q_nope, q_pe, c_past, kpe_past.unsqueeze(2), mask=mask)
        return self.o_proj(o.reshape(B, T, -1))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        mask = mask[:, None] if mask is not None and mask.dim() == 3 else mask  # per-row [B, T, S]: over heads
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale,
                   is_causal=True, mask=mask, pad_v=q.is_cuda and self._pad_v(q.device))
        return o.transpose(1, 2)  # [B, T, H, v_dim]

    def _pad_v(self, device) -> bool:
        return pad_v_for_flash(device.index or 0) if self.pad_v == "auto" else bool(self.pad_v)

    def _absorbed(self, q_lat, q_pe, past, mask, kv_len=None):
        """Attend in latent space (PyTorch): scores = q_lat.c + q_pe.k_pe with q_lat = W_UK^T q_nope
        (project(absorbed=True)); out = W_UV (p.c) [B, T, H, v]. `kv_len` (int tensor [B] or [1], optional) bounds
        the valid cache positions instead of a mask, so a caller can pass the whole static cache (CUDA graphs).
        Single-token decode on CUDA takes decode_step (the Triton kernels) instead."""
        B, T, H, _ = q_lat.shape
        w_uv = self._w_uk_uv()[1]
        if kv_len is not None:
            valid = torch.arange(past.shape[1], device=past.device) < kv_len.reshape(-1)[0]
            mask = valid[None, :] if mask is None else mask & valid[None, :]
        q_full = torch.cat([q_lat, q_pe], dim=-1).reshape(B, T * H, -1)  # [B, T*H, rank + rope]
        kv = past.to(q_full.dtype)
        # softmax in >= fp32 (fp64 stays fp64, or absorbed and naive decode differ at 1e-7)
        scores = torch.bmm(q_full, kv.transpose(1, 2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.scale  # [B, T*H, S]
        if mask is not None:  # [T, S] for the batch, or [B, T, S] per row
            mask = mask[None] if mask.dim() == 2 else mask
            scores = scores.view(B, T, H, -1).masked_fill(~mask[:, :, None, :], float("-inf")).view(B, T * H, -1)
        p = scores.softmax(-1).to(kv.dtype)
        o_lat = torch.bmm(p, kv[..., :self.rank]).view(B, T, H, self.rank)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)


class GroupedQueryAttention(nn.Module):
    """MHA (kv heads = heads), GQA (kv heads divide heads) and MQA (one kv head) with RoPE on the whole head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.n_heads, self.n_kv, self.hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)
        self.rotary = RotaryEmbedding(self.hd, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.scale = cfg.softmax_scale()

    def new_cache(self, batch_size, max_len, device, dtype) -> KVCache:
        shape = (batch_size, self.n_kv, max_len, self.hd)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def project(self, x, positions):
        """x [B, T, d] -> roped q [B, H, T, hd], roped k and v [B, kv heads, T, hd]."""
        B, T, _ = x.shape
        q = self.rotary(self.q_proj(x).view(B, T, self.n_heads, self.hd), positions).transpose(1, 2)
        k = self.rotary(self.k_proj(x).view(B, T, self.n_kv, self.hd), positions).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return q, k, v

    def forward(self, x, positions, cache: KVCache | None = None, start_pos: int | torch.Tensor = 0):
        """`start_pos` as in MLA.forward: an int, or per-row positions [B] (`positions` then [B, T])."""
        B, T, _ = x.shape
        q, k, v = self.project(x, positions)
        mask = None
        if isinstance(start_pos, torch.Tensor):
            rows, slots = row_slots(start_pos, T)
            cache.k[rows, :, slots] = k.transpose(1, 2).to(cache.k.dtype)  # [B, T, kv heads, hd] at [B, T] slots
            cache.v[rows, :, slots] = v.transpose(1, 2).to(cache.v.dtype)
            mask = row_decode_mask(T, start_pos, cache.k.shape[2])
            k, v = cache.k[:B].to(q.dtype), cache.v[:B].to(q.dtype)
            o = attend(q, k, v, self.scale, is_causal=False, mask=mask[:, None])
            return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))
        if cache is not None:
            cache.k[:B, :, start_pos:start_pos + T] = k.to(cache.k.dtype)
            cache.v[:B, :, start_pos:start_pos + T] = v.to(cache.v.dtype)
            if start_pos > 0:
                k = cache.k[:B, :, :start_pos + T].to(q.dtype)
                v = cache.v[:B, :, :start_pos + T].to(q.dtype)
                mask = decode_mask(T, start_pos, x.device)
        o = attend(q, k, v, self.scale, is_causal=start_pos == 0, mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attention == "mla" else GroupedQueryAttention(cfg)
