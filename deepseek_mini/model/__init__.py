"""Plain-PyTorch DeepSeek-V2 (no Hydra, no Lightning): MLA, DeepSeekMoE, RoPE, the transformer."""

from deepseek_mini.model.transformer import DeepSeekV2, ModelOutput, sample

__all__ = ["DeepSeekV2", "ModelOutput", "sample"]
