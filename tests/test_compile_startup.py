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
    monkeypatch.setattr(startup, "_marks", {})
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


def test_stage_seconds_are_each_stage_own_time_and_add_up(fresh_clock):
    """Each stage's seconds run from the end of the one before: with fit's part they sum to the first step's time."""
    fresh_clock.setattr(startup, "process_age", lambda: 10.0)
    origin = startup.start_job()
    clock = iter([origin + 12.0, origin + 12.5, origin + 15.0])
    fresh_clock.setattr(startup.time, "perf_counter", lambda: next(clock))
    for stage in ("data", "model", "validation"):
        startup.mark(stage)
    stages = startup.stage_seconds()
    assert list(stages) == ["launch", "data", "model", "validation"]
    assert stages["launch"] == pytest.approx(10.0, abs=0.05)  # the process's age when train() started
    assert (stages["data"], stages["model"], stages["validation"]) == (2.0, 0.5, 2.5)
    assert sum(stages.values()) == pytest.approx(15.0, abs=0.05)


def test_summary_prints_first_step_from_launch_with_its_parts():
    res = {"run_dir": "/runs/r1", "time_to_first_step_sec": 24.13, "fit_to_first_step_sec": 19.0,
           "compile_time_sec": 12.34, "wall_time_sec": 61.04}
    text = format_summary(res)
    assert "first step after 24.1 s from launch (fit 19.0 s, compiling 12.3 s), wall 1 min 1.0 s" in text
    eager = format_summary({**res, "compile_time_sec": 0.0})
    assert "(fit 19.0 s), wall" in eager  # nothing compiled: no compile part
    staged = format_summary({**res, "startup_sec": {"launch": 3.21, "data": 1.0, "model": 0.44, "validation": 0.5}})
    assert ("first step after 24.1 s from launch (start-up 3.2 s, data 1.0 s, model 0.4 s, validation 0.5 s, "
            "fit 19.0 s, compiling 12.3 s)") in staged


def test_compile_workers_start_early_only_where_triton_compiles_for_a_gpu(monkeypatch):
    """train() starts Inductor's compile workers before data preparation (training/compile.start_compile_workers):
    only with a CUDA GPU (on CPU Inductor compiles C++ without that pool), and a failing start never ends a run."""
    import torch._inductor.async_compile as async_compile

    from deepseek_mini.training.compile import start_compile_workers

    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append("warm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert start_compile_workers() is False and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert start_compile_workers() is True and calls == ["warm"]

    def broken():
        raise RuntimeError("no pool in a daemonic process")

    monkeypatch.setattr(async_compile, "maybe_warm_pool", broken)
    assert start_compile_workers() is False
