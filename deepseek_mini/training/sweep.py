"""The jobs of a multirun, known before Hydra runs them: each job's number, overrides, config and directory.

Hydra's basic sweeper (the default) runs the cartesian product of the swept values: `hydra.sweeper.params`
first, then the command line's, in the order Hydra's own `BasicSweeper.split_arguments` gives, and the
launchers (basic, submitit local or SLURM) number the jobs 0, 1, ... and put job i in
`hydra.sweep.dir/hydra.sweep.subdir` with `hydra.job.num=i`. `sweep_jobs` expands the same product with that
same function, so `reliability.cli_entry` can check every job before the first one runs: a bad value in job 7
is refused at launch rather than after hours of jobs 0-6, and a resumed sweep (`hydra.sweep.dir=<old>
ckpt_path=last`) compares each job with what its own dir recorded before Hydra rewrites any of them.

Other sweepers (Optuna) choose their jobs while they run: `sweep_jobs` returns None for them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class SweepJob:
    num: int
    overrides: list[str]  # the job's own task overrides (swept values one by one), as its .hydra/overrides.yaml
    cfg: object  # DictConfig, composed with its hydra node; paths.output_dir set to `dir`
    dir: Path
    swept: list[str]  # the values that tell this job from the others (`model.kv_lora_rank=16 ...`)


def grid(task_overrides: list[str], params: dict | None = None) -> tuple[list[list[str]], set[str]]:
    """(each job's task overrides in job order, the swept keys) of a basic-sweeper multirun over `params`
    (hydra.sweeper.params) and the command line's `task_overrides`: what Hydra's BasicSweeper runs. A finished
    sweep's multirun.yaml holds both, so a report can name the jobs that never ran."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(
        [*(f"{k}={v}" for k, v in (params or {}).items()), *task_overrides])
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    jobs = itertools.chain.from_iterable(BasicSweeper.split_arguments(parsed, None))
    return [list(job) for job in jobs], swept


def configured_dir(node, key: str = "dir") -> str | None:
    """The run or sweep dir (`hydra.run` / `hydra.sweep` node) a config fixes, resolved; None for a timestamped one
    (`${now:...}`: a new dir each launch) or one that cannot be resolved before Hydra runs."""
    from omegaconf import OmegaConf

    raw = (OmegaConf.to_container(node, resolve=False) or {}).get(key)
    if raw is None or "${now:" in str(raw):
        return None
    try:
        return str(node[key])
    except Exception:  # ${hydra:...} and the like have no value yet
        return None


def sweep_jobs(config_dir: str, config_name: str, task_overrides: list[str],
               hydra_overrides: list[str]) -> tuple[list[SweepJob] | None, str | None]:
    """The jobs `python <entry> -m <hydra_overrides> <task_overrides>` will run, in order, or None when the
    sweeper is not Hydra's basic one; and the sweep dir a config fixes (configured_dir). Composing needs no write
    and runs no job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(task_overrides)
             if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        base = compose(config_name=config_name, overrides=[*hydra_overrides, *fixed], return_hydra_config=True)
        sweeper, sweep_dir = base.hydra.sweeper, configured_dir(base.hydra.sweep)
        if sweeper.get("_target_") != BASIC_SWEEPER:
            return None, sweep_dir
        params = sweeper.get("params")
        job_overrides, swept = grid(task_overrides, OmegaConf.to_container(params) if params else None)
        str(base.hydra.sweep.dir)  # resolves ${now:} once, into the cache each job's config copies
        jobs = []
        for num, overrides in enumerate(job_overrides):
            cfg = compose(config_name=config_name, overrides=[*hydra_overrides, *overrides],
                          return_hydra_config=True)
            OmegaConf.copy_cache(from_config=base, to_config=cfg)  # one ${now:} for all, as Hydra's launchers do
            with open_dict(cfg):
                cfg.hydra.job.num = num
                job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                cfg.paths.output_dir = str(job_dir)  # ${hydra:runtime.output_dir} has no value before Hydra runs
            jobs.append(SweepJob(num, list(overrides), cfg, job_dir,
                                 [o for o in overrides if o.split("=", 1)[0] in swept]))
    return jobs, sweep_dir
