"""Lightning's WandbLogger with a quiet console, and a readable copy of an offline run.

* wandb prints a start banner (5 lines) and, at the end, a 35-line run summary. The project ends a run on its
  own summary block (deepseek_mini/training/summary.py), so wandb is silent unless `logger.wandb.verbose=true`;
  its own log (<run dir>/wandb/debug.log) is still written, and the final summary is in results.json and
  <run dir>/wandb/summary.json (below).
* Lightning passes `anonymous=None` to wandb.init, which makes wandb warn "The anonymous setting has no
  effect"; the key is dropped.
* An offline run's history is a binary .wandb file. `write_readable_run(run_dir, config, summary)` writes
  the resolved config and the final summary as JSON (<run dir>/wandb/config.json and summary.json) so a run
  can be read without a wandb account.

The class keeps Lightning's name, so `isinstance(.., lightning WandbLogger)` and name checks still hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    def __init__(self, *args: Any, verbose: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        if not verbose:
            import wandb

            settings = self._wandb_init.get("settings")
            if settings is None:
                settings = wandb.Settings()
            elif isinstance(settings, dict):
                settings = wandb.Settings(**settings)
            settings.silent = True
            self._wandb_init["settings"] = settings


def write_readable_run(run_dir: str | os.PathLike, config: dict, summary: dict) -> Path | None:
    """<run dir>/wandb/{config,summary}.json beside the offline run(s); None when there is no wandb dir."""
    wandb_dir = Path(run_dir) / "wandb"
    if not wandb_dir.is_dir():
        return None
    for name, data in (("config.json", config), ("summary.json", summary)):
        tmp = wandb_dir / f"{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, wandb_dir / name)
    return wandb_dir
