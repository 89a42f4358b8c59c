"""One-line errors: what the user did wrong (exit status 2) and what went wrong while training (exit status 1).

* `USER_ERRORS` (a bad config value, missing data, an unreadable checkpoint) print `error: <message>`, rc 2.
* `TrainingFault` (non-finite loss, out of memory, a checkpoint that cannot be written) print
  `error: <message>`, rc 1.
* `task_wrapper` finishes the wandb run whatever happens and, inside a multirun, turns a failed job
  into a `"status": "failed"` results.json so the sweep goes on; `cli_errors` prints the one line.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
import sys
from pathlib import Path

import torch

from deepseek_mini.checkpoint import CheckpointError
from deepseek_mini.config import ConfigError
from deepseek_mini.data import DataError
from deepseek_mini.training.results import hydra_info, write_json

log = logging.getLogger(__name__)

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError, DataError)  # one line, exit status 2


class TrainingFault(RuntimeError):
    """A fault while training (non-finite loss, out of memory): one-line message, exit status 1."""


class NonFiniteLossError(TrainingFault):
    pass


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only directory, ...): one line naming the path and
    the cause, exit status 1. An OSError, so code that handles IO errors still sees one."""


def is_fault(exc: BaseException) -> bool:
    return isinstance(exc, (TrainingFault, CheckpointWriteError)) or is_oom(exc)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text[:limit] or type(exc).__name__


def fault_message(exc: BaseException) -> str:
    if is_oom(exc):
        return f"CUDA out of memory ({one_line(exc, 200)}); lower data.batch_size or the model size"
    return one_line(exc)


def hydra_error_line(ex: BaseException) -> str:
    """Hydra's multi-line composition error (unknown key, bad override, missing group option) as one line."""
    msg = str(ex)
    m = re.search(r"Could not override '([^']+)'", msg)
    cause = ex.__cause__
    cause_first = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
    if m and "not in struct" in cause_first:
        key = m.group(1)
        return f"unknown config key '{key}' (check the spelling; to add a new key use +{key}=...)"
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    if lines and lines[0].startswith("In ") and "Could not find" in msg:  # missing group option
        opts = []
        for x in lines[1:]:
            if x.startswith("Config search path"):
                break
            if not x.startswith("Available options"):
                opts.append(x)
        return f"{lines[0]} (available: {', '.join(opts)})" if opts else lines[0]
    text = "; ".join(lines)
    if cause_first and cause_first not in text:
        text = f"{text}: {cause_first}"
    if "Error parsing override" in text:  # e.g. prompt=def main(
        text = (f"{text.split('; See https')[0]} (quote a value with ( ) , = or spaces as 'key=\"...\"'; "
                "a prompt can also come from prompt_file=<path>, or prompt_file=- for stdin)")
    return text[:500]


def _finish_wandb(exit_code: int) -> None:
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        _log_to_files(logging.INFO, f"closing wandb run {wandb.run.id}")  # the run summary stays the last line
        from deepseek_mini.training.loggers import finish_wandb_run

        finish_wandb_run(wandb.run, exit_code)  # wandb.finish; a resumed offline run keeps one directory


def _log_to_files(level: int, msg: str) -> None:
    """Record a message in train.log only (the console gets the one-line `error:` from cli_errors)."""
    record = log.makeRecord(log.name, level, __file__, 0, msg, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _job_dir(cfg) -> Path | None:
    try:
        return Path(cfg.paths.output_dir)
    except Exception:
        return None


def task_wrapper(fn):
    """Always finish wandb (so the next multirun job starts a new run) and free memory.

    Single run: errors are re-raised (cli_errors prints them in one line). Multirun job: any exception
    (CUDA out of memory included) fails only this job: it is logged, recorded in the job's results.json
    as `"status": "failed"` with the error, and the sweep goes on with the next job.
    """

    @functools.wraps(fn)
    def wrapped(cfg):
        failed = True
        multirun = "sweep_dir" in hydra_info()
        try:
            out = fn(cfg)
            failed = False
            return out
        except Exception as e:
            expected = isinstance(e, USER_ERRORS) or is_fault(e)
            msg = fault_message(e) if expected else f"{type(e).__name__}: {fault_message(e)}"
            if not multirun:
                if expected:
                    _log_to_files(logging.ERROR, f"{type(e).__name__}: {msg}")
                else:
                    log.exception("run failed")
                raise
            job = hydra_info().get("job_num")
            if expected:
                log.error("job %s failed: %s", job, msg)
            else:
                log.exception("job %s failed: %s", job, msg)
            out_dir = _job_dir(cfg)
            result = {"status": "failed", "error": msg, "error_type": type(e).__name__, "job_num": job,
                      "overrides": hydra_info().get("overrides", [])}
            if out_dir is not None:
                result["run_dir"] = str(out_dir.resolve())
                try:
                    write_json(out_dir / "results.json", result)
                except OSError as werr:  # a read-only or full job dir: the sweep still goes on
                    log.error("cannot write %s: %s", out_dir / "results.json", werr)
            return result  # not re-raised: Hydra's basic launcher would stop the whole sweep
        finally:
            _finish_wandb(1 if failed else 0)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

    return wrapped


def cli_errors(fn):
    """For the entry points: a user error prints `error: <message>` and exits with status 2; a training
    fault (non-finite loss, CUDA out of memory, an unwritable checkpoint) prints `error: <message>` and
    exits with status 1."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as e:
            if not is_fault(e):
                raise
            print(f"error: {fault_message(e)}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapped
