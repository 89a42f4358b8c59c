"""Rotary position embedding in DeepSeek's convention, with optional YaRN frequency scaling.

DeepSeek rotates *adjacent* pairs of dimensions (2i, 2i+1), the GPT-J / complex-number form, not the
NeoX form that rotates the first half against the second. Using the same pairing as the released
weights means checkpoints move between this code and transformers without permuting any rows.

In MLA only the small decoupled part of q and k (qk_rope_head_dim wide) is rotated; the baselines
rotate their whole head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepseek_mini.config import yarn_mscale


def yarn_inv_freq(dim: int, base: float, scaling: dict) -> torch.Tensor:
    """YaRN: keep the fast (high-frequency) dims, interpolate the slow ones by 1/factor, ramp between."""
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings", 4096))
    beta_fast = float(scaling.get("beta_fast", 32))
    beta_slow = float(scaling.get("beta_slow", 1))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)
    ramp = ramp.clamp(0, 1)
    return (inv_freq / factor) * ramp + inv_freq * (1 - ramp)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables [max_positions, dim/2]; `forward` rotates x at the given positions."""

    def __init__(self, dim: int, max_positions: int, base: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        if scaling is not None:
            inv_freq = yarn_inv_freq(dim, base, scaling)
            # DeepSeek multiplies cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim); with the
            # released configs (mscale == mscale_all_dim) that ratio is 1. The attention-entropy factor lives
            # in the softmax scale instead (ModelConfig.softmax_scale).
            factor = float(scaling["factor"])
            mscale = (yarn_mscale(factor, float(scaling.get("mscale", 1) or 0))
                      / yarn_mscale(factor, float(scaling.get("mscale_all_dim", 0) or 0)))
        else:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            mscale = 1.0
        t = torch.arange(max_positions, dtype=torch.float64)
        angles = torch.outer(t, inv_freq)
        # fp32 tables; non-persistent so they never enter checkpoints and are rebuilt from the config.
        self.register_buffer("cos", (angles.cos() * mscale).float(), persistent=False)
        self.register_buffer("sin", (angles.sin() * mscale).float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, dim]; positions: [T], or [B, T] when rows sit at different positions (batched speculative
        decoding). Rotates pairs (2i, 2i+1) in >= fp32, returns x's dtype."""
        cos, sin = self.cos[positions], self.sin[positions]  # [T, dim/2] or [B, T, dim/2]
        cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if positions.dim() == 1 else (cos[:, :, None], sin[:, :, None])
        xf = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))  # fp64 stays fp64
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).to(x.dtype)
