"""Which AdamW a run uses (`optim.fused`), how its moments are stored (`optim.moments_dtype`), and which
parameters it decays.

The choice depends on the device: the Triton step (optim/adamw.py) on CUDA with Triton installed, torch's
fused kernel on CUDA without it, torch's plain step on CPU. bf16 moments only exist in the Triton step.
"""

from __future__ import annotations

import torch

from deepseek_mini.optim import adamw


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (>=2-D: linear and embedding weights, expert stacks), not on vectors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kind(fused: bool | str, on_cuda: bool) -> str:
    """optim.fused -> "triton" (adamw.TritonAdamW), "fused" (torch's fused kernel) or "plain".

    auto = the fastest step the device has: Triton on CUDA (torch's fused kernel without Triton), plain on CPU.
    """
    if fused == "auto":
        return ("triton" if adamw.available() else "fused") if on_cuda else "plain"
    if fused == "triton" or fused is True or fused is False:
        return {"triton": "triton", True: "fused", False: "plain"}[fused]
    raise ValueError(f"optim.fused={fused!r}: use auto, true (torch's fused kernel), triton or false")


def moments_dtype(setting: str, kind: str, betas) -> torch.dtype:
    """optim.moments_dtype -> the storage of AdamW's two moments (the update itself is always fp32).

    auto = bfloat16 where it is safe (DeepSeek-V3's optimizer states): the Triton step, with betas of at most
    adamw.MAX_BF16_BETA; float32 elsewhere. bfloat16 = the same, but an error says what is missing.
    """
    if setting not in ("auto", *adamw.MOMENTS_DTYPES):
        raise ValueError(f"optim.moments_dtype={setting!r}: use auto, float32 or bfloat16")
    if setting == "float32" or setting == "auto" and (kind != "triton" or max(betas) > adamw.MAX_BF16_BETA):
        return torch.float32
    if kind != "triton":
        raise ValueError(f"optim.moments_dtype=bfloat16 needs the Triton AdamW (optim.fused=auto or triton on a "
                         f"CUDA device, with triton installed); this run uses the {kind} one")
    adamw.check_moments(torch.bfloat16, [betas])
    return torch.bfloat16


def build_adamw(params, fused: bool | str, on_cuda: bool, moments: str = "float32", **kwargs) -> torch.optim.AdamW:
    """The AdamW that `optim.fused` names (adamw_kind), its moments stored as `optim.moments_dtype` says;
    kwargs are AdamW's (lr, betas, eps, weight_decay)."""
    kind = adamw_kind(fused, on_cuda)
    dtype = moments_dtype(moments, kind, kwargs.get("betas", (0.9, 0.999)))
    if kind == "triton":
        return adamw.TritonAdamW(params, **kwargs, moments_dtype=dtype)
    return torch.optim.AdamW(params, **kwargs, fused=(kind == "fused") or None)
