"""Fused absorbed-MLA decode attention for CUDA (Triton): read each cached latent once.

Decoding one token with weight absorption is MQA over one shared key [c_KV ; k_R] and one shared value
c_KV for all heads. The plain PyTorch form (bmm -> fp32 softmax -> bmm) reads the cache twice and
writes and re-reads an fp32 score matrix; this kernel streams the cache once, flash-decoding style:

* grid (batch, splits): each program owns a contiguous range of cached positions of one sequence and
  all heads (heads share the key, so one tile of cache serves every head);
* scores for a block of positions = q_lat . c^T + q_pe . k_R^T, online softmax in fp32 registers,
  acc += p . c;
* the per-split partial results (acc, running max, running sum) are merged afterwards in PyTorch.

The valid length is read from a device tensor, so the call has static shapes and can be captured in a
CUDA graph. Used by MLA._absorbed for single-token decode on CUDA; everything else takes the PyTorch path.
"""

from __future__ import annotations

import torch

from deepseek_mini.kernels.runtime import tl, triton

if triton is not None:

    @triton.jit
    def _mla_decode_split(q_lat, q_pe, kv, kv_len, acc_out, m_out, l_out, scale,
                          stride_qb, stride_qh, stride_pb, stride_ph, stride_kb, stride_kn,
                          H: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                          SPLIT_LEN: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # b * stride_kb overflows int32 for long caches
        split = tl.program_id(1)
        n_valid = tl.load(kv_len + b)
        start = split * SPLIT_LEN
        offs_h = tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        h_mask = offs_h < H
        ql = tl.load(q_lat + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                     mask=h_mask[:, None] & (offs_c[None, :] < C), other=0.0)
        qp = tl.load(q_pe + b * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                     mask=h_mask[:, None] & (offs_r[None, :] < R), other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        end = tl.minimum(start + SPLIT_LEN, n_valid)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            row = kv + b * stride_kb + offs_n[:, None] * stride_kn
            c = tl.load(row + offs_c[None, :], mask=n_mask[:, None] & (offs_c[None, :] < C), other=0.0)
            r = tl.load(row + C + offs_r[None, :], mask=n_mask[:, None] & (offs_r[None, :] < R), other=0.0)
            s = tl.dot(ql, tl.trans(c)) + tl.dot(qp, tl.trans(r))
            s = tl.where(n_mask[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
            m_i = m_new
        base = (b * SPLITS + split) * BLOCK_H
        tl.store(acc_out + (base + offs_h[:, None]) * BLOCK_C + offs_c[None, :], acc)
        tl.store(m_out + base + offs_h, m_i)
        tl.store(l_out + base + offs_h, l_i)


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def mla_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, kv_len: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """q_lat [B, H, C], q_pe [B, H, R], kv [B, L, C + R] (cache; positions >= kv_len ignored),
    kv_len int32 [B] -> latent attention output [B, H, C] (before W_UV), in q_lat's dtype."""
    return torch.ops.deepseek_mini.mla_decode(q_lat, q_pe, kv, kv_len, scale)


def _mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, kv_len: torch.Tensor,
                scale: float) -> torch.Tensor:
    B, H, C = q_lat.shape
    R = q_pe.shape[-1]
    L = kv.shape[1]
    out_dtype = q_lat.dtype
    q_lat, q_pe = q_lat.to(kv.dtype).contiguous(), q_pe.to(kv.dtype).contiguous()
    BLOCK_H = max(16, triton.next_power_of_2(H))
    BLOCK_C, BLOCK_R = triton.next_power_of_2(C), max(16, triton.next_power_of_2(R))
    BLOCK_N = 64 if BLOCK_C <= 256 else 32
    # enough programs to fill the GPU (~2 waves of 132 SMs), each streaming >= 256 positions
    splits = max(1, min(triton.cdiv(L, 256), triton.cdiv(264, B)))
    split_len = triton.cdiv(triton.cdiv(L, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(L, split_len)
    acc = torch.empty(B, splits, BLOCK_H, BLOCK_C, device=kv.device, dtype=torch.float32)
    m = torch.empty(B, splits, BLOCK_H, device=kv.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    _mla_decode_split[(B, splits)](
        q_lat, q_pe, kv, kv_len, acc, m, lsum, scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0), kv.stride(1),
        H=H, C=C, R=R, BLOCK_H=BLOCK_H, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
        SPLIT_LEN=split_len, SPLITS=splits, num_warps=4, num_stages=2)
    # merge the splits: softmax over per-split maxima (empty splits have m = -inf and weigh 0)
    m_all = m.amax(dim=1, keepdim=True)
    w = torch.exp(m - m_all).nan_to_num(0.0)  # [B, splits, BLOCK_H]
    out = (acc * w[..., None]).sum(1) / (lsum * w).sum(1)[..., None]
    return out[:, :H, :C].to(out_dtype).contiguous()


if triton is not None:
    # An opaque custom op, so torch.compile can fuse the code around it without a graph break.
    torch.library.custom_op("deepseek_mini::mla_decode", _mla_decode, mutates_args=())

    @torch.library.register_fake("deepseek_mini::mla_decode")
    def _mla_decode_fake(q_lat, q_pe, kv, kv_len, scale):
        return q_lat.new_empty(q_lat.shape)  # contiguous, like the real op's result
