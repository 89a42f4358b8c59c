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
           "count_parameters", "flops_per_token", "from_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # deepseek_mini.from_pretrained is imported on first use: `import deepseek_mini.model` loads this file too,
    # and the model must not pull in the Hugging Face adapter that imports it
    if name == "from_pretrained":
        from deepseek_mini.interop.hf import from_pretrained

        return from_pretrained
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
