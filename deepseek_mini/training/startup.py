"""The clock a run's cold start is read on: seconds since this process was launched, and torch.compile's share.

`time_to_first_step_sec` in results.json counts from the process launch (what a person waits: Python and
torch imports, Hydra, data preparation, model build, compilation, the first batch), not from trainer.fit().
Jobs of a multirun that share one process count from their own train() call (the launch was the first
job's). Compile time is torch's own account: dynamo + AOTAutograd + Inductor, forward and backward graphs
(`torch._dynamo.utils.calculate_time_spent`), since this job started.

`mark(stage)` records when each part before trainer.fit() ended (train() marks "data", "model",
"validation"), so results.json can say where the wait went (`stage_seconds`): Python starting and the imports
("launch", up to train()), data preparation, the model and trainer, the validation before training.
"""

from __future__ import annotations

import os
import time

_job_start: float | None = None  # time.perf_counter() value this job's clock counts from
_compile_base = 0.0  # torch's cumulative compile seconds when this job started
_graphs_base: dict[str, int] = {}  # graph_counts_total() when this job started
_jobs = 0
_marks: dict[str, float] = {}  # stage -> seconds since this job's start when it ended


def process_age() -> float | None:
    """Seconds since the OS started this process (Linux /proc, 10 ms resolution; psutil elsewhere), or None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": field 3 onwards
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: starttime in ticks
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:
        return None


def compile_seconds_total() -> float:
    try:
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # a torch without these counters: no compile time to report
        return 0.0


def graph_counts_total() -> dict[str, int]:
    """Graphs Inductor took from its on-disk cache and graphs it compiled (a miss, or a graph it cannot cache), in
    this process."""
    try:
        from torch._dynamo.utils import counters

        c = counters["inductor"]
        return {"from_cache": int(c["fxgraph_cache_hit"]),
                "compiled": int(c["fxgraph_cache_miss"] + c["fxgraph_cache_bypass"])}
    except Exception:  # a torch without these counters
        return {"from_cache": 0, "compiled": 0}


def start_job() -> float:
    """Start this job's clock (train() calls it first thing); returns its perf_counter() origin."""
    global _job_start, _compile_base, _graphs_base, _jobs, _marks
    now = time.perf_counter()
    age = process_age() if _jobs == 0 else None
    _job_start = now - age if age is not None else now
    _compile_base = compile_seconds_total()
    _graphs_base = graph_counts_total()
    _jobs += 1
    _marks = {"launch": now - _job_start}  # Python, the imports and Hydra (0 for a multirun's later jobs)
    return _job_start


def mark(stage: str) -> None:
    """Record that `stage` (one of this job's parts before trainer.fit()) ended now."""
    _marks[stage] = seconds_since_start()


def stage_seconds() -> dict[str, float]:
    """Each marked stage's own seconds (from the end of the one before it), in the order they were marked."""
    out, last = {}, 0.0
    for stage, at in _marks.items():
        out[stage] = round(max(0.0, at - last), 2)
        last = at
    return out


def seconds_since_start() -> float:
    """Seconds since this job's clock started (since the process launch when start_job was never called)."""
    if _job_start is None:
        start_job()
    return time.perf_counter() - _job_start


def compile_seconds() -> float:
    """torch.compile's seconds (dynamo + Inductor, forward and backward) since this job started."""
    return max(0.0, compile_seconds_total() - _compile_base)


def graph_counts() -> dict[str, int]:
    """graph_counts_total since this job started: how many of its graphs came from the cache, how many compiled."""
    now = graph_counts_total()
    return {k: now[k] - _graphs_base.get(k, 0) for k in now}
