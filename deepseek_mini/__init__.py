"""deepseek-mini: a scaled-down DeepSeek-V2 (MLA + DeepSeekMoE) you train yourself."""

from deepseek_mini.config import (
    PRESETS,
    ConfigError,
    ModelConfig,
    ParameterCount,
    count_parameters,
    flops_per_token,
)
from deepseek_mini.model import DeepSeekV2, ModelOutput

__all__ = ["PRESETS", "ConfigError", "DeepSeekV2", "ModelConfig", "ModelOutput", "ParameterCount",
           "count_parameters", "flops_per_token"]
__version__ = "0.1.0"
