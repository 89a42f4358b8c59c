"""The sampling settings of eval.py and scripts/generate.py, checked by one set of rules, and the prompt.

Both entry points call `check_sampling(cfg)` before loading anything, `check_length(...)` once the prompt
is tokenized and the model's positions are known, and `read_prompt(cfg)` for the text. A bad value raises
ConfigError, which both print as one line `error: <key>=<value>: <rule>` with exit status 2.

`prompt_file=<path>` (or `prompt_file=-` for stdin) gives the prompt as a file's text, for prompts that
Hydra's override grammar would reject on the command line (parentheses, commas, quotes, newlines).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from deepseek_mini.config import ConfigError


def _number(cfg, key: str):
    value = cfg.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value}: must be a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{key}={value}: must be a finite number")
    return number


def check_sampling(cfg) -> None:
    """temperature >= 0 (0 = greedy), top_k >= 1 (null or 0 = off), 0 < top_p <= 1 (null = off),
    max_new_tokens >= 1, an integer; speculative (generate.py) true or false. Speculative decoding takes every
    temperature / top_k / top_p combination: its acceptance rule compares the same filtered distributions that
    plain sampling draws from, so it keeps them exactly (temperature 0 = greedy verification)."""
    temperature = _number(cfg, "temperature")
    if temperature is not None and temperature < 0:
        raise ConfigError(f"temperature={cfg.get('temperature')}: must be >= 0 (0 = greedy)")
    top_k = _number(cfg, "top_k")
    if top_k is not None and top_k != 0 and (top_k < 1 or top_k != int(top_k)):
        raise ConfigError(f"top_k={cfg.get('top_k')}: must be an integer >= 1 (null or 0 = off)")
    top_p = _number(cfg, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p={cfg.get('top_p')}: must be in (0, 1] (null = off)")
    speculative = cfg.get("speculative")
    if speculative is not None and not isinstance(speculative, bool):
        raise ConfigError(f"speculative={speculative}: use true or false")
    max_new = _number(cfg, "max_new_tokens")
    if max_new is None or max_new < 1 or max_new != int(max_new):
        raise ConfigError(f"max_new_tokens={cfg.get('max_new_tokens')}: must be an integer >= 1")


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
    if not path.is_file():
        raise ConfigError(f"prompt_file={source}: no such file (use prompt_file=- to read the prompt from stdin)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompt_file={source}: cannot read it as UTF-8 text ({type(e).__name__})") from None
