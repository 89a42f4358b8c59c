"""AdamW with a Triton step on CUDA: torch.optim.AdamW's update, state and checkpoints, in one pass per step.

The kernels are in kernels/adamw.py; this file is the optimizer around them.

On the `small` MoE the optimizer step is the largest memory-bound kernel of a training step: 0.7B fp32
master weights, each read and written with its gradient and two moments. torch's fused AdamW walks the
tensors in 64K-element chunks through a multi-tensor launcher and reaches about 2.3 TB/s on an H100; a
plain elementwise Triton kernel reaches about 2.8 TB/s. Here one launch updates every tensor of a kind
(a table says where each tensor's arrays lie and which tensor each program works on), so the 180 tensors of
`small`, from 768-element norm weights to 38M-element expert stacks, cost three launches. Nothing else changes:

* the update is torch's fused AdamW (decoupled weight decay, bias corrections from the step count),
  including `grad_scale`, which optim.clip.clip_in_fused_step uses to fold gradient clipping into the step;
* the state is torch's (`step` as a float32 tensor on the parameter's device, `exp_avg`, `exp_avg_sq`),
  so checkpoints load into torch.optim.AdamW and back, and LR schedulers work unchanged;
* the step count stays on the device and the bias corrections are computed in the kernel: no host sync.

bf16 moments (`moments_dtype=torch.bfloat16`, DeepSeek-V3's "low-precision optimizer states"): exp_avg and
exp_avg_sq are stored in bf16 and updated in fp32 inside the kernel, which rounds them to nearest once per step.
The optimizer's traffic drops from 28 to 20 bytes per parameter. It needs betas of at most 0.99 (check_moments).
Tensors that go through torch's step keep fp32 moments. Checkpoints load either way: torch's AdamW casts
bf16 moments to the parameter's dtype, and this optimizer converts fp32 ones at its next step.

Anything the kernel does not cover (CPU tensors, non-fp32 parameters, amsgrad, maximize, sparse or
non-contiguous tensors, or no Triton) goes through torch's own fused step.

fp32 masters for bf16 parameters (`keep_fp32_masters`, Megatron's "main params"): the model may hold a
parameter in bf16 while the optimizer keeps its fp32 value. The kernel then reads the fp32 master and the
bf16 gradient and writes the master, the moments and the bf16 copy in the same pass. The update is the
fp32 one; only the copy the forward pass reads is rounded, which autocast would do anyway, and the
gradient is the bf16 one autocast's GEMMs produce. LitDeepSeek keeps every matrix of the model but the
embedding this way during a bf16-mixed fit (optim.precision.bf16_weights_on): it removes the fp32 -> bf16 weight
casts of every forward and the bf16 -> fp32 gradient casts of every backward, at the same optimizer
traffic, and the gradients take half the memory.
"""

from __future__ import annotations

import torch

