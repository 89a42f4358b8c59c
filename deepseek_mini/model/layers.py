"""Small building blocks shared by attention, MoE and the transformer: RMSNorm, fused projections, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in (at least) fp32, cast back, then scaled (DeepSeek's / HF's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # upcast, never downcast: bf16 is normalised in fp32, an fp64 model (exactness tests) stays fp64
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def use_folded(folded: torch.Tensor | None) -> bool:
    """Read a weight folded for inference (DeepSeekV2.folded_weights)? Only when it exists and nothing is
    differentiated: it is a copy, so a gradient through it would never reach the parameters it was made from."""
    return folded is not None and not torch.is_grad_enabled()


def fused_linears(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x W_1^T, x W_2^T, ... for projections that read the same x, as one GEMM over the concatenated weights.

    One GEMM reads x once, narrow outputs (MLA's 384- and 288-wide down-projections in `small`) fill the GPU
    better together, and the backward is one dgrad and one wgrad GEMM instead of one pair per weight plus the
    add of their input gradients. A single token keeps separate GEMMs: concatenating would copy the weights for
    it. A batched decode step concatenates too, copy included: in the compiled decode step of `small` at batch 32
    (H200) every small GEMM cost ~3.5 us whatever its size, so separate GEMMs took longer (0.295 ms per step)
    than the concatenations and the fused GEMMs together (0.248 ms).
    """
    if x.shape[:-1].numel() > 1:
        return F.linear(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)
    return tuple(F.linear(x, w) for w in weights)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN, and the fused shared experts of an MoE layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        # [gate ; up] concatenated once for inference (fold(); DeepSeekV2.folded_weights), never saved
        self.register_buffer("gate_up_folded", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_folded(self.gate_up_folded):
            return self.down(*F.linear(x, self.gate_up_folded).chunk(2, dim=-1))
        return self.down(*fused_linears(x, self.gate_proj.weight, self.up_proj.weight))

    @torch.no_grad()
    def fold(self) -> bool:
        """Concatenate the gate and up weights once, not at every batched step (fused_linears). False when already
        folded."""
        if self.gate_up_folded is not None:
            return False
        self.gate_up_folded = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        return True

    def unfold(self) -> None:
        self.gate_up_folded = None

    def down(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The output from the gate and up projections (MoE computes those with its router's logits)."""
        return self.down_proj(F.silu(gate) * up)
