"""Loading a trained model back: from a Lightning checkpoint of ours, or from a Hugging Face directory.

A deepseek-mini checkpoint directory is self-describing:

    <run>/checkpoints/last.ckpt, best-*.ckpt   Lightning checkpoints; state_dict keys "model.<param>",
                                               hyper_parameters["model_config"] a plain dict
    <run>/checkpoints/model_config.json        the resolved ModelConfig
    <run>/checkpoints/tokenizer.json           the tokenizer the model was trained with

so eval, generation and export rebuild exactly the trained model, never one from default configs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not ours; the message names the file."""


@dataclass
class LoadedModel:
    model: DeepSeekV2
    config: ModelConfig
    tokenizer: Any  # tokenizers.Tokenizer, or None if none was found beside the weights
    path: Path
    checkpoint: dict | None = None  # the raw Lightning checkpoint (without state_dict), if any


def find_tokenizer(path: Path):
    """tokenizer.json beside the checkpoint file (or inside a directory), if there is one."""
    from tokenizers import Tokenizer

    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "tokenizer.json", folder.parent / "tokenizer.json"):
        if candidate.is_file():
            return Tokenizer.from_file(str(candidate))
    return None


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # our checkpoints hold only tensors and plain Python containers, so weights_only loading works
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def model_from_state(config: dict | ModelConfig, state_dict: dict[str, torch.Tensor], prefix: str = "model.") -> DeepSeekV2:
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    model = DeepSeekV2(cfg)
    state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match its model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """A deepseek-mini Lightning .ckpt, or a Hugging Face DeepseekV2 directory (config.json + safetensors)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        from deepseek_mini.interop.hf import load_hf_directory  # noqa: PLC0415  (optional dependency path)

        model = load_hf_directory(path)
        return LoadedModel(model.to(map_location), model.config, find_tokenizer(path), path)
    ckpt = read_lightning_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    config = hparams.get("model_config")
    if config is None:
        side = path.parent / "model_config.json"
        if not side.is_file():
            raise CheckpointError(f"{path} has no model_config in its hyper_parameters and no {side.name} beside it")
        config = json.loads(side.read_text())
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} has no state_dict: not a Lightning checkpoint")
    model = model_from_state(config, ckpt.pop("state_dict")).to(map_location)
    model.eval()
    return LoadedModel(model, model.config, find_tokenizer(path), path, ckpt)
