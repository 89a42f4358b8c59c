"""AdamW with a Triton step on CUDA: torch.optim.AdamW's update, state and checkpoints, 1.8 ms less per step.

On the `small` MoE the optimizer step is the largest memory-bound kernel of a training step: 0.7B fp32
master weights, each read and written with its gradient and two moments, 19.5 GB of traffic. torch's
fused AdamW walks the tensors in 64K-element chunks through a multi-tensor launcher and reaches about
2.3 TB/s on an H100 (8.5 ms per training step); a plain elementwise Triton kernel over each whole tensor
reaches about 2.8 TB/s (6.9 ms). Nothing else changes:

* the update is torch's fused AdamW (decoupled weight decay, bias corrections from the step count),
  including `grad_scale`, which module.clip_in_fused_step uses to fold gradient clipping into the step;
* the state is torch's (`step` as a float32 tensor on the parameter's device, `exp_avg`, `exp_avg_sq`),
  so checkpoints load into torch.optim.AdamW and back, and LR schedulers work unchanged;
* the step count stays on the device and the bias corrections are computed in the kernel: no host sync.

bf16 moments (`moments_dtype=torch.bfloat16`, DeepSeek-V3's "low-precision optimizer states"): exp_avg and
exp_avg_sq are stored in bf16 and updated in fp32 inside the kernel, which rounds them to nearest once per step.
The optimizer's traffic drops from 28 to 20 bytes per parameter. It needs betas of at most 0.99 (check_moments).
Tensors that go through torch's step keep fp32 moments. Checkpoints load either way: torch's AdamW casts
bf16 moments to the parameter's dtype, and this optimizer converts fp32 ones at its next step.

Anything the kernel does not cover (CPU tensors, non-fp32 parameters, amsgrad, maximize, sparse or
non-contiguous tensors, tensors under MIN_NUMEL elements, or no Triton) goes through torch's own fused step.

fp32 masters for bf16 parameters (`keep_fp32_masters`, Megatron's "main params"): the model may hold a
parameter in bf16 while the optimizer keeps its fp32 value. The kernel then reads the fp32 master and the
bf16 gradient and writes the master, the moments and the bf16 copy in the same pass. The update is the
fp32 one; only the copy the forward pass reads is rounded, which autocast would do anyway. On the `small`
MoE this is how the 0.62B routed-expert weights are kept: it removes the fp32 -> bf16 weight cast of every
forward and the bf16 -> fp32 gradient cast of every backward (2.5 ms per step) at the same optimizer
traffic, and the gradients take half the memory.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have no Triton: torch's step is used
    triton = None

BLOCK = 2048  # elements per program; 1024-4096 measured within 3% of each other on an H100
# TRITON_INTERPRET=1 runs the kernel on CPU tensors (numpy), which is how the tests check it without a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Smaller tensors (norm weights, routers, small projections: 153 of the `small` MoE's 180, 6% of its elements)
# go through torch's fused step, which updates them all in a few multi-tensor launches; one Triton launch
# each costs more host time than GPU time and left the GPU idle (measured: 0.6% faster steps, docs/benchmarks.md).
# Under the interpreter (the tests) the kernel takes every size.
MIN_NUMEL = 0 if INTERPRET else 1 << 20


if triton is not None:
    @triton.jit
    def _round_bf16(x):
        """fp32 -> bf16, round to nearest even in integer arithmetic: the same bits on the GPU and the interpreter."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, scale_ptr, copy_ptr, n, lr, beta1, beta2, log2_beta1,
                      log2_beta2, eps, decay, HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr,
                      BF16_MOMENTS: tl.constexpr, BLOCK: tl.constexpr):
        # p_ptr: the fp32 values (the parameter itself, or its master); copy_ptr: the bf16 parameter of a master
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)  # the update is fp32 whatever the moments' storage
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        if HAS_SCALE:
            g = g / tl.load(scale_ptr)
        step = tl.load(step_ptr)
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


MOMENTS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# A bf16 moment rounded to nearest moves only by more than half its spacing, 0.2-0.4% of its value; with a beta
# of 0.999 the decay term (0.1%) would round away and the moment stop decaying. 0.99 moves it by 1% a step.
MAX_BF16_BETA = 0.99


