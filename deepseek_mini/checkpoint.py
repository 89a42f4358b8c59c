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

from deepseek_mini.config import ConfigError, ModelConfig
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


def find_tokenizer(path: Path, recorded_sha: str | None = None):
    """tokenizer.json beside the checkpoint file (or inside a directory), if there is one. A file that does not
    parse is refused, and so is one whose sha256 is not `recorded_sha` (what the checkpoint's data module
    recorded): another run's tokenizer beside these weights would turn every token id into another word."""
    import hashlib

    from tokenizers import Tokenizer

    path = tokenizer_file(path)
    if path is None:
        return None
    try:
        data = path.read_bytes()
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # OSError, UnicodeDecodeError, the tokenizers library's own parse Exception
        raise CheckpointError(f"cannot read tokenizer {path}: {type(e).__name__}: {_first_line(e)}") from None
    if recorded_sha and hashlib.sha256(data).hexdigest() != recorded_sha:
        raise CheckpointError(f"tokenizer {path} is not the one the checkpoint was trained with (its sha256 differs "
                              f"from the recorded {recorded_sha[:12]}...); put the run's own tokenizer.json beside it")
    return tokenizer


def _fitting(tokenizer, config: ModelConfig, path: Path):
    """The tokenizer beside a checkpoint, refused when it has ids the model has no embedding for (generate.py
    ended in an IndexError traceback inside the embedding)."""
    if tokenizer is not None and tokenizer.get_vocab_size() > config.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer_file(path)} has {tokenizer.get_vocab_size()} tokens but the model "
                              f"beside it only {config.vocab_size}: not the tokenizer it was trained with")
    return tokenizer


def recorded_tokenizer_sha(ckpt: dict) -> str | None:
    """The sha256 of the tokenizer file the checkpoint's data module trained with, if it recorded one."""
    state = next((v for k, v in ckpt.items() if str(k).endswith("TextDataModule") and isinstance(v, dict)), {})
    sha = state.get("tokenizer_sha")
    return sha if isinstance(sha, str) and sha else None


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
        data = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {record}: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot read {record}: a {type(data).__name__}, not the mapping a run records")
    return data


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


def load_checkpoint_dict(path: str | os.PathLike, mmap: bool = False) -> dict:
    """torch.load of a checked checkpoint file (weights_only: our checkpoints hold tensors and plain containers),
    its refusals one line; mmap=True leaves the tensors' data on disk until it is read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError):
            cause = ("it holds objects other than tensors and plain containers (not a deepseek-mini checkpoint; "
                     "weights_only loading refuses it)")
        else:
            cause = f"{type(e).__name__}: {_first_line(e)}"
        raise CheckpointError(f"cannot read checkpoint {path}: {cause}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: not a Lightning checkpoint (a {type(ckpt).__name__}, "
                              "not a dict)")
    return ckpt


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """The checked checkpoint as a dict, with a state_dict of tensors."""
    path = check_checkpoint_file(path)
    ckpt = load_checkpoint_dict(path)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"cannot read checkpoint {path}: not a Lightning checkpoint (no state_dict of tensors)")
    return ckpt


def checkpoint_model_config(ckpt: dict, path: Path) -> ModelConfig | None:
    """The model config a checkpoint was trained with: its hyper_parameters' model_config, else model_config.json
    beside it, else None. A recorded config that is not a valid ModelConfig is refused, naming where it was."""
    hparams = ckpt.get("hyper_parameters")
    if hparams is not None and not isinstance(hparams, dict):
        raise CheckpointError(f"cannot read {path} hyper_parameters: a {type(hparams).__name__}, not a mapping")
    config, where = (hparams.get("model_config"), f"{path} hyper_parameters.model_config") \
        if hparams is not None else (None, "")
    if config is None:
        side = Path(path).parent / "model_config.json"
        if not side.is_file():
            return None
        try:
            config, where = json.loads(side.read_text()), str(side)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {side}: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"cannot read {where}: a {type(config).__name__}, not a mapping of ModelConfig fields")
    try:
        return ModelConfig.from_dict(config)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"cannot read {where}: {_first_line(e)}") from None


def verify_weights(config: ModelConfig, state_dict: dict, path: Path, prefix: str = "model.",
                   finite: bool = True) -> dict[str, torch.Tensor]:
    """The model's weights in a checkpoint's state_dict (`prefix` and torch.compile's `_orig_mod.` stripped),
    checked against the model `config` describes: the same names, each of the model's shape, floating point,
    and (finite=True) no nan or inf. load_state_dict would refuse a wrong shape only with a traceback, and cast an
    integer tensor or take a nan silently. The expected shapes come from the model built on the meta device:
    nothing is allocated."""
    with torch.device("meta"):
        expected = DeepSeekV2(config).state_dict()
    state = {k[len(prefix):].replace("_orig_mod.", ""): v for k, v in state_dict.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    why = f"checkpoint {path} does not match its model config"
    if missing or unexpected:
        raise CheckpointError(f"{why}: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{why}: {name} has shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(expected[name].shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{why}: {name} is {tensor.dtype}, not a floating-point weight")
        if finite and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {path}: {name} holds nan or inf values")
    return state


def load_hf(path: Path, dtype: torch.dtype | None = None) -> DeepSeekV2:
    """A Hugging Face DeepseekV2 directory through deepseek_mini.interop.hf (which checks each safetensors file);
    its refusals become CheckpointErrors naming the directory."""
    from deepseek_mini.interop.hf import HFImportError, load_hf_directory  # noqa: PLC0415  (optional dependency path)

    try:
        return load_hf_directory(path, dtype=dtype)
    except HFImportError as e:
        raise CheckpointError(f"cannot load Hugging Face directory {path}: {e}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """A deepseek-mini Lightning .ckpt, or a Hugging Face DeepseekV2 directory (config.json + safetensors): the file,
    its recorded model config, the weights against that config (verify_weights) and the tokenizer beside it
    (find_tokenizer, against the sha256 the run recorded) are all checked before the model is returned."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        model = load_hf(path)
        tokenizer = _fitting(find_tokenizer(path), model.config, path)
        return LoadedModel(model.to(map_location), model.config, tokenizer, path)
    ckpt = read_lightning_checkpoint(path)
    config = checkpoint_model_config(ckpt, path)
    if config is None:
        raise CheckpointError(f"{path} has no model_config in its hyper_parameters and no model_config.json beside it")
    state = verify_weights(config, ckpt.pop("state_dict"), path)
    tokenizer = _fitting(find_tokenizer(path, recorded_tokenizer_sha(ckpt)), config, path)
    model = DeepSeekV2(config)
    model.load_state_dict(state)
    model.to(map_location).eval()
    return LoadedModel(model, config, tokenizer, path, ckpt)
