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
* A resumed offline run keeps ONE directory. wandb cannot write into the first run's directory: wandb.init
  stamps every start with a new time (`settings.x_start_time = time.time()`, the `<timestamp>` of
  `offline-run-<timestamp>-<id>`) and adds `-1`, `-2` to a directory that already exists
  (wandb/sdk/wandb_init.py, `_make_sync_dir_unique`). So `finish_wandb_run` folds the resumed part into the
  first directory after wandb.finish: its transaction log lands beside the first one as
  `run-<id>-<timestamp>.wandb`, and `wandb sync <dir>` uploads every .wandb file of a run directory, the
  parts of one run in order of their start time (the `-n` help of `wandb sync`).

The class keeps Lightning's name, so `isinstance(.., lightning WandbLogger)` and name checks still hold.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
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
    @staticmethod
    def check_config_options(options: dict, key: str, model=None) -> None:
        """Value rules, run by the settings check before data preparation (run_config.check_node_options): the
        tags by wandb's own rule (wandb.init refused them with a pydantic traceback after data preparation)."""
        from deepseek_mini.training.run_config import check_tags

        check_tags(options.get("tags"), f"{key}.tags")

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


# ------------------------------------------------------------------ one offline directory per resumed run
_OFFLINE_PREFIX = "offline-run-"


def _offline_part(name: str, run_id: str) -> tuple[str, int] | None:
    """(timestamp, wandb's -N suffix) of `offline-run-<YYYYmmdd_HHMMSS>-<run_id>[-N]`, else None."""
    if not name.startswith(_OFFLINE_PREFIX):
        return None
    stamp, rest = name[len(_OFFLINE_PREFIX):len(_OFFLINE_PREFIX) + 15], name[len(_OFFLINE_PREFIX) + 15:]
    if len(stamp) != 15 or stamp[8] != "_" or not stamp.replace("_", "").isdigit():
        return None
    if rest == f"-{run_id}":
        return stamp, 0
    suffix = rest.removeprefix(f"-{run_id}-")
    return (stamp, int(suffix)) if suffix != rest and suffix.isdigit() else None


def _append(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "ab") as fout:
        shutil.copyfileobj(fin, fout)
    src.unlink()


def fold_offline_runs(wandb_dir: str | os.PathLike, run_id: str) -> Path | None:
    """Fold every later offline directory of wandb run `run_id` into its first one; that directory, or None.

    The later part's `run-<id>.wandb` becomes `run-<id>-<timestamp>.wandb` beside the first (its
    `.synced` marker follows it); its console output.log and logs/*.log are appended to the first's; its
    other files/ (config.yaml, wandb-summary.json, ...) describe the run as it ended and replace the
    first's; tmp/ is wandb's scratch space and goes. The wandb/latest-run and debug*.log links follow.
    """
    try:
        return _fold(Path(wandb_dir), run_id)
    except OSError as e:  # never let logging bookkeeping fail a run: the parts stay as wandb wrote them
        log.warning("wandb: could not fold the offline parts of run %s in %s: %s", run_id, wandb_dir, e)
        return None


def _fold(wandb_dir: Path, run_id: str) -> Path | None:
    parts = sorted((key, d) for d in (wandb_dir.iterdir() if wandb_dir.is_dir() else [])
                   if d.is_dir() and not d.is_symlink() and (key := _offline_part(d.name, run_id)))
    if len(parts) < 2:
        return parts[0][1] if parts else None
    first = parts[0][1]
    for (stamp, n), part in parts[1:]:
        tag = f"{stamp}-{n}" if n else stamp
        logs = [f for f in part.glob("*.wandb*") if f.is_file()]
        if any((first / _renamed(f.name, run_id, tag)).exists() for f in logs):
            log.warning("wandb: %s was not folded into %s (a file of that name exists)", part, first)
            continue
        for f in logs:  # the history first: the part that matters
            os.replace(f, first / _renamed(f.name, run_id, tag))
        for sub in ("files", "logs"):
            for f in sorted(p for p in (part / sub).rglob("*") if p.is_file() and not p.is_symlink()):
                dst = first / sub / f.relative_to(part / sub)
                dst.parent.mkdir(parents=True, exist_ok=True)
                if dst.exists() and f.suffix == ".log":
                    _append(f, dst)
                else:
                    os.replace(f, dst)
        for link in list(wandb_dir.iterdir()):  # latest-run, debug.log, debug-internal.log point into the part
            if link.is_symlink() and Path(os.readlink(link)).parts[:1] == (part.name,):
                tmp = link.with_name(link.name + ".tmp")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(Path(first.name, *Path(os.readlink(link)).parts[1:]))
                os.replace(tmp, link)
        shutil.rmtree(part)
        log.info("wandb: folded the resumed offline run %s into %s", part.name, first)
    return first


def _renamed(name: str, run_id: str, tag: str) -> str:
    head = f"run-{run_id}.wandb"
    return f"run-{run_id}-{tag}.wandb{name[len(head):]}" if name.startswith(head) else name


def finish_wandb_run(run: Any, exit_code: int) -> None:
    """wandb's `run.finish`, then (offline) fold a resumed part into the run's first offline directory."""
    offline = bool(getattr(run, "offline", False))
    sync_dir = Path(run.settings.sync_dir).resolve() if offline else None
    run_id = run.id
    run.finish(exit_code=exit_code)
    if sync_dir is not None:
        fold_offline_runs(sync_dir.parent, run_id)

