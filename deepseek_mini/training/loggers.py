"""Logger pieces that survive a resume: metrics.csv keeps its earlier rows, wandb continues the same run."""

from __future__ import annotations

import csv
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger
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
