"""The sampling settings of eval.py and scripts/generate.py, checked by one set of rules, and the prompt.

Both entry points call `check_sampling(cfg)`, `check_seed(cfg)` and `parse_device(cfg.device)` before loading
anything, `check_length(...)` once the prompt is tokenized and the model's positions are known, and
`read_prompt(cfg)` for the text. A bad value raises ConfigError, which both print as one line
`error: <key>=<value>: <rule>` with exit status 2. Training's sample callback (callbacks.samples) checks its
settings with `check_sampling` too, its keys prefixed.

`prompt_file=<path>` (or `prompt_file=-` for stdin) gives the prompt as a file's text, for prompts that
Hydra's override grammar would reject on the command line (parentheses, commas, quotes, newlines).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from deepseek_mini.config import ConfigError


def _number(cfg, key: str, prefix: str = ""):
    value = cfg.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix}{key}={value}: must be a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{prefix}{key}={value}: must be a finite number")
    return number


def check_sampling(cfg, prefix: str = "") -> None:
    """temperature >= 0 (0 = greedy), top_k >= 1 (null or 0 = off), 0 < top_p <= 1 (null = off),
    max_new_tokens >= 1, an integer; speculative (generate.py) true or false. Speculative decoding takes every
    temperature / top_k / top_p combination: its acceptance rule compares the same filtered distributions that
    plain sampling draws from, so it keeps them exactly (temperature 0 = greedy verification).
    `prefix` names where the keys live in a larger config ("callbacks.samples.")."""
    temperature = _number(cfg, "temperature", prefix)
    if temperature is not None and temperature < 0:
        raise ConfigError(f"{prefix}temperature={cfg.get('temperature')}: must be >= 0 (0 = greedy)")
    top_k = _number(cfg, "top_k", prefix)
    if top_k is not None and top_k != 0 and (top_k < 1 or top_k != int(top_k)):
        raise ConfigError(f"{prefix}top_k={cfg.get('top_k')}: must be an integer >= 1 (null or 0 = off)")
    top_p = _number(cfg, "top_p", prefix)
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"{prefix}top_p={cfg.get('top_p')}: must be in (0, 1] (null = off)")
    speculative = cfg.get("speculative")
    if speculative is not None and not isinstance(speculative, bool):
        raise ConfigError(f"{prefix}speculative={speculative}: use true or false")
    max_new = _number(cfg, "max_new_tokens", prefix)
    if max_new is None or max_new < 1 or max_new != int(max_new):
        raise ConfigError(f"{prefix}max_new_tokens={cfg.get('max_new_tokens')}: must be an integer >= 1")


def check_flag(cfg, key: str, default: bool) -> bool:
    """A true/false setting. Python's truth would take any word (stop_at_eos=maybe) as true."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value}: use true or false")
    return value


def check_seed(cfg) -> int:
    """seed: an integer >= 0, as training's (torch.manual_seed would raise a ValueError traceback on a word)."""
    value = cfg.get("seed")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"seed={value}: must be an integer >= 0")
    if value > 2**64 - 1:  # torch.manual_seed's range: a larger one raised a RuntimeError traceback
        raise ConfigError(f"seed={value}: must be an integer >= 0 and < 2**64")
    return value


def parse_device(value):
    """device=auto | cpu | cuda | cuda:N | gpu (= cuda) -> a torch.device; CUDA only where it is available."""
    import torch

    name = str(value).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "gpu":
        name = "cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={value}: use auto, cpu or cuda (also gpu, cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={value}: CUDA is not available on this machine (use device=cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_speculative(speculative: bool, num_nextn_predict_layers: int) -> None:
    """speculative=true needs a checkpoint trained with MTP modules (they are the drafter)."""
    if speculative and not num_nextn_predict_layers:
        raise ConfigError("speculative=true: the checkpoint has no MTP modules to draft with "
                          "(model.num_nextn_predict_layers=0; train with model.num_nextn_predict_layers=1 or more)")


def check_length(prompt_tokens: int, max_new_tokens: int, max_positions: int) -> None:
    """The prompt and the new tokens must fit the model's positions (no silent clamping)."""
    total = prompt_tokens + max_new_tokens
    if total > max_positions:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: the prompt ({prompt_tokens} tokens) + max_new_tokens = "
                          f"{total} exceeds the model's max_position_embeddings={max_positions}")


def read_prompt(cfg) -> str:
    """cfg.prompt_file (a path, or - for stdin) if set, else cfg.prompt."""
    source = cfg.get("prompt_file")
    if source in (None, ""):
        return str(cfg.get("prompt") or "")
    if str(source) == "-":
        return sys.stdin.read()
    path = Path(str(source)).expanduser()
    if not path.exists():
        raise ConfigError(f"prompt_file={source}: no such file (use prompt_file=- to read the prompt from stdin)")
    if not path.is_file():  # a directory, or a device such as /dev/zero that would be read forever
        raise ConfigError(f"prompt_file={source}: not a regular file (use prompt_file=- to read from stdin)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt_file={source}: cannot read it as UTF-8 text ({type(e).__name__})") from None
