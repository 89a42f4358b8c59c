"""Fused absorbed-MLA decode attention for CUDA (Triton): read each cached latent once.

Decoding one token with weight absorption is MQA over one shared key [c_KV ; k_R] and one shared value
c_KV for all heads. The plain PyTorch form (bmm -> fp32 softmax -> bmm) reads the cache twice and
writes and re-reads an fp32 score matrix; this kernel streams the cache once, flash-decoding style:

* grid (batch, splits): each program owns a contiguous range of cached positions of one sequence and
  all heads (heads share the key, so one tile of cache serves every head);
* scores for a block of positions = q_lat . c^T + q_pe . k_R^T, online softmax in fp32 registers,
  acc += p . c;
* the per-split partial results (acc, running max, running sum) are merged by a second, small kernel
  (one program per sequence and head), which can also apply the head's W_UV (the value up-projection) to the merged
  latent output while it is in registers: one GEMM per layer fewer in a decode step, where kernels, not bytes, cost.
  For the same reason the split kernel can rotate the query's rope part itself (RoPE at the new token's position,
  kv_len - 1, from the model's cos/sin tables), and reads kv_len with any integer type and stride: the step then
  prepares no inputs for it.

Before them, one more small kernel takes the new token's latent from the down-projection's output to the cache
(`append_latent`): the RMSNorm of c_KV, the RoPE of the shared key k_R, the write into the cache at the token's
position, the valid length kv_len = position + 1 for the attention kernel, and (with q_lora) the RMSNorm of the query's
latent c_Q, which reads the same GEMM output. PyTorch, even compiled, took five kernels for that per layer (two
normalisations of different widths, the key's rotation, the cache's index copy, the length).

The valid length is read from a device tensor, so the call has static shapes and can be captured in a
CUDA graph. Used by MLA.decode_step for single-token decode on CUDA; everything else takes the PyTorch path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepseek_mini.kernels import runtime
from deepseek_mini.kernels.runtime import tl, triton

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

if triton is not None:

    @triton.jit
    def _rope(x, partner, cos, sin, pos, stride_rope, offs_r, R: tl.constexpr):
        """RotaryEmbedding in fp32 on pairs (2i, 2i+1) at position pos (cos / sin: its tables): x's last dimension is
        offs_r, `partner` is x with each pair swapped (element i ^ 1)."""
        table = pos * stride_rope + offs_r // 2
        cos_r = tl.load(cos + table, mask=offs_r < R, other=0.0)
        sin_r = tl.load(sin + table, mask=offs_r < R, other=0.0)
        sign = tl.where(offs_r % 2 == 0, -1.0, 1.0)  # x0 cos - x1 sin, x1 cos + x0 sin
        return x.to(tl.float32) * cos_r + sign * partner.to(tl.float32) * sin_r

    @triton.jit
    def _mla_decode_split(q_lat, q_pe, kv, kv_c_desc, kv_r_desc, kv_len, cos, sin, acc_out, m_out, l_out, scale,
                          stride_qb, stride_qh, stride_pb, stride_ph, stride_kb, stride_kn, stride_len, stride_rope,
                          SPLIT_LEN, SPLITS, H: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
                          TMA: tl.constexpr):
        # SPLIT_LEN / SPLITS are runtime values (one compiled kernel for every batch size and cache length)
        b = tl.program_id(0).to(tl.int64)  # b * stride_kb overflows int32 for long caches
        split = tl.program_id(1)
        n_valid = tl.load(kv_len + b * stride_len).to(tl.int32)
        start = split * SPLIT_LEN
        offs_h = tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        h_mask = offs_h < H
        ql = tl.load(q_lat + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                     mask=h_mask[:, None] & (offs_c[None, :] < C), other=0.0)
        qp_mask = h_mask[:, None] & (offs_r[None, :] < R)
        qp = tl.load(q_pe + b * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :], mask=qp_mask, other=0.0)
        if ROPE:  # the query's rope part at the new token's position
            partner = tl.load(q_pe + b * stride_pb + offs_h[:, None] * stride_ph + (offs_r ^ 1)[None, :], mask=qp_mask,
                              other=0.0)
            qp = _rope(qp, partner, cos, sin, (n_valid - 1).to(tl.int64), stride_rope, offs_r, R).to(qp.dtype)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        end = tl.minimum(start + SPLIT_LEN, n_valid)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            if TMA:  # the tiles by the copy engine (Hopper): positions past the cache come as zeros
                c = kv_c_desc.load([tl.cast(b, tl.int32), n0, 0]).reshape(BLOCK_N, BLOCK_C)
                r = kv_r_desc.load([tl.cast(b, tl.int32), n0, C]).reshape(BLOCK_N, BLOCK_R)
            else:
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

    @triton.jit
    def _mla_decode_merge(acc, m, lsum, out, w_uv, SPLITS, stride_ob, stride_oh, stride_wh, stride_wv,
                          C: tl.constexpr, V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr, HAS_WUV: tl.constexpr):
        # one program per (sequence, head), BLOCK_S splits at a time (batch 1 has ~130 splits: one program per
        # sequence walked them one by one and took twice as long as the PyTorch merge it replaced)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        m_max = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            rows = (b * SPLITS + s0 + offs_s) * BLOCK_H + h
            m_max = tl.maximum(m_max, tl.load(m + rows, mask=s0 + offs_s < SPLITS, other=float("-inf")))
        m_all = tl.max(m_max, axis=0)
        num = tl.zeros([BLOCK_C], tl.float32)
        den = tl.zeros([BLOCK_S], tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            valid = s0 + offs_s < SPLITS
            rows = (b * SPLITS + s0 + offs_s) * BLOCK_H + h
            w = tl.exp(tl.load(m + rows, mask=valid, other=float("-inf")) - m_all)  # empty split (m = -inf): 0
            den += w * tl.load(lsum + rows, mask=valid, other=0.0)
            part = tl.load(acc + rows[:, None] * BLOCK_C + offs_c[None, :], mask=valid[:, None], other=0.0)
            num += tl.sum(w[:, None] * part, axis=0)
        o = num / tl.sum(den, axis=0)
        if HAS_WUV:  # out[v] = sum_c W_UV[h, v, c] o[c], from the fp32 o
            offs_v = tl.arange(0, BLOCK_V)
            w = tl.load(w_uv + h * stride_wh + offs_v[:, None] * stride_wv + offs_c[None, :],
                        mask=(offs_v[:, None] < V) & (offs_c[None, :] < C), other=0.0).to(tl.float32)
            o_v = tl.sum(w * o[None, :], axis=1)
            tl.store(out + b * stride_ob + h * stride_oh + offs_v, o_v.to(out.dtype.element_ty), mask=offs_v < V)
        else:
            tl.store(out + b * stride_ob + h * stride_oh + offs_c, o.to(out.dtype.element_ty), mask=offs_c < C)

    @triton.jit
    def _rms_norm(x, w, N: tl.constexpr, eps):
        """layers.RMSNorm on a row (padding zeros): normalise in fp32, round to x's dtype, scale by the weight in fp32."""
        xf = x.to(tl.float32)
        r = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        return (xf * r).to(x.dtype).to(tl.float32) * w.to(tl.float32)

    @triton.jit
    def _append_latent(kv_new, kv_w, q_new, q_w, q_out, cache, pos, cos, sin, kv_len, kv_eps, q_eps,
                       stride_kb, stride_qb, stride_ob, stride_cb, stride_cn, stride_pos, stride_rope,
                       C: tl.constexpr, R: tl.constexpr, Q: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr, HAS_Q: tl.constexpr):
        # one program per row: normalise c_KV, rotate k_R at the row's position, write both into the cache there
        b = tl.program_id(0).to(tl.int64)
        p = tl.load(pos + b * stride_pos).to(tl.int64)
        slot = cache + b * stride_cb + p * stride_cn
        offs_c = tl.arange(0, BLOCK_C)
        c = tl.load(kv_new + b * stride_kb + offs_c, mask=offs_c < C, other=0.0)
        w = tl.load(kv_w + offs_c, mask=offs_c < C, other=0.0)
        tl.store(slot + offs_c, _rms_norm(c, w, C, kv_eps).to(cache.dtype.element_ty), mask=offs_c < C)
        # the shared key's rope part at the row's position, rounded to the input's dtype as RotaryEmbedding returns it
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        k = tl.load(kv_new + b * stride_kb + C + offs_r, mask=r_mask, other=0.0)
        partner = tl.load(kv_new + b * stride_kb + C + (offs_r ^ 1), mask=r_mask, other=0.0)
        k_roped = _rope(k, partner, cos, sin, p, stride_rope, offs_r, R).to(k.dtype)
        tl.store(slot + C + offs_r, k_roped.to(cache.dtype.element_ty), mask=r_mask)
        tl.store(kv_len + b, (p + 1).to(tl.int32))
        if HAS_Q:  # q_a_layernorm of the query's latent, which the same GEMM produced
            offs_q = tl.arange(0, BLOCK_Q)
            q = tl.load(q_new + b * stride_qb + offs_q, mask=offs_q < Q, other=0.0)
            wq = tl.load(q_w + offs_q, mask=offs_q < Q, other=0.0)
            tl.store(q_out + b * stride_ob + offs_q, _rms_norm(q, wq, Q, q_eps).to(q_out.dtype.element_ty),
                     mask=offs_q < Q)


