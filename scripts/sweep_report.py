"""Sweep report: `python scripts/sweep_report.py <multirun dir> [more dirs] [--out DIR]` -> report.md + PNGs in the
first dir (or DIR, created where missing).

See deepseek_mini/analysis/sweep_report.py (the library code, importable by tests). This script adds what the
library may not import (Hydra): each sweep's grid, from its multirun.yaml, so the jobs that never started (a sweep
interrupted at job 1 of 3) are named in the report as "not run".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from deepseek_mini.analysis.sweep_report import main  # noqa: E402

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Each job's task overrides in job order, as Hydra's basic sweeper runs them (training.sweep.grid over
    multirun.yaml's hydra.sweeper.params and hydra.overrides.task); None where that is not known: no or an
    unreadable multirun.yaml, or another sweeper (Optuna chooses its trials as it goes)."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        hydra = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("hydra") or {}
        sweeper = hydra.get("sweeper") or {}
        if sweeper.get("_target_") != BASIC_SWEEPER:
            return None
        task = [str(o) for o in ((hydra.get("overrides") or {}).get("task") or [])]
        params = sweeper.get("params")
        from deepseek_mini.training.sweep import grid

        jobs, _ = grid(task, dict(params) if params else None)
    except Exception as e:  # a damaged multirun.yaml: the report goes on without the jobs that never ran
        print(f"warning: {path}: cannot expand the sweep's jobs ({type(e).__name__}: {e}); jobs that never ran "
              "are not listed", file=sys.stderr)
        return None
    return jobs


if __name__ == "__main__":
    raise SystemExit(main(planned=planned_jobs))
