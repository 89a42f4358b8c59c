"""The entry points' front door: `cli_entry`, and the reliability pieces re-exported from their own files.

`cli_entry(main, config_dir, config_name)` wraps a `@hydra.main` function. Before Hydra runs (and so before it
writes `.hydra/` or `train.log` into any run dir) a training command is composed once and checked:

* every run setting (`RunConfig`: optimizer, schedule, trainer, data, seed, a writable run dir, memory);
* `ckpt_path=last` / `resume=<true|yes|1...>` without `hydra.run.dir=` continues the latest run under
  `logs/<task>/runs/` that has `checkpoints/last.ckpt` (that run dir becomes the output dir); inside `-m`
  it needs `hydra.sweep.dir=<the sweep>` (each job resumes its own job dir);
* a multirun into a given `hydra.sweep.dir` is checked job by job (training/sweep.py expands the basic
  sweeper's jobs): no fresh job into a job dir that holds a run, and on resume each job against its own
  recorded run (a job dir without a checkpoint and without a run starts its job);
* a resume must continue the same model and data: fields the command did not ask to change are taken from
  the run, a field it did ask to change refuses the resume (`resume.resume_overrides`);
* the run dir is locked (`lock.acquire_run_lock`): a second training there is refused, naming the holder.

An eval.py command's settings (seed, device, data sizes, sampling; evaluate.check_eval_options) are checked the
same way, before Hydra creates the eval's run dir.

Hydra's multi-line composition errors (unknown key, bad override, missing group option) become one
`error: ...` line with exit status 2. `HYDRA_FULL_ERROR=1` keeps Hydra's own output.

Where the rest lives (import it from there): checkpoint files (checkpoint_io.py), resume state and checks (resume.py), the run lock
(lock.py), training guards and the DSMINI_FAULT test hook (guards.py), loggers (loggers.py), one-line errors
(errors.py), the typed run config (run_config.py).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from pathlib import Path

from deepseek_mini.checkpoint import CheckpointError
from deepseek_mini.config import ConfigError
from deepseek_mini.training.errors import (
    hydra_error_line,
)
from deepseek_mini.training.lock import acquire_run_lock, is_launcher_rank, lock_holder
from deepseek_mini.training.resume import (
    finished_without_checkpoint,
    holds_a_run,
    latest_run_with_checkpoint,
    resolve_ckpt_path,
    resume_overrides,
)
from deepseek_mini.training.summary import hydra_value
from deepseek_mini.training.sweep import SweepJob, configured_dir, sweep_jobs

INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--shell-completion",
              "-sc", "--version")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(overrides: list[str], key: str) -> str | None:
    found = [o.split("=", 1)[1] for o in overrides if "=" in o and _key(o) == key]
    if not found:
        return None
    # Hydra strips a quoted value's quotes; Lightning starts DDP ranks 1..N-1 with hydra.run.dir="<dir>"
    v = found[-1]
    return v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'" else v


def _preflight_resume(argv: list[str], config_dir: str, config_name: str) -> list[str]:
    """Check a training command before Hydra writes anything; returns argv with the run dir (for `last`) and the
    run's recorded model/data settings (for a resume) added."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from deepseek_mini.training.run_config import as_bool

    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        return argv
    overrides = [a for a in argv if not a.startswith("-")]
    plain = [a for a in overrides if not a.startswith(HYDRA_PREFIXES)]
    multirun, cfg = any(a in ("-m", "--multirun") for a in argv), None
    if not multirun:
        try:
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                cfg = compose(config_name=config_name, overrides=plain, return_hydra_config=True)
        except HydraException as e:
            if "--multirun" not in str(e):  # a swept value (a=1,2) in a config that is a multirun itself
                raise
        # an experiment may make the command a multirun (hydra.mode: MULTIRUN)
        multirun = cfg is None or "MULTIRUN" in str(cfg.hydra.get("mode"))
    ckpt_value, resume_value = _value(overrides, "ckpt_path"), _value(overrides, "resume")
    if multirun:
        wants_last = ckpt_value == "last" or (resume_value is not None and "," not in resume_value
                                             and as_bool("resume", resume_value) and ckpt_value is None)
        how = (f"{'ckpt_path=last' if ckpt_value == 'last' else 'resume=' + str(resume_value)} with -m"
               if wants_last else None)
        return _preflight_sweep(argv, overrides, plain, config_dir, config_name, how)
    resume = as_bool("resume", cfg.get("resume", False))
    ckpt = cfg.get("ckpt_path")
    run_dir = _value(overrides, "hydra.run.dir")
    run_dir = configured_dir(cfg.hydra.run) if run_dir is None else run_dir  # a config file's fixed dir too
    if run_dir is None and (ckpt == "last" or resume and ckpt in (None, "", "null")):
        runs = Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs"
        found = latest_run_with_checkpoint(runs)
        if found is None:
            raise CheckpointError(f"ckpt_path=last: no run under {runs} has checkpoints/last.ckpt "
                                  "(give hydra.run.dir=<run dir> or ckpt_path=<file>)")
        print(f"resuming the latest run: {found}", file=sys.stderr)
        run_dir = str(found)
        argv = [*argv, f"hydra.run.dir={hydra_value(run_dir)}"]  # Hydra parses it: quoted where it must be
    if run_dir is not None and not str(run_dir).strip():
        raise ConfigError("hydra.run.dir='': an empty path would be the current directory; give a run dir")
    run = Path(run_dir) if run_dir is not None else None
    check_dir = run if run is not None else Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs"
    argv = [*argv, *(_check_run(cfg, run, check_dir, plain) or [])]
    if run_dir is not None:  # a known run dir: lock it before Hydra writes .hydra/ and train.log there
        acquire_run_lock(run_dir)
    return argv


