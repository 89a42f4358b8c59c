"""The Triton side of optim.adamw.TritonAdamW: one launch updates every tensor of a kind.

A table says where each tensor's arrays lie and which tensor each program works on, so the 180 tensors of
`small`, from 768-element norm weights to 38M-element expert stacks, cost three launches of the AdamW step
(fp32 parameters; bf16 parameters with fp32 masters; per dtype of gradient) and one launch per dtype for the
gradient norm's sum of squares. The update is torch's fused AdamW, in fp32 registers: decoupled weight decay,
bias corrections from the device step count (no host sync), gradients divided by `grad_scale` as they are
read. bf16 values (moments, a master's bf16 copy) are rounded to nearest even in integer arithmetic, so the
GPU and the interpreter give the same bits. The optimizer's docstring (optim/adamw.py) says why.
"""

from __future__ import annotations

import math

import torch

from deepseek_mini.kernels import runtime
from deepseek_mini.kernels.runtime import tl, triton

BLOCK = 2048  # elements per program; 1024-4096 measured within 3% of each other on an H100


def reads(g: torch.Tensor) -> bool:
    """A gradient the kernels read as it is: contiguous fp32 or bf16, on CUDA (or under the interpreter)."""
    return (runtime.runs_on(g) and not g.is_sparse and g.is_contiguous()
            and g.dtype in (torch.float32, torch.bfloat16))


if triton is not None:
    @triton.jit
    def _round_bf16(x):
        """fp32 -> bf16, round to nearest even in integer arithmetic: the same bits on the GPU and the interpreter."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, step_ptr, scale_ptr, table_ptr, block_tensor_ptr, lr,
                      beta1, beta2, log2_beta1, log2_beta2, eps, decay, HAS_SCALE: tl.constexpr,
                      HAS_COPY: tl.constexpr, BF16_MOMENTS: tl.constexpr, ALIGNED: tl.constexpr,
                      BLOCK: tl.constexpr):
        # Many tensors in one launch: program i updates BLOCK elements of tensor block_tensor[i]. Each
        # tensor's row of the table (8 columns, _tensor_table) holds where its arrays lie, in elements from the
        # *_ptr arguments (the first tensor's), so each array kind is addressed from one pointer of its dtype.
        # p: the fp32 values (the parameter itself, or its master); copy: the bf16 parameter of a master.
        pid = tl.program_id(0)
        row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 8
        p_off, g_off, m_off = tl.load(row), tl.load(row + 1), tl.load(row + 2)
        v_off, c_off, s_off = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)
        if ALIGNED:  # every array starts on 32 bytes: lets Triton use vector loads and stores
            p_off, g_off, m_off = tl.multiple_of(p_off, 8), tl.multiple_of(g_off, 8), tl.multiple_of(m_off, 8)
            v_off, c_off = tl.multiple_of(v_off, 8), tl.multiple_of(c_off, 8)
        start = (pid - tl.load(row + 7)) * BLOCK
        n = tl.load(row + 6)
        step = tl.load(step_ptr + s_off)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr)
        p_ptr, g_ptr, m_ptr = p_ptr + p_off + start, g_ptr + g_off + start, m_ptr + m_off + start
        v_ptr, copy_ptr = v_ptr + v_off + start, copy_ptr + c_off + start
        # only a tensor's last block is masked: a mask whose bound is loaded from memory would keep Triton
        # from vectorising any access (2.7x slower on an H100)
        if start + BLOCK <= n:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, step, scale, lr, beta1, beta2, log2_beta1, log2_beta2,
                         eps, decay, n - start, HAS_COPY, BF16_MOMENTS, False, BLOCK)
        else:
            _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, step, scale, lr, beta1, beta2, log2_beta1, log2_beta2,
                         eps, decay, n - start, HAS_COPY, BF16_MOMENTS, True, BLOCK)

    @triton.jit
    def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, step, scale, lr, beta1, beta2, log2_beta1, log2_beta2,
                     eps, decay, n, HAS_COPY: tl.constexpr, BF16_MOMENTS: tl.constexpr, MASKED: tl.constexpr,
                     BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = None
        if MASKED:
            mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) / scale
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)  # the update is fp32 whatever the moments' storage
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)  # 1 - beta1^step
        bias_correction2 = 1.0 - tl.exp2(step * log2_beta2)
        p = p * decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / tl.sqrt(bias_correction2) + eps
        p = p - (lr / bias_correction1) * m / denom
        tl.store(p_ptr + offs, p, mask=mask)
        if HAS_COPY:
            tl.store(copy_ptr + offs, _round_bf16(p), mask=mask)
        if BF16_MOMENTS:
            tl.store(m_ptr + offs, _round_bf16(m), mask=mask)
            tl.store(v_ptr + offs, _round_bf16(v), mask=mask)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)

    @triton.jit
    def _sum_squares_kernel(g_ptr, table_ptr, block_tensor_ptr, out_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        # out[i] = the sum of squares of program i's BLOCK gradient elements (tables as for _adamw_kernel, but
        # with one array: the columns are offset, numel, first block)
        pid = tl.program_id(0)
        row = table_ptr + tl.load(block_tensor_ptr + pid).to(tl.int64) * 3
        g_off = tl.load(row)
        if ALIGNED:
            g_off = tl.multiple_of(g_off, 8)
        start = (pid - tl.load(row + 2)) * BLOCK
        n = tl.load(row + 1)
        offs = tl.arange(0, BLOCK)
        g_ptr = g_ptr + g_off + start
        if start + BLOCK <= n:  # unmasked, so vectorised (see _adamw_kernel)
            g = tl.load(g_ptr + offs).to(tl.float32)
        else:
            g = tl.load(g_ptr + offs, mask=offs < n - start, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(g * g))


def adamw_step(cache: dict, slot: tuple, arrays: list[list[torch.Tensor]], scale: torch.Tensor | None, lr: float,
               betas: tuple[float, float], eps: float, weight_decay: float, has_copy: bool) -> None:
    """One AdamW step, in place, of every tensor in `arrays` = [values (fp32), gradients, exp_avg, exp_avg_sq,
    bf16 copies to write (has_copy; else the values again), step counts], tensor i of each list together.
    The step counts must already hold this step's count; `scale` divides the gradients (None: 1). The tables
    are cached in `cache[slot]` (see _tensor_table)."""
    table, block_tensor, n_blocks, aligned = _tensor_table(cache, slot, arrays)
    if n_blocks == 0:  # empty tensors only
        return
    _launch_step([a[0] for a in arrays], arrays[0][0] if scale is None else scale, table, block_tensor, n_blocks,
                 lr, betas, eps, weight_decay, has_scale=scale is not None, has_copy=has_copy,
                 bf16_moments=arrays[2][0].dtype == torch.bfloat16, aligned=aligned)


def _launch_step(firsts, scale, table, block_tensor, n_blocks: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, has_scale: bool, has_copy: bool, bf16_moments: bool, aligned: bool,
                 warmup: bool = False):
    beta1, beta2 = betas
    return runtime.launch(
        _adamw_kernel, (n_blocks,), *firsts, scale, table, block_tensor, lr, beta1, beta2,
        math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf, eps,
        1.0 - lr * weight_decay, HAS_SCALE=has_scale, HAS_COPY=has_copy, BF16_MOMENTS=bf16_moments, ALIGNED=aligned,
        BLOCK=BLOCK, num_warps=8, warmup=warmup)


def sum_squares(cache: dict, slot: tuple, grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The sum of squares of these gradients (one device and dtype, each `reads`) in fp32, by one launch;
    None when they hold no element."""
    table, block_tensor, n_blocks, aligned = _tensor_table(cache, slot, [grads])
    if n_blocks == 0:
        return None
    partial = torch.empty(n_blocks, dtype=torch.float32, device=grads[0].device)
    _launch_sum_squares(grads[0], table, block_tensor, partial, n_blocks, aligned)
    return partial.sum()


