"""Loading a trained model back: from a Lightning checkpoint of ours, or from a Hugging Face directory.

A deepseek-mini checkpoint directory is self-describing:

    <run>/checkpoints/last.ckpt, best-*.ckpt   Lightning checkpoints; state_dict keys "model.<param>",
                                               hyper_parameters["model_config"] a plain dict
    <run>/checkpoints/model_config.json        the resolved ModelConfig
    <run>/checkpoints/tokenizer.json           the tokenizer the model was trained with
    <run>/checkpoints/data.json                the data it was trained on (eval's default data)
    <run>/checkpoints/config.yaml              the run's resolved config

so eval, generation and export rebuild exactly the trained model, never one from default configs.

Every entry point that reads a checkpoint (train's resume, eval.py, scripts/generate.py, export_hf.py,
kv_cache_report.py, deepseek_mini.from_pretrained) goes through a check first: `check_checkpoint_file` here
for our .ckpt files (a zip archive whose members' CRCs are verified, so one flipped byte is refused), and
interop/hf.py's `check_safetensors_file` for Hugging Face weights (an HFImportError there; `load_hf` here
turns it into a CheckpointError). A refusal is one line that names the file and the cause.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2

DATA_RECORD = "data.json"  # beside the checkpoints: what the model was trained on


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

    path = tokenizer_file(path)
    return Tokenizer.from_file(str(path)) if path is not None else None


def tokenizer_file(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    return next((c for c in (folder / "tokenizer.json", folder.parent / "tokenizer.json") if c.is_file()), None)


def read_data_record(path: Path) -> dict | None:
    """checkpoints/data.json beside a checkpoint (what CheckpointDirDescriber recorded), or None."""
    folder = path if path.is_dir() else path.parent
    record = folder / DATA_RECORD
    if not record.is_file():
        return None
    try:
        return json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {record}: {type(e).__name__}: {_first_line(e)}") from None


# ---------------------------------------------------------------------- verification
def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


SHARDED_META = "meta.pt"  # the non-tensor state of a sharded FSDP checkpoint directory (Lightning's name)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint directory written by Lightning's FSDPStrategy(state_dict_type="sharded"): meta.pt plus one
    torch.distributed.checkpoint shard file per rank and their `.metadata` index."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META).is_file()


def consolidate_command(path: Path) -> str:
    """The command that turns a sharded checkpoint directory into one ordinary .ckpt (`<dir>.consolidated`)."""
    return f"python -m lightning.pytorch.utilities.consolidate_checkpoint {path}"


def check_sharded_checkpoint(path: str | os.PathLike) -> Path:
    """A complete sharded FSDP checkpoint directory, or CheckpointError naming it (nothing is unpickled but the
    shard index): meta.pt is a sound torch zip, `.metadata` reads, and every shard file it names is there and
    at least as long as the byte ranges it records (a shard of a killed save is shorter or missing)."""
    path = Path(path).expanduser()
    if not is_sharded_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} is not a sharded FSDP checkpoint directory (no {SHARDED_META})")
    check_checkpoint_file(path / SHARDED_META)
    why = f"cannot read sharded checkpoint {path}"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # a missing or damaged .metadata
        raise CheckpointError(f"{why}: its .metadata index: {type(e).__name__}: {_first_line(e)}") from None
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, size in sorted(need.items()):
        shard = path / name
        if not shard.is_file():
            raise CheckpointError(f"{why}: shard {name} is missing")
        if shard.stat().st_size < size:
            raise CheckpointError(f"{why}: shard {name} is truncated ({shard.stat().st_size:,} of {size:,} bytes)")
    return path


def _directory_hint(path: Path) -> str:
    if is_sharded_checkpoint(path):
        return (f"it is a sharded FSDP checkpoint: consolidate it first with `{consolidate_command(path)}` and give "
                f"{path}.consolidated")
    for candidate in (path / "last.ckpt", path / "checkpoints" / "last.ckpt"):
        if candidate.is_file():
            return f"give the file, e.g. {candidate}"
        if is_sharded_checkpoint(candidate):
            return _directory_hint(candidate)
    return "give a .ckpt file (or a Hugging Face directory with config.json)"


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """A complete, uncorrupted torch zip checkpoint, or CheckpointError naming the file (nothing is unpickled).

    torch.save writes a zip archive; its central directory is written last (a truncated file has none) and
    every member carries a CRC-32, so testing the archive catches truncation and bit rot alike.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file: {_directory_hint(path)}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    why = "cannot read checkpoint"
    try:
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{why} {path}: empty file (0 bytes)")
        with open(path, "rb") as f:
            magic = f.read(4)
        if not zipfile.is_zipfile(path):
            if magic == b"PK\x03\x04":
                raise CheckpointError(f"{why} {path}: truncated ({size:,} bytes, the end of the zip archive "
                                      "is missing; was the save interrupted or the disk full?)")
            raise CheckpointError(f"{why} {path}: not a PyTorch checkpoint (torch.save writes a zip archive, "
                                  "this file is not one)")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
                raise CheckpointError(f"{why} {path}: not a PyTorch checkpoint (a zip archive without data.pkl)")
            bad = zf.testzip()  # CRC of every member
        if bad is not None:
            raise CheckpointError(f"{why} {path}: corrupt member {bad} (its CRC does not match: the file changed "
                                  "after it was written)")
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile (damaged directory), OSError (unreadable), ...
        raise CheckpointError(f"{why} {path}: {type(e).__name__}: {_first_line(e)}") from None
    return path


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """The checked checkpoint as a dict (weights_only: our checkpoints hold tensors and plain containers)."""
    path = check_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError):
            cause = ("it holds objects other than tensors and plain containers (not a deepseek-mini checkpoint; "
                     "weights_only loading refuses it)")
        else:
            cause = f"{type(e).__name__}: {_first_line(e)}"
        raise CheckpointError(f"cannot read checkpoint {path}: {cause}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"cannot read checkpoint {path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def model_from_state(config: dict | ModelConfig, state_dict: dict[str, torch.Tensor], prefix: str = "model.") -> DeepSeekV2:
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    model = DeepSeekV2(cfg)
    state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match its model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_hf(path: Path, dtype: torch.dtype | None = None) -> DeepSeekV2:
    """A Hugging Face DeepseekV2 directory through deepseek_mini.interop.hf (which checks each safetensors file);
    its refusals become CheckpointErrors naming the directory."""
    from deepseek_mini.interop.hf import HFImportError, load_hf_directory  # noqa: PLC0415  (optional dependency path)

    try:
        return load_hf_directory(path, dtype=dtype)
    except HFImportError as e:
        raise CheckpointError(f"cannot load Hugging Face directory {path}: {e}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """A deepseek-mini Lightning .ckpt, or a Hugging Face DeepseekV2 directory (config.json + safetensors)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        model = load_hf(path)
        return LoadedModel(model.to(map_location), model.config, find_tokenizer(path), path)
    ckpt = read_lightning_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    config = hparams.get("model_config")
    if config is None:
        side = path.parent / "model_config.json"
        if not side.is_file():
            raise CheckpointError(f"{path} has no model_config in its hyper_parameters and no {side.name} beside it")
        config = json.loads(side.read_text())
    model = model_from_state(config, ckpt.pop("state_dict")).to(map_location)
    model.eval()
    return LoadedModel(model, model.config, find_tokenizer(path), path, ckpt)
