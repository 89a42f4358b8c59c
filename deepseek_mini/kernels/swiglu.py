"""The routed experts' gated SwiGLU backward for CUDA (Triton): one pass over the [T*K, 2I] activations.

Forward (GroupedExperts): a = silu(g) * u * w, with h = [g | u] the gate/up projection of a row and w its
gate value. Its backward needs, per row,

    grad_g = grad_a * w * u * silu'(g),   grad_u = grad_a * w * silu(g),   grad_w = <grad_a, silu(g) * u>

The first two are elementwise over the row's 2I values, the last a dot over its I values. Inductor emits
them as two kernels (a pointwise one over 2I and a reduction over I), and both read h: 2 x 151 MB per layer
at the `small` shape. Here one program owns a block of whole rows, reads h and grad_a once, and writes
grad_h and grad_w. Everything is computed in fp32 registers and rounded once.
"""

from __future__ import annotations

import torch

from deepseek_mini.kernels import runtime
from deepseek_mini.kernels.runtime import tl, triton

if triton is not None:

    @triton.jit(do_not_specialize=["n_rows"])  # n_rows only bounds masks: one variant for every number of rows
    def _swiglu_backward(h_ptr, grad_ptr, w_ptr, grad_h_ptr, grad_w_ptr, n_rows,
                         WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_I)
        mask = (rows < n_rows)[:, None] & (cols < WIDTH)[None, :]
        h_row = h_ptr + rows[:, None] * (2 * WIDTH) + cols[None, :]
        g = tl.load(h_row, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_row + WIDTH, mask=mask, other=0.0).to(tl.float32)
        grad_a = tl.load(grad_ptr + rows[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(grad_w_ptr + rows, tl.sum(grad_a * silu * u, axis=1), mask=rows < n_rows)
        grad_a = grad_a * w[:, None]
        grad_g = grad_a * u * sig * (1.0 + g * (1.0 - sig))
        out = grad_h_ptr + rows[:, None] * (2 * WIDTH) + cols[None, :]
        tl.store(out, grad_g.to(grad_h_ptr.dtype.element_ty), mask=mask)
        tl.store(out + WIDTH, (grad_a * silu).to(grad_h_ptr.dtype.element_ty), mask=mask)


def available(h: torch.Tensor) -> bool:
    """The kernel serves the mixed-precision path: 16-bit activations, on CUDA (or under the interpreter)."""
    return runtime.runs_on(h) and h.dtype in (torch.bfloat16, torch.float16)


def _swiglu_backward_op(grad_a: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, width = grad_a.shape
    h, grad_a, w = h.contiguous(), grad_a.contiguous(), w.contiguous()
    grad_h = torch.empty_like(h)
    grad_w = torch.empty(n, device=h.device, dtype=torch.float32)
    if n == 0:  # no rows, no programs (a grid of 0 is not a valid launch)
        return grad_h, grad_w.to(w.dtype)
    _launch(h, grad_a, w, grad_h, grad_w, n, width)
    return grad_h, grad_w.to(w.dtype)


def _launch(h, grad_a, w, grad_h, grad_w, n: int, width: int, warmup: bool = False):
    BLOCK_I = triton.next_power_of_2(width)
    BLOCK_N = max(1, 4096 // BLOCK_I)  # ~4K values of each operand per program
    return runtime.launch(_swiglu_backward, (triton.cdiv(n, BLOCK_N),), h, grad_a, w, grad_h, grad_w, n,
                          WIDTH=width, BLOCK_N=BLOCK_N, BLOCK_I=BLOCK_I, num_warps=8, warmup=warmup)


def warm_up(width: int, dtype: torch.dtype, gate_dtype: torch.dtype) -> dict:
    """The compile_ahead job (kernels/runtime.py) for rows of `width` (I) in `dtype` (the 16-bit h and grad_a)
    with gate values in `gate_dtype`."""
    if triton is None:
        return {}
    name = f"swiglu_backward I={width} {str(dtype).removeprefix('torch.')} gates {str(gate_dtype).removeprefix('torch.')}"
    return {name: (_swiglu_backward, lambda: _launch(dtype, dtype, gate_dtype, dtype, torch.float32, 1024, width,
                                                     warmup=True))}


def swiglu_backward(grad_a: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_a [N, I], h = [g | u] [N, 2I], w [N] -> (grad_h [N, 2I] in h's dtype, grad_w [N] in w's dtype)."""
    return torch.ops.deepseek_mini.swiglu_backward(grad_a, h, w)


if triton is not None:
    # an opaque custom op: torch.compile keeps it whole inside the compiled backward graph
    torch.library.custom_op("deepseek_mini::swiglu_backward", _swiglu_backward_op, mutates_args=())

    @torch.library.register_fake("deepseek_mini::swiglu_backward")
    def _swiglu_backward_fake(grad_a, h, w):
        return torch.empty_like(h, memory_format=torch.contiguous_format), w.new_empty(w.shape)