def _launch_sum_squares(g, table, block_tensor, partial, n_blocks: int, aligned: bool, warmup: bool = False):
    return runtime.launch(_sum_squares_kernel, (n_blocks,), g, table, block_tensor, partial, ALIGNED=aligned,
                          BLOCK=BLOCK, num_warps=8, warmup=warmup)


def warm_up(grad_dtypes: dict[torch.dtype, bool], moments_dtype: torch.dtype, has_scale: bool) -> dict:
    """The compile_ahead jobs (kernels/runtime.py) of an optimizer's step and gradient norm: `grad_dtypes` maps
    each kind of tensor it updates, by gradient dtype, to whether it has an fp32 master (a bf16 copy to write);
    `has_scale`: the step divides by `grad_scale` (clipping folded into the step). Arrays aligned on 32 bytes,
    as the caching allocator places them."""
    if triton is None:
        return {}
    f32, i64, moments = torch.float32, torch.int64, moments_dtype
    jobs = {}
    for grad, has_copy in grad_dtypes.items():
        firsts = (f32, grad, moments, moments, torch.bfloat16 if has_copy else f32, f32)
        name = (f"adamw_step grads {str(grad).removeprefix('torch.')} master {has_copy} moments "
                f"{str(moments).removeprefix('torch.')} scale {has_scale}")
        jobs[name] = (_adamw_kernel, lambda firsts=firsts, has_copy=has_copy: _launch_step(
            firsts, f32, i64, torch.int32, 1, 1e-3, (0.9, 0.95), 1e-8, 0.1, has_scale=has_scale, has_copy=has_copy,
            bf16_moments=moments == torch.bfloat16, aligned=True, warmup=True))
        jobs[f"sum_squares {str(grad).removeprefix('torch.')}"] = (_sum_squares_kernel, lambda grad=grad: (
            _launch_sum_squares(grad, i64, torch.int32, f32, 1, True, warmup=True)))
    return jobs


def _tensor_table(cache: dict, slot: tuple, arrays: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """A kernel's per-tensor table and block -> tensor map for these arrays (for the AdamW step: value,
    gradient, moments, copy, step; one list each, tensor i of each list belonging together).

    A table row is the tensor's offsets in elements from the first tensor of each list, its numel and its
    first block. Both are cached in `cache[slot]`: they change only when a tensor moves (new gradients each
    step are usually at the same addresses, and CUDA-graph outputs always are), so most steps build nothing
    and copy nothing to the GPU.
    """
    ptrs = tuple(t.data_ptr() for arr in arrays for t in arr)
    numels = tuple(t.numel() for t in arrays[0])
    key = (ptrs, numels)
    cached = cache.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    device = arrays[0][0].device
    blocks = [triton.cdiv(n, BLOCK) for n in numels]
    first = [0]
    for b in blocks[:-1]:
        first.append(first[-1] + b)
    rows = [[(arr[i].data_ptr() - arr[0].data_ptr()) // arr[0].element_size() for arr in arrays] + [n, first[i]]
            for i, n in enumerate(numels)]
    table = torch.tensor(rows, dtype=torch.int64)
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(blocks))
    if device.type != "cpu":  # asynchronous copies from pinned memory: no host sync
        table = table.pin_memory().to(device, non_blocking=True)
        block_tensor = block_tensor.pin_memory().to(device, non_blocking=True)
    aligned = all(p % 32 == 0 for p in ptrs)
    entry = (table, block_tensor, sum(blocks), aligned)
    cache[slot] = (key, entry)  # the newest only: a tensor that moved will not move back
    return entry