def available(t: torch.Tensor) -> bool:
    """16-bit tensors on CUDA; fp32 CPU tensors under Triton's interpreter (the tests: there a 16-bit tl.dot is not
    the GPU's)."""
    if triton is None:
        return False
    if t.is_cuda:
        return t.dtype in (torch.bfloat16, torch.float16)
    return runtime.INTERPRET and t.dtype == torch.float32


@dataclass(frozen=True)
class LaunchConfig:
    """How one call is cut up: `splits` programs per sequence, each streaming `block_n` positions at a time."""

    splits: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False  # tiles loaded by the tensor memory accelerator (Hopper; tma_possible)


def default_config(B: int, L: int, C: int, n_sm: int, smem_per_sm: int = 0) -> LaunchConfig:
    """Streaming the cache is the whole cost, so the programs should cover the SMs evenly and keep enough loads in
    flight. Measured on an H200 (2026-11-30, batch 32 x 32K, scripts/bench/mla_decode_tune.py): one program per SM
    with 128-position blocks in a 3-stage pipeline read 4.08 TB/s; 288 programs of 64-position blocks in 2 stages
    (~2.2 per SM, the rule before) 3.23 TB/s. That pipeline needs ~200 KB of shared memory per program (Hopper);
    GPUs with less keep ~2 programs per SM with the smaller blocks. Every program streams >= 256 positions.
    On Hopper the tiles come by TMA with 8 warps (the same sweep with those options, 2026-11-30: 146.2 against 149.5
    us per call at 32 x 32K, 44.6 against 45.1 at 32 x 8K). Tried and slower there: scores as [positions, heads], so
    that both products have the 64+ rows of Hopper's warpgroup MMA (154.5 us); cutting the batch's positions, laid end
    to end, into one equal range per SM (132 programs at batch 32 instead of 4 per sequence = 128, a range crossing
    into the next sequence: 151.4 against 146.6 us, the two segments' pipelines cost more than the idle SMs)."""
    if C <= 256 and smem_per_sm >= 200 * 1024:
        return LaunchConfig(splits=max(1, min(triton.cdiv(L, 256), n_sm // B)), block_n=128, num_warps=8,
                            num_stages=3, tma=True)
    splits = max(1, min(triton.cdiv(L, 256), triton.cdiv(2 * n_sm, B)))
    return LaunchConfig(splits=splits, block_n=64 if C <= 256 else 32)


def _device_shape(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory per SM) of a CUDA device (under the interpreter: a small GPU's rule)."""
    if device.type != "cuda":
        return 4, 0
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, getattr(props, "shared_memory_per_multiprocessor", 0)


def mla_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, kv_len: torch.Tensor,
                         scale: float, w_uv: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                         sin: torch.Tensor | None = None) -> torch.Tensor:
    """q_lat [B, H, C], q_pe [B, H, R], kv [B, L, C + R] (cache; positions >= kv_len ignored), kv_len [B] (any
    integer type, any stride: a broadcast [1] expanded to [B] is read in place) -> latent attention output [B, H, C]
    (before W_UV), in q_lat's dtype. q_lat and q_pe may be views with strided rows (their last dimension contiguous).
    With w_uv [H, V, C] (its last dimension contiguous), the heads' outputs after W_UV [B, H, V]. With cos and sin
    [positions, R / 2] (RotaryEmbedding's tables), q_pe comes unrotated and the kernel rotates it at position
    kv_len - 1, the new token's."""
    return torch.ops.deepseek_mini.mla_decode(q_lat, q_pe, kv, kv_len, scale, w_uv, cos, sin)


def _mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, kv_len: torch.Tensor,
                scale: float, w_uv: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None
                ) -> torch.Tensor:
    B, H, C = q_lat.shape
    return launch(q_lat, q_pe, kv, kv_len, scale, choose_config(B, kv.shape[1], C, *_device_shape(kv.device)),
                  w_uv, cos, sin)


choose_config = default_config  # the rule the op uses; scripts/bench/mla_decode_tune.py compares others


def launch(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, kv_len: torch.Tensor, scale: float,
           config: LaunchConfig, w_uv: torch.Tensor | None = None, cos: torch.Tensor | None = None,
           sin: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel and the merge of its splits with an explicit launch configuration (w_uv, cos, sin:
    mla_decode_attention)."""
    B, H, C = q_lat.shape
    acc, m, lsum = split_partials(q_lat, q_pe, kv, kv_len, scale, config, cos, sin)
    # the merge is one more launch (in PyTorch it was ~10 small kernels per layer, which torch.compile cannot
    # fuse inside this opaque op)
    has_wuv = w_uv is not None
    if has_wuv:
        w_uv = runtime.rows_contiguous(w_uv)
    V = w_uv.shape[1] if has_wuv else C
    out = torch.empty(B, H, V, device=kv.device, dtype=q_lat.dtype)
    _mla_decode_merge[(B, H)](acc, m, lsum, out, w_uv if has_wuv else acc, acc.shape[1], out.stride(0), out.stride(1),
                              w_uv.stride(0) if has_wuv else 0, w_uv.stride(1) if has_wuv else 0, C=C, V=V,
                              BLOCK_H=acc.shape[2], BLOCK_C=acc.shape[3], BLOCK_S=16,
                              BLOCK_V=triton.next_power_of_2(V), HAS_WUV=has_wuv, num_warps=4)
    return out


def split_partials(q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, kv_len: torch.Tensor, scale: float,
                   config: LaunchConfig, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each split's unnormalised output acc [B, splits, BLOCK_H, BLOCK_C], running max m and sum l
    [B, splits, BLOCK_H] (fp32; heads and channels padded to the blocks; an empty split has m = -inf)."""
    B, H, C = q_lat.shape
    R = q_pe.shape[-1]
    L = kv.shape[1]
    q_lat, q_pe = (runtime.rows_contiguous(t.to(kv.dtype)) for t in (q_lat, q_pe))
    rope = cos is not None
    if rope:
        cos, sin = runtime.rows_contiguous(cos), runtime.rows_contiguous(sin)
    BLOCK_H = max(16, triton.next_power_of_2(H))
    BLOCK_C, BLOCK_R = triton.next_power_of_2(C), max(16, triton.next_power_of_2(R))
    BLOCK_N = config.block_n
    split_len = triton.cdiv(triton.cdiv(L, max(1, config.splits)), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(L, split_len)
    acc = torch.empty(B, splits, BLOCK_H, BLOCK_C, device=kv.device, dtype=torch.float32)
    m = torch.empty(B, splits, BLOCK_H, device=kv.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    tma = config.tma and tma_possible(kv, C, R)
    descs = (TensorDescriptor.from_tensor(kv, [1, BLOCK_N, C]), TensorDescriptor.from_tensor(kv, [1, BLOCK_N, R])
             ) if tma else (kv, kv)
    _mla_decode_split[(B, splits)](
        q_lat, q_pe, kv, *descs, kv_len, cos if rope else kv, sin if rope else kv, acc, m, lsum, scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0), kv.stride(1),
        kv_len.stride(0) if kv_len.dim() else 0, cos.stride(0) if rope else 0, split_len, splits, H=H, C=C, R=R,
        BLOCK_H=BLOCK_H, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, ROPE=rope, TMA=tma,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return acc, m, lsum


def tma_possible(kv: torch.Tensor, C: int, R: int) -> bool:
    """Can the split kernel load the cache's tiles by TMA: Hopper or later (or the interpreter), widths that are powers
    of 2 of at most 256 (a tile's box), rows at 16-byte strides and a 16-byte aligned base."""
    hopper = runtime.INTERPRET or (kv.is_cuda and torch.cuda.get_device_capability(kv.device)[0] >= 9)
    if TensorDescriptor is None or not hopper:
        return False
    pow2 = all(w == triton.next_power_of_2(w) and 16 <= w <= 256 for w in (C, R))
    aligned = kv.stride(-1) == 1 and all(st * kv.element_size() % 16 == 0 for st in kv.stride()[:-1])
    return pow2 and aligned and kv.data_ptr() % 16 == 0


def append_latent(kv_new: torch.Tensor, kv_norm: torch.nn.Module, cache: torch.Tensor, pos: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, q_new: torch.Tensor | None = None,
                  q_norm: torch.nn.Module | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The new token of each row into the cache: kv_new [B, C + R] ([c_KV ; k_R] as projected, rows may be strided
    views of a wider GEMM output), kv_norm the RMSNorm of c_KV (layers.RMSNorm), cache [>= B, L, C + R] (written at
    [b, pos[b]]: kv_norm(c_KV) and k_R rotated at pos[b] by RotaryEmbedding's tables cos / sin), pos [B] (any integer
    type and stride: a [1] expanded to [B] is read in place). With q_new [B, Q] and q_norm, also q_norm(q_new).
    -> (the normalised query latent [B, Q] or None, kv_len = pos + 1 int32 [B], mla_decode_attention's lengths)."""
    q_out, kv_len = torch.ops.deepseek_mini.mla_append_latent(
        kv_new, kv_norm.weight, kv_norm.eps, cache, pos, cos, sin, q_new,
        None if q_norm is None else q_norm.weight, 0.0 if q_norm is None else q_norm.eps)
    return (q_out if q_new is not None else None), kv_len


def _append_latent_op(kv_new: torch.Tensor, kv_weight: torch.Tensor, kv_eps: float, cache: torch.Tensor,
                      pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_new: torch.Tensor | None,
                      q_weight: torch.Tensor | None, q_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, CR = kv_new.shape
    C = kv_weight.shape[0]
    has_q = q_new is not None
    kv_new, cos, sin = (runtime.rows_contiguous(t) for t in (kv_new, cos, sin))
    q_new = runtime.rows_contiguous(q_new) if has_q else kv_new
    q_out = _q_out(q_new, q_weight) if has_q else kv_new.new_empty(0)
    kv_len = torch.empty(B, device=kv_new.device, dtype=torch.int32)
    Q = q_new.shape[1] if has_q else 1
    _append_latent[(B,)](kv_new, kv_weight, q_new, q_weight if has_q else kv_weight, q_out, cache, pos, cos, sin, kv_len,
                         kv_eps, q_eps, kv_new.stride(0), q_new.stride(0), q_out.stride(0) if has_q else 0,
                         cache.stride(0), cache.stride(1), pos.stride(0) if pos.dim() else 0, cos.stride(0), C=C,
                         R=CR - C, Q=Q, BLOCK_C=triton.next_power_of_2(C), BLOCK_R=max(2, triton.next_power_of_2(CR - C)),
                         BLOCK_Q=triton.next_power_of_2(Q), HAS_Q=has_q, num_warps=4)
    return q_out, kv_len


def _q_out(q_new: torch.Tensor, q_weight: torch.Tensor) -> torch.Tensor:
    """The normalised query's buffer: RMSNorm's result dtype (the weight times the input's dtype)."""
    return q_new.new_empty(q_new.shape, dtype=torch.promote_types(q_new.dtype, q_weight.dtype))


if triton is not None:
    # Opaque custom ops, so torch.compile can fuse the code around them without a graph break.
    torch.library.custom_op("deepseek_mini::mla_decode", _mla_decode, mutates_args=())
    torch.library.custom_op("deepseek_mini::mla_append_latent", _append_latent_op, mutates_args=("cache",))

    @torch.library.register_fake("deepseek_mini::mla_append_latent")
    def _append_latent_fake(kv_new, kv_weight, kv_eps, cache, pos, cos, sin, q_new, q_weight, q_eps):
        q_out = _q_out(q_new, q_weight) if q_new is not None else kv_new.new_empty(0)
        return q_out, kv_new.new_empty(kv_new.shape[0], dtype=torch.int32)

    @torch.library.register_fake("deepseek_mini::mla_decode")
    def _mla_decode_fake(q_lat, q_pe, kv, kv_len, scale, w_uv, cos, sin):
        B, H, C = q_lat.shape
        return q_lat.new_empty(B, H, C if w_uv is None else w_uv.shape[1])  # contiguous, like the real op's result
