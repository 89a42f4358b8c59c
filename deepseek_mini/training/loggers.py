"""Loggers: metrics.csv and the wandb run survive a resume; wandb keeps a quiet console and a readable offline copy.

* `ResumableCSVLogger`: on resume, metrics.csv keeps its rows before the resume step; wandb continues the run
  whose id is stored in <run dir>/wandb_run_id.txt.
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

import csv
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)

WANDB_RUN_ID_FILE = "wandb_run_id.txt"


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that, when resuming at `resume_step`, keeps the earlier rows of metrics.csv and appends.

    Lightning's writer deletes an existing metrics.csv; rows logged after the checkpoint by the
    interrupted run (steps >= resume_step) are dropped because the resumed run logs them again.
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        old = Path(self.log_dir) / "metrics.csv"
        rows, keys = [], []
        if self._resume_step is not None and old.is_file():
            with open(old, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < self._resume_step]
        exp = CSVLogger.experiment.fget(self)
        if keys:
            with open(exp.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            exp.metrics_keys = sorted(keys)
            log.info("csv logger: kept %d rows of %s before step %d", len(rows), old, self._resume_step)
        return exp


def read_wandb_run_id(run_dir: Path) -> str | None:
    p = run_dir / WANDB_RUN_ID_FILE
    if p.is_file():
        value = p.read_text().strip()
        return value or None
    return None


def write_wandb_run_id(run_dir: Path, run_id: str) -> None:
    (run_dir / WANDB_RUN_ID_FILE).write_text(f"{run_id}\n")


def wandb_online_problem(timeout: float = 3.0) -> str | None:
    """Why online wandb logging cannot work here (no key, host unreachable), or None if it may."""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators(urlparse(base).hostname or "api.wandb.ai") is not None
        except Exception:
            has_key = False
    if not has_key:
        return "no wandb API key found (wandb login / WANDB_API_KEY)"
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return None  # wandb will not go online anyway: no network probe
    url = urlparse(base)
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach {host}:{port} ({type(e).__name__}: {e})"



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