from deepseek_mini.kernels import adamw as kernel
from deepseek_mini.kernels import runtime

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


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients, accumulated and returned in fp32 whatever their dtypes (bf16 weight grads)."""
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g)
    norms = [n for gs in by_key.values() for n in torch._foreach_norm(gs, 2.0, dtype=torch.float32)]
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def available() -> bool:
    return runtime.triton is not None and torch.cuda.is_available()


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (fused flavour: device step counts, `grad_scale`) whose CUDA fp32 step is a Triton kernel."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 moments_dtype: torch.dtype = torch.float32):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.grad_scale: torch.Tensor | None = None  # set by clip_in_fused_step for one step
        self.masters: dict[torch.Tensor, torch.Tensor] = {}  # low-precision parameter -> its fp32 value
        check_moments(moments_dtype, [g["betas"] for g in self.param_groups])
        self.moments_dtype = moments_dtype
        self._tables: dict[tuple, tuple] = {}  # the kernel's tensor tables, per group and kind (see kernels/adamw.py, _tensor_table)

    @staticmethod
    def _kernel_reads(g: torch.Tensor) -> bool:
        """A gradient the kernels read as it is: contiguous fp32 or bf16, on CUDA (or under the interpreter)."""
        return kernel.reads(g)

    @staticmethod
    def _kernel_takes(p: torch.Tensor) -> bool:
        return p.dtype == torch.float32 and p.is_contiguous() and TritonAdamW._kernel_reads(p.grad)

    @torch.no_grad()
    def keep_fp32_masters(self, params) -> None:
        """Store these fp32 parameters in bf16 on the model and their fp32 values here (see the module doc).

        Call it before the first step, on parameters whose fp32 value is still exact. The moments are stored as
        `moments_dtype` says. `release_masters` puts the fp32 values back into the parameters.
        """
        if runtime.triton is None:
            raise RuntimeError("fp32 master weights need the Triton step (pip install triton)")
        for p in params:
            if p in self.masters:
                continue
            if p.dtype != torch.float32 or not p.is_contiguous() or not runtime.runs_on(p):
                raise ValueError(f"an fp32 master needs a contiguous fp32 CUDA parameter, got {p.dtype} "
                                 f"{tuple(p.shape)} on {p.device}")
            if self.state.get(p):
                raise ValueError("keep_fp32_masters must come before the first step of these parameters")
            self.masters[p] = p.detach().clone()
            p.data = p.data.to(torch.bfloat16)

    @torch.no_grad()
    def release_masters(self) -> None:
        """Back to fp32 parameters holding the master values, on the device each parameter is on now (Lightning's
        teardown moves the module to the CPU before on_fit_end releases them: a master put back on the GPU left the
        model split over two devices); the optimizer state is unchanged."""
        for p, master in self.masters.items():
            p.data = master.to(p.device)
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

    def compile_ahead(self, scaled: bool) -> None:
        """Start compiling the kernels of this optimizer's steps now, in background threads
        (kernels/runtime.compile_ahead), rather than at the first step, after the first backward: one variant of
        the step per kind of tensor (fp32 parameters; bf16 ones with fp32 masters) and of the gradient norm per
        gradient dtype. `scaled`: the steps will divide the gradients by `grad_scale` (clipping folded into the
        step, optim/clip.py, or fp16's GradScaler). Call it once the masters are kept."""
        kinds: dict[torch.dtype, bool] = {}  # gradient dtype (the parameter's) -> has an fp32 master
        device = None
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.masters or (p.dtype == torch.float32 and p.is_contiguous() and runtime.runs_on(p)):
                    kinds[p.dtype] = p in self.masters
                    device = p.device
        if kinds:
            runtime.compile_ahead(kernel.warm_up(kinds, self.moments_dtype, scaled), device)

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
        # one launch per kind of tensor (the dtypes the kernel is compiled for): fp32 parameters, and bf16
        # parameters with fp32 masters (bf16 gradients, a bf16 copy to write)
        kinds: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            kinds.setdefault((p.device, p in self.masters, p.grad.dtype), []).append(p)
        for kind, ps in kinds.items():
            has_copy = kind[1]
            vals = [self.masters[p] for p in ps] if has_copy else ps
            grads = [p.grad.contiguous() for p in ps]  # autograd's are; a copy lives until the launch below
            states = [self.state[p] for p in ps]
            arrays = [vals, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                      ps if has_copy else vals, [s["step"] for s in states]]
            kernel.adamw_step(self._tables, (id(group), *kind), arrays, scale, lr, (beta1, beta2), eps, wd, has_copy)

    @torch.no_grad()
    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """total_norm(grads), the gradients the kernel could read summed by one Triton launch per dtype.

        torch's _foreach_norm reads the 0.7B gradients of `small` at about 2.1 TB/s in 30 launches; one launch
        over all tensors of a dtype reads at the kernel's bandwidth. Each program writes the sum of squares of
        its block, and one sum of those gives the norm.
        """
        kinds: dict[tuple, list[torch.Tensor]] = {}
        rest = []
        for g in grads:
            if self._kernel_reads(g):
                kinds.setdefault((g.device, g.dtype), []).append(g)
            else:
                rest.append(g)
        squares = [total_norm(rest).square()] if rest else []
        for kind, gs in kinds.items():
            sq = kernel.sum_squares(self._tables, ("norm", *kind), gs)
            if sq is not None:
                squares.append(sq)
        device = grads[0].device
        if not squares:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack([s.to(device) for s in squares]).sum().sqrt()
