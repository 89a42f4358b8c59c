"""Cold start: time to the first optimizer step counts from the process launch (training/startup.py), and the
end-of-run summary prints it with its fit and compile parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deepseek_mini.training import startup
from deepseek_mini.training.callbacks import ThroughputMonitor
from deepseek_mini.training.summary import format_summary

STARTUP = Path(__file__).resolve().parents[1] / "deepseek_mini" / "training" / "startup.py"


def test_process_age_counts_from_the_launch():
    """A process that sleeps 1.5 s before asking is at least 1.5 s old (startup.py loaded alone: no torch import)."""
    code = ("import time, importlib.util as u; time.sleep(1.5); "
            f"spec = u.spec_from_file_location('startup', {str(STARTUP)!r}); m = u.module_from_spec(spec); "
            "spec.loader.exec_module(m); print(m.process_age())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= age < 30


@pytest.fixture
def fresh_clock(monkeypatch):
    monkeypatch.setattr(startup, "_jobs", 0)
    monkeypatch.setattr(startup, "_job_start", None)
    return monkeypatch


def _first_step(monitor: ThroughputMonitor) -> None:
    trainer = SimpleNamespace(accumulate_grad_batches=1, global_step=1, world_size=1, loggers=[])
    module = SimpleNamespace(device=torch.device("cpu"))
    monitor.on_fit_start(trainer, module)
    monitor.on_train_batch_end(trainer, module, None, (torch.zeros(2, 4, dtype=torch.long),), 0)


def test_time_to_first_step_is_from_launch_not_from_fit(fresh_clock):
    fresh_clock.setattr(startup, "process_age", lambda: 100.0)  # launched 100 s before train() started
    startup.start_job()
    monitor = ThroughputMonitor()
    _first_step(monitor)
    assert monitor.time_to_first_step >= 100.0
    assert monitor.fit_to_first_step < 5.0 and monitor.compile_time is not None


def test_a_later_job_in_the_same_process_counts_from_its_own_start(fresh_clock):
    """A multirun's second job (same process) must not count the first job's time."""
    fresh_clock.setattr(startup, "process_age", lambda: 100.0)
    startup.start_job()
    startup.start_job()
    assert startup.seconds_since_start() < 5.0


def test_summary_prints_first_step_from_launch_with_its_parts():
    res = {"run_dir": "/runs/r1", "time_to_first_step_sec": 24.13, "fit_to_first_step_sec": 19.0,
           "compile_time_sec": 12.34, "wall_time_sec": 61.04}
    text = format_summary(res)
    assert "first step after 24.1 s from launch (fit 19.0 s, compiling 12.3 s), wall 1 min 1.0 s" in text
    eager = format_summary({**res, "compile_time_sec": 0.0})
    assert "(fit 19.0 s), wall" in eager  # nothing compiled: no compile part