def check_moments(dtype: torch.dtype, betas_per_group) -> None:
    """Bad moments_dtype / betas combinations fail at construction, naming the field and the rule."""
    if dtype not in MOMENTS_DTYPES.values():
        raise ValueError(f"optim.moments_dtype={dtype}: use float32 or bfloat16")
    if dtype == torch.bfloat16:
        for betas in betas_per_group:
            if max(betas) > MAX_BF16_BETA:
                raise ValueError(f"optim.moments_dtype=bfloat16 needs optim.betas of at most {MAX_BF16_BETA}, got "
                                 f"{list(betas)}: a bf16 moment rounded to nearest cannot move by less than about "
                                 "0.4% of itself per step, so with beta 0.999 it would stop decaying (use float32)")


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (fused flavour: device step counts, `grad_scale`) whose CUDA fp32 step is a Triton kernel."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 moments_dtype: torch.dtype = torch.float32):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.grad_scale: torch.Tensor | None = None  # set by clip_in_fused_step for one step
        self.masters: dict[torch.Tensor, torch.Tensor] = {}  # low-precision parameter -> its fp32 value
        check_moments(moments_dtype, [g["betas"] for g in self.param_groups])
        self.moments_dtype = moments_dtype

    @staticmethod
    def _kernel_takes(p: torch.Tensor) -> bool:
        g = p.grad
        return (triton is not None and (p.is_cuda or INTERPRET) and p.dtype == torch.float32 and p.is_contiguous()
                and p.numel() >= MIN_NUMEL and not g.is_sparse and g.is_contiguous() and g.dtype in (torch.float32, torch.bfloat16))

    @torch.no_grad()
    def keep_fp32_masters(self, params) -> None:
        """Store these fp32 parameters in bf16 on the model and their fp32 values here (see the module doc).

        Call it before the first step, on parameters whose fp32 value is still exact. The moments stay fp32.
        `release_masters` puts the fp32 values back into the parameters.
        """
        if triton is None:
            raise RuntimeError("fp32 master weights need the Triton step (pip install triton)")
        for p in params:
            if p in self.masters:
                continue
            if p.dtype != torch.float32 or not p.is_contiguous() or not (p.is_cuda or INTERPRET):
                raise ValueError(f"an fp32 master needs a contiguous fp32 CUDA parameter, got {p.dtype} "
                                 f"{tuple(p.shape)} on {p.device}")
            if self.state.get(p):
                raise ValueError("keep_fp32_masters must come before the first step of these parameters")
            self.masters[p] = p.detach().clone()
            p.data = p.data.to(torch.bfloat16)

    @torch.no_grad()
    def release_masters(self) -> None:
        """Back to fp32 parameters holding the master values; the optimizer state is unchanged."""
        for p, master in self.masters.items():
            p.data = master
        self.masters.clear()

    def load_state_dict(self, state_dict) -> None:
        # torch casts loaded moments to the parameter's dtype: let it see the fp32 masters, so they stay fp32
        low = {p: p.data for p in self.masters}
        for p, master in self.masters.items():
            p.data = master
        try:
            super().load_state_dict(state_dict)
        finally:
            for p, data in low.items():
                p.data = data

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        done, rest = [], False  # parameters the kernel updated; whether any gradient is left for torch's step
        for group in self.param_groups:
            simple = not (group["amsgrad"] or group["maximize"] or group.get("differentiable"))
            mine = []
            for p in group["params"]:
                if p.grad is not None:
                    if p in self.masters:  # only the kernel knows about masters
                        if not simple:
                            raise ValueError("fp32 masters support neither amsgrad nor maximize")
                        mine.append(p)
                    elif simple and self._kernel_takes(p):
                        mine.append(p)
                    else:
                        rest = True
                        state = self.state.get(p)
                        if state and state["exp_avg"].dtype != p.dtype:  # torch's step keeps moments in p's dtype
                            state["exp_avg"], state["exp_avg_sq"] = (state[k].to(p.dtype) for k in ("exp_avg", "exp_avg_sq"))
            if mine:
                self._triton_group(group, mine)
                done += mine
        if rest:  # torch's fused step for the others, with the gradients the kernel used hidden from it
            grads = [p.grad for p in done]
            for p in done:
                p.grad = None
            try:
                super().step()
            finally:
                for p, g in zip(done, grads):
                    p.grad = g
        return loss

    def _triton_group(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        steps = []
        for p in params:
            state = self.state[p]
            if not state:  # as torch's fused AdamW lays it out, the moments in moments_dtype
                fp32 = self.masters.get(p, p)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(fp32, dtype=self.moments_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(fp32, dtype=self.moments_dtype,
                                                       memory_format=torch.preserve_format)
            else:
                if state["step"].device != p.device:  # e.g. a checkpoint of the unfused optimizer (CPU steps)
                    state["step"] = state["step"].to(p.device, torch.float32)
                for key in ("exp_avg", "exp_avg_sq"):  # a checkpoint loaded with the other storage: convert once
                    if state[key].dtype != self.moments_dtype:
                        state[key] = state[key].to(self.moments_dtype)
            steps.append(state["step"])
        torch._foreach_add_(steps, 1.0)
        scale = self.grad_scale
        if scale is not None:
            scale = scale.to(device=params[0].device, dtype=torch.float32)
        for p in params:
            state = self.state[p]
            n = p.numel()
            master = self.masters.get(p)
            grad = p.grad if master is None else p.grad.contiguous()  # a master always takes this path
            _adamw_kernel[(triton.cdiv(n, BLOCK),)](
                p if master is None else master, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                p if scale is None else scale, p, n, lr, beta1, beta2,
                math.log2(beta1) if beta1 > 0 else -math.inf, math.log2(beta2) if beta2 > 0 else -math.inf, eps,
                1.0 - lr * wd, HAS_SCALE=scale is not None, HAS_COPY=master is not None,
                BF16_MOMENTS=state["exp_avg"].dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=8)
