"""The Hydra config group `model`: one option per preset of deepseek_mini.config.PRESETS, from that one source.

`model=small`, `override /model: small` (configs/experiment/), `model.kv_lora_rank=64` and
`python train.py --cfg job` work as they would with a YAML file per preset: each option is registered in
Hydra's ConfigStore (group `model`, name = the preset) and lists every ModelConfig field flat, so
`model.<field>=...` needs no `+` and a misspelled field fails under Hydra's struct mode. Values are the
preset's on top of the dataclass defaults, before __post_init__ fills derived ones (null = derived or off).

Every entry point that composes a config imports this module first (train.py, eval.py, deepseek_mini/cli.py,
scripts/generate.py, the tests' conftest.py); importing it registers the options. Launchers that run jobs in
other processes (submitit) carry the ConfigStore with them, and DDP re-runs the entry point, which imports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore

from deepseek_mini.config import PRESETS, ModelConfig

GROUP = "model"


def preset_node(name: str) -> dict[str, Any]:
    """The preset as a flat dict of every ModelConfig field, before __post_init__ fills derived defaults."""
    base = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {**base, **PRESETS[name]}


def register() -> None:
    """Store every preset as an option of the `model` group (storing again replaces: safe to call twice)."""
    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group=GROUP, name=name, node=preset_node(name))


register()