HYDRA_PREFIXES = ("hydra.", "hydra/", "+hydra", "~hydra", "++hydra")


def _check_run(cfg, run_dir: Path | None, check_dir: Path, plain: list[str],
               sweep_job: bool = False) -> list[str] | None:
    """One run's (or one sweep job's) settings, run dir and checkpoint, checked before anything is written. For a
    resume, the overrides that adopt the run's recorded model and data (resume_overrides); None when the run
    starts from scratch."""
    from deepseek_mini.training.run_config import RunConfig, as_bool

    resume = as_bool("resume", cfg.get("resume", False))
    ckpt = cfg.get("ckpt_path")
    ckpt = None if ckpt in (None, "", "null") else str(ckpt)
    if resume and ckpt not in (None, "last"):
        raise ConfigError(f"resume=true with ckpt_path={ckpt}: resume=true means ckpt_path=last (the run continues in "
                          "its own dir); give one of them (ckpt_path=<file> alone starts a new run from that file)")
    own = ckpt == "last" or resume or (ckpt is not None and run_dir is not None
                                       and Path(ckpt).expanduser().resolve().is_relative_to(run_dir.resolve()))
    if run_dir is not None and not own and is_launcher_rank() and holds_a_run(run_dir):
        # a fresh run there, or one from another run's checkpoint, would replace its checkpoints, results and
        # metrics, and mix the two runs' logs
        where, again = (f"its dir {run_dir}", "the sweep with ckpt_path=last, or give a new hydra.sweep.dir") \
            if sweep_job else (f"hydra.run.dir={run_dir}", "it with ckpt_path=last, or give a new run dir")
        raise ConfigError(f"{where} holds a run (its checkpoints or results.json); continue {again}")
    cfg.paths.output_dir = str(check_dir)  # ${hydra:runtime.output_dir} has no value before Hydra runs
    run = RunConfig.from_cfg(cfg, check_dir)  # every setting, before any write
    if ckpt is None and not resume:
        return None
    if run_dir is not None and finished_without_checkpoint(run_dir, ckpt, resume, run.trainer.max_steps):
        return None  # completed at max_steps, its checkpoints deleted: train() keeps its records, nothing to adopt
    ckpt_file = resolve_ckpt_path(ckpt, check_dir, resume=resume, sweep_job=sweep_job)
    return None if ckpt_file is None else resume_overrides(cfg, ckpt_file, plain)


