"""results.json and the facts it records: which Hydra job this is, and counters kept over resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def hydra_info() -> dict:
    """This job's overrides and mode (and sweep dir / job number in a multirun); {} outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except Exception:
        return {}
    info = {"overrides": list(hc.overrides.task), "mode": str(hc.mode)}
    if "MULTIRUN" in info["mode"]:
        info["sweep_dir"] = hc.sweep.dir
        info["job_num"] = hc.job.num
    return info


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and a rename: a reader never sees half a results.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def optimized_metric(cfg, results: Any) -> float | None:
    """The value a Hydra sweeper (Optuna) minimizes: results[cfg.optimized_metric], inf if missing or NaN."""
    metric = cfg.get("optimized_metric")
    if not metric or not isinstance(results, dict):
        return None
    value = results.get(metric)
    return float("inf") if value is None or value != value else float(value)  # NaN/None would crash Optuna
