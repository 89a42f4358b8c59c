"""The entry points' front door: `cli_entry`, and the reliability pieces re-exported from their own files.

`cli_entry(main, config_dir, config_name)` wraps a `@hydra.main` function. Before Hydra runs (and so before it
writes `.hydra/` or `train.log` into any run dir) a training command is composed once and checked:

* every run setting (`RunConfig`: optimizer, schedule, trainer, data, seed, a writable run dir, memory);
* `ckpt_path=last` / `resume=<true|yes|1...>` without `hydra.run.dir=` continues the latest run under
  `logs/<task>/runs/` that has `checkpoints/last.ckpt` (that run dir becomes the output dir); inside `-m`
  it needs `hydra.sweep.dir=<the sweep>` (each job resumes its own job dir);
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
import sys
from pathlib import Path

from deepseek_mini.checkpoint import CheckpointError
from deepseek_mini.config import ConfigError
from deepseek_mini.training.errors import (
    hydra_error_line,
)
from deepseek_mini.training.lock import acquire_run_lock, is_launcher_rank
from deepseek_mini.training.resume import (
    latest_run_with_checkpoint,
    resolve_ckpt_path,
    resume_overrides,
)
from deepseek_mini.training.summary import hydra_value

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


def _holds_a_run(run_dir: Path) -> bool:
    """A run that trained: checkpoints/last.ckpt, or a results.json that is not a failure's (a run that failed
    before its first checkpoint may be started again in its dir)."""
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        return True
    if not (run_dir / "results.json").is_file():
        return False
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") != "failed"
    except Exception:  # unreadable: not ours to replace
        return True


def _preflight_resume(argv: list[str], config_dir: str, config_name: str) -> list[str]:
    """Check a training command before Hydra writes anything; returns argv with the run dir (for `last`) and the
    run's recorded model/data settings (for a resume) added."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from deepseek_mini.training.run_config import RunConfig, as_bool

    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        return argv
    overrides = [a for a in argv if not a.startswith("-")]
    plain = [a for a in overrides if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra", "++hydra"))]
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
        if wants_last and _value(overrides, "hydra.sweep.dir") is None:
            raise ConfigError(f"{'ckpt_path=last' if ckpt_value == 'last' else 'resume=' + resume_value} with -m: "
                              "each job resumes its own <sweep dir>/<job>/checkpoints/last.ckpt; give "
                              "hydra.sweep.dir=<the sweep's dir>")
        return argv  # swept values (a=1,2) are composed per job; train() checks each
    resume = as_bool("resume", cfg.get("resume", False))
    ckpt = cfg.get("ckpt_path")
    ckpt = None if ckpt in (None, "", "null") else str(ckpt)
    run_dir = _value(overrides, "hydra.run.dir")
    if run_dir is None and (ckpt == "last" or resume and ckpt is None):
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
    if resume and ckpt not in (None, "last"):
        raise ConfigError(f"resume=true with ckpt_path={ckpt}: resume=true means ckpt_path=last (the run continues in "
                          "its own dir); give one of them (ckpt_path=<file> alone starts a new run from that file)")
    if run_dir is not None and ckpt is None and not resume and is_launcher_rank() and _holds_a_run(Path(run_dir)):
        # a fresh run there would replace its checkpoints, results and metrics, and mix the two runs' logs
        raise ConfigError(f"hydra.run.dir={run_dir} holds a run (its checkpoints or results.json); continue it "
                          "with ckpt_path=last, or give a new run dir")
    check_dir = Path(run_dir) if run_dir is not None else Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs"
    cfg.paths.output_dir = str(check_dir)  # ${hydra:runtime.output_dir} has no value before Hydra runs
    RunConfig.from_cfg(cfg, check_dir)  # every setting, before any write
    if ckpt is not None or resume:
        ckpt_file = resolve_ckpt_path(ckpt, check_dir, resume=resume)
        argv = [*argv, *resume_overrides(cfg, ckpt_file, plain)]
    if run_dir is not None:  # a known run dir: lock it before Hydra writes .hydra/ and train.log there
        acquire_run_lock(run_dir)
    return argv


def _preflight_eval(argv: list[str], config_dir: str, config_name: str) -> None:
    """eval.py's settings, checked before Hydra creates the eval's run dir (and its .hydra/, eval.log): a refused
    command leaves no directory behind. Nothing is read or written here (prompt_file=- would read stdin)."""
    from hydra import compose, initialize_config_dir

    from deepseek_mini.training.evaluate import check_eval_options

    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv) or any(a in ("-m", "--multirun") for a in argv):
        return  # help output; a multirun's jobs are checked each in evaluate()
    overrides = [a for a in argv if not a.startswith("-")]
    plain = [a for a in overrides if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra", "++hydra"))]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=plain)
    check_eval_options(cfg)
    run_dir = _value(overrides, "hydra.run.dir")
    if run_dir is not None and not str(run_dir).strip():
        raise ConfigError("hydra.run.dir='': an empty path would be the current directory; give an eval dir")
    if run_dir is not None and any((Path(run_dir) / n).exists() for n in ("checkpoints", "results.json")):
        # eval's .hydra/ and eval.log would replace the training run's own records
        raise ConfigError(f"hydra.run.dir={run_dir} is a training run's dir; give the eval its own dir (the "
                          "default: logs/eval/runs/<time>)")


def cli_entry(main, config_dir: str | os.PathLike, config_name: str):
    """Run a `@hydra.main` function with one-line errors for composition problems and `last` resolution."""

    @functools.wraps(main)
    def wrapped():
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