def _preflight_sweep(argv: list[str], overrides: list[str], plain: list[str], config_dir: str, config_name: str,
                     resuming: str | None) -> list[str]:
    """A multirun with Hydra's basic sweeper, checked job by job before the first job runs (training/sweep.py knows
    each job's overrides and dir). A job with a bad setting is left to fail alone when its turn comes, as in any
    sweep (a grid may have invalid corners), unless every job would. Into a known sweep dir (hydra.sweep.dir on the
    command line or fixed by a config), no job may run in a dir that holds a run or that another training holds;
    a resumed sweep (`resuming`: ckpt_path=last / resume=true) must continue each job's own run: its model, data
    and swept values."""
    jobs, configured = sweep_jobs(config_dir, config_name, plain, [o for o in overrides if o.startswith(HYDRA_PREFIXES)])
    sweep_dir = _value(overrides, "hydra.sweep.dir")
    sweep_dir = configured if sweep_dir is None else sweep_dir
    if resuming and sweep_dir is None:
        raise ConfigError(f"{resuming}: each job resumes its own <sweep dir>/<job>/checkpoints/last.ckpt; give "
                          "hydra.sweep.dir=<the sweep's dir>")
    if sweep_dir is not None and not str(sweep_dir).strip():
        raise ConfigError("hydra.sweep.dir='': an empty path would be the current directory; give a sweep dir")
    if jobs is None:
        if resuming:
            raise ConfigError(f"{resuming} and a sweeper other than Hydra's basic one: its jobs are not known before "
                              "they run; resume each job with hydra.run.dir=<job dir> ckpt_path=last")
        return argv
    adopted: dict[int, list[str]] = {}
    failing: list[tuple[SweepJob, Exception]] = []
    known = sweep_dir is not None
    for job in jobs:
        ran, holder = (holds_a_run(job.dir), lock_holder(job.dir)) if known else (False, None)
        try:
            if holder is not None:
                raise ConfigError(f"another training is running in {job.dir} ({holder}); wait for it")
            if ran and resuming:
                _check_swept_values(job)
            adopt = _check_run(job.cfg, job.dir if known else None, job.dir, job.overrides, sweep_job=True)
        except (ConfigError, CheckpointError) as e:
            if ran or holder is not None:  # a job dir that holds something: the sweep may not go on over it
                raise type(e)(f"hydra.sweep.dir={sweep_dir}: job {job.num} ({' '.join(job.swept)}): {e}") from None
            failing.append((job, e))
            continue
        if adopt is not None:
            adopted[job.num] = adopt
    if failing and len(failing) == len(jobs):  # not an invalid corner: the sweep as a whole
        job, e = failing[0]
        raise type(e)(f"every job of the sweep would fail; job {job.num} ({' '.join(job.swept)}): {e}") from None
    if resuming and not any(holds_a_run(j.dir) for j in jobs):
        raise ConfigError(f"hydra.sweep.dir={sweep_dir}: no job of this sweep holds a run to resume (a new sweep: "
                          f"drop {resuming.split(' ')[0]})")
    kinds = {tuple(a) for a in adopted.values()}
    if len(kinds) > 1:  # one command line serves every job: the recorded settings must be the same for all
        seen = "; ".join(f"job {n}: {' '.join(a) or 'as now'}" for n, a in adopted.items())
        raise ConfigError(f"hydra.sweep.dir={sweep_dir}: the jobs recorded different values of settings this command "
                          f"does not set ({seen}); set them on the command line, or resume each job with "
                          "hydra.run.dir=<job dir> ckpt_path=last")
    return [*argv, *(kinds.pop() if kinds else ())]


def _check_swept_values(job: SweepJob) -> None:
    """A resumed job continues the run its dir holds: each value the sweep varies must be the one that run had
    (its .hydra/config.yaml). A reordered or changed grid would give job 0 another job's optim.lr, which a single
    resume may change but which here tells the jobs apart."""
    import yaml
    from omegaconf import OmegaConf

    path = job.dir / ".hydra" / "config.yaml"
    try:
        ran = OmegaConf.create(yaml.safe_load(path.read_text()) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
        return  # no record of the values: the model and data comparison still applies
    for item in job.swept:
        key, value = item.split("=", 1)
        key = key.lstrip("+~")
        try:
            before, now = OmegaConf.select(ran, key, default=None), OmegaConf.select(job.cfg, key, default=None)
        except Exception:  # an interpolation with no value outside Hydra (${hydra:...}): not comparable here
            continue
        before, now = (OmegaConf.to_container(v, resolve=False) if OmegaConf.is_config(v) else v
                       for v in (before, now))
        if json.dumps(before, default=str, sort_keys=True) != json.dumps(now, default=str, sort_keys=True):
            raise ConfigError(f"its run had {key}={before!r} and this command gives the job {key}={now!r} (the grid "
                              "changed or its values were reordered); give the sweep's values in their order, or "
                              "start a new sweep in a new hydra.sweep.dir")


def _preflight_eval(argv: list[str], config_dir: str, config_name: str) -> None:
    """eval.py's settings, checked before Hydra creates the eval's run dir (and its .hydra/, eval.log): a refused
    command leaves no directory behind. Nothing is written here, and only the checkpoint's data.json is read
    (prompt_file=- would read stdin)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from deepseek_mini.training.evaluate import check_eval_options, eval_data

    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv) or any(a in ("-m", "--multirun") for a in argv):
        return  # help output; a multirun's jobs are checked each in evaluate()
    overrides = [a for a in argv if not a.startswith("-")]
    plain = [a for a in overrides if not a.startswith(HYDRA_PREFIXES)]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=plain)
    check_eval_options(cfg)
    if not OmegaConf.is_missing(cfg, "ckpt_path") and cfg.ckpt_path:
        # the data to evaluate on (the checkpoint's data.json, data.* overrides): a setting its source ignores is refused
        eval_data(OmegaConf.to_container(cfg.data, resolve=True), Path(str(cfg.ckpt_path)).expanduser().resolve(),
                  plain)
    run_dir = _value(overrides, "hydra.run.dir")
    if run_dir is not None and not str(run_dir).strip():
        raise ConfigError("hydra.run.dir='': an empty path would be the current directory; give an eval dir")
    if run_dir is not None and any((Path(run_dir) / n).exists() for n in ("checkpoints", "results.json")):
        # eval's .hydra/ and eval.log would replace the training run's own records
        raise ConfigError(f"hydra.run.dir={run_dir} is a training run's dir; give the eval its own dir (the "
                          "default: logs/eval/runs/<time>)")


# what SIGTERM before Hydra runs says (train.py and eval.py say it during their imports too)
STOPPED_STARTING = {"train": "training started: nothing was trained or saved",
                    "eval": "evaluating: nothing was evaluated or written"}


def cli_entry(main, config_dir: str | os.PathLike, config_name: str, starting=None):
    """Run a `@hydra.main` function with one-line errors for composition problems and `last` resolution.

    SIGTERM during these checks is one line and rc 143 (STOPPED_STARTING), where the default action killed the
    process without a word; `starting` is the entry script's handler that said so during its imports. SIGTERM goes
    back to the default before Hydra runs, for train()'s own handling to take over (StopBeforeFit, then Lightning's
    checkpoint on SIGTERM), and however this returns or raises. A caller's own handler or SIG_IGN is kept."""

    def on_sigterm(signum, frame):
        print(f"interrupted (SIGTERM) before {STOPPED_STARTING.get(config_name, 'starting')}", file=sys.stderr)
        raise SystemExit(143)

    def hand_back():
        if signal.getsignal(signal.SIGTERM) in (on_sigterm, starting):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    @functools.wraps(main)
    def wrapped():
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, starting):
            signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return checked()
        except KeyboardInterrupt:  # Ctrl-C in the checks before Hydra, or where nothing below turned it into an exit
            print("interrupted (SIGINT): nothing was saved", file=sys.stderr)
            raise SystemExit(130) from None
        finally:
            hand_back()

    def checked():
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        full = os.environ.get("HYDRA_FULL_ERROR") == "1"
        try:
            if config_name == "train":
                sys.argv[1:] = _preflight_resume(sys.argv[1:], str(config_dir), config_name)
            elif config_name == "eval":
                _preflight_eval(sys.argv[1:], str(config_dir), config_name)
        except (CheckpointError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (HydraException, OmegaConfBaseException) as e:
            if full:
                raise
            print(f"error: {hydra_error_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        hand_back()
        if full:
            return main()
        os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra raise instead of printing; we print one line
        try:
            return main()
        except (HydraException, OmegaConfBaseException) as e:
            print(f"error: {hydra_error_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)

    return wrapped


__all__ = ["cli_entry"]
