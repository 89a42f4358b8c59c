"""train(cfg): what train.py runs, given a composed Hydra config, as a short sequence of named steps.

1. check every setting (RunConfig) and the checkpoint to resume from, before any data preparation or write;
2. lock the run dir, clear temporary files of a killed save;
3. prepare the data, build the LightningModule, callbacks, loggers and Trainer;
4. fit; Ctrl-C / SIGTERM saves last.ckpt and reports `"status": "interrupted"`, a failure `"status": "failed"`;
5. validate the final weights, checkpoint them, write results.json (counters cumulative over resumes);
6. under a distributed strategy, free the CUDA graphs and destroy the process group (so every rank exits).
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from deepseek_mini.config import ConfigError, ModelConfig
from deepseek_mini.training.checkpoint_io import (
    AtomicCheckpointIO,
    read_checkpoint_meta,
    remove_stale_temp_files,
)
from deepseek_mini.training.compile import compile_kernels_ahead, start_compile_workers
from deepseek_mini.training.console import quiet_console
from deepseek_mini.training.errors import fault_message, task_wrapper
from deepseek_mini.training.guards import (
    InterruptCheckpoint,
    NonFiniteLossGuard,
    RestoreSignalHandlers,
    StopBeforeFit,
    fault_injector_from_env,
)
from deepseek_mini.training.lock import acquire_run_lock, release_run_lock
from deepseek_mini.training.results import hydra_info, write_json
from deepseek_mini.training.resume import (
    ResumeSchedule,
    RNGStateCallback,
    RunHistory,
    check_max_steps,
    check_tokenizer,
    finished_results,
    finished_without_checkpoint,
    resolve_ckpt_path,
)
from deepseek_mini.training.run_config import RunConfig, check_val_fraction
from deepseek_mini.training.startup import mark, stage_seconds, start_job
from deepseek_mini.training.summary import hydra_value
from deepseek_mini.training.threads import set_cpu_threads

log = logging.getLogger(__name__)

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


@dataclass
class Resume:
    """The checkpoint this run continues from (path None: a fresh run)."""

    path: Path | None = None
    step: int | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Parts:
    """What fit() runs with."""

    trainer: Any
    module: Any
    dm: Any
    model_cfg: ModelConfig
    ckpt_dir: Path
    ckpt_cb: Any
    loggers: list
    batch: dict
    stats: dict
    history: RunHistory
    interrupt: InterruptCheckpoint
    resolved: dict = field(default_factory=dict)  # the resolved config, as recorded beside the checkpoints
    throughput: Any = None
    train_loss: Any = None  # read after fit(), before a final validate() replaces callback_metrics


# ---------------------------------------------------------------------- steps
def checkpoint_to_resume(run: RunConfig) -> Resume:
    sweep_job = "sweep_dir" in hydra_info()
    path = resolve_ckpt_path(run.ckpt_path, run.output_dir, resume=run.resume, sweep_job=sweep_job)
    if path is None:
        if sweep_job and (run.resume or run.ckpt_path == "last"):
            log.info("no checkpoint in %s: this job of the resumed sweep starts from step 0", run.output_dir)
        return Resume()
    meta = read_checkpoint_meta(path)
    check_max_steps(run.trainer.max_steps, meta, path)  # cli_entry checked it too; API callers and sweep jobs
    step = meta.get("global_step")
    log.info("resuming from %s (global step %s)", path, step)
    return Resume(path, int(step) if step is not None else None, meta)


def _checkpoint_dir(cfg: DictConfig, output_dir: Path) -> Path:
    node = (cfg.get("callbacks") or {}).get("model_checkpoint")
    dirpath = node.get("dirpath") if node is not None else None
    return Path(str(dirpath)) if dirpath else output_dir / "checkpoints"


def prepare_data(cfg: DictConfig, run: RunConfig, resume: Resume):
    """The data module (tokenizer and token caches built or found) and the model config for its tokenizer."""
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    model_cfg = run.model
    if dm.vocab_size != model_cfg.vocab_size:
        log.warning("tokenizer has %d tokens, model.vocab_size=%d: using the tokenizer's size",
                    dm.vocab_size, model_cfg.vocab_size)
        model_cfg = model_cfg.replace(vocab_size=dm.vocab_size)
    if dm.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len={dm.seq_len} exceeds model.max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}")
    if resume.path is not None:
        check_tokenizer(dm.tokenizer_path, resume.meta, resume.path)
    if hasattr(dm, "setup") and hasattr(dm, "val_batch_size"):  # its validation windows (ours: TextDataModule)
        dm.setup("fit")
        if (val := getattr(dm, "val_dataset", None)) is not None:
            check_val_fraction(run.trainer.limit_val_batches, len(val), dm.val_batch_size, run.trainer.world_size)
    return dm, model_cfg


def build_parts(cfg: DictConfig, run: RunConfig, resume: Resume, dm, model_cfg: ModelConfig) -> Parts:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from deepseek_mini.training.callbacks import ThroughputMonitor
    from deepseek_mini.training.checkpointing import CheckpointDirDescriber
    from deepseek_mini.training.module import LitDeepSeek
    from deepseek_mini.training.run import build_callbacks, build_loggers, model_stats
    from deepseek_mini.training.sizing import wandb_sweep_fields
    from deepseek_mini.training.strategies import build_trainer_nodes, global_batch

    stats = model_stats(model_cfg)
    log.info("model: %s attention, %.2fM parameters (%.2fM active), %d KV-cache bytes/token",
             model_cfg.attention, stats["params_total"] / 1e6, stats["params_active"] / 1e6,
             stats["kv_cache_bytes_per_token"])
    trainer_kwargs = run.trainer.trainer_kwargs()
    build_trainer_nodes(trainer_kwargs)  # trainer.strategy (ddp, fsdp, ep) and any other _target_ node

    callbacks = build_callbacks(cfg)
    ckpt_cb = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    ckpt_dir = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else run.output_dir / "checkpoints"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["model"] = model_cfg.to_dict()
    history, interrupt = RunHistory(), InterruptCheckpoint(ckpt_dir / "last.ckpt")
    callbacks += [CheckpointDirDescriber(ckpt_dir, resolved), RNGStateCallback(), NonFiniteLossGuard(ckpt_dir),
                  history, ResumeSchedule(run.optim.lr, run.scheduler.to_dict()), interrupt]
    injector = fault_injector_from_env(hydra_info().get("job_num"))  # test hook (DSMINI_FAULT)
    if injector is not None:
        callbacks.append(injector)
    throughput = next((c for c in callbacks if isinstance(c, ThroughputMonitor)), None)
    loggers = build_loggers(cfg, run.output_dir, resume_step=resume.step)
    if not loggers:  # LearningRateMonitor refuses to run without a logger; train/lr is logged anyway
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]

    plugins = trainer_kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(hasattr(p, "save_checkpoint") for p in plugins):
        plugins.append(AtomicCheckpointIO())  # write elsewhere, fsync, rename: never a partial last.ckpt
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    # The weights are created and initialised where they will train (the strategy's device: this rank's GPU;
    # FSDP and CPU runs: the CPU, as before): drawing 0.7B normal values on the host took ~7 s of a `small` run's
    # start, the 10B of experiment=ep_big_gpu about 3 minutes per rank.
    with trainer.strategy.tensor_init_context(empty_init=False):
        module = LitDeepSeek(model_cfg.to_dict(), optim=run.optim_dict(), scheduler=run.scheduler.to_dict(),
                             compile=run.compile or False, max_steps=run.trainer.max_steps,
                             log_every_n_steps=run.trainer.log_every_n_steps)
    batch = global_batch(dm.batch_size, dm.seq_len, trainer.world_size, trainer.accumulate_grad_batches)
    log.info("global batch: %d sequences = %d tokens per optimizer step (data.batch_size=%d per device x %d ranks "
             "x accumulate_grad_batches=%d)", batch["global_batch_size"], batch["global_batch_tokens"],
             dm.batch_size, trainer.world_size, trainer.accumulate_grad_batches)
    _log_hyperparams(loggers, trainer, run.output_dir, resolved, stats, wandb_sweep_fields)
    return Parts(trainer, module, dm, model_cfg, ckpt_dir, ckpt_cb, loggers, batch, stats, history, interrupt,
                 resolved, throughput)


def _log_hyperparams(loggers, trainer, output_dir: Path, resolved: dict, stats: dict, sweep_fields) -> None:
    from deepseek_mini.training.loggers import write_wandb_run_id

    hinfo = hydra_info()
    for lg in loggers:
        # swept values (kv_lora_rank, n_routed_experts, attention, ...) also as top-level keys for wandb grouping
        lg.log_hyperparams({**sweep_fields(resolved["model"], hinfo.get("overrides")), **resolved,
                            "model_stats": stats, "hydra": hinfo})
        lg.log_metrics({f"model/{k}": float(v) for k, v in stats.items()}, step=0)
        if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero and lg.version:
            write_wandb_run_id(output_dir, str(lg.version))  # so ckpt_path=last continues this wandb run


def _single_entry(trainer) -> bool:
    # Lightning's FSDP wraps the root module once per trainer entry point; a second entry (validate() before
    # or after fit()) finds the Blocks already wrapped, leaves the root's parameters (embeddings, head) as
    # flat shards and fails ("'weight' must be 2-D", seen on 2 H200s). Under FSDP all evaluation therefore
    # happens inside fit(), at trainer.val_check_interval.
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def _validate(p: Parts) -> list[dict]:
    """The run's own validations (before fit, and on the final weights after it), outside any trainer.profiler:
    the profiler is there for the fit, which it reports when fit() ends, and Lightning's PyTorchProfiler
    (`+trainer.profiler=pytorch`) fails in the teardown of a validate() entry ("Profiler must be initialized
    before accessing events"), which ended such a run with a traceback and no results.json."""
    from lightning.pytorch.profilers import PassThroughProfiler

    profiler, p.trainer.profiler = p.trainer.profiler, PassThroughProfiler()
    try:
        return p.trainer.validate(p.module, datamodule=p.dm, verbose=False)
    finally:
        p.trainer.profiler = profiler


def validate_before_fit(run: RunConfig, resume: Resume, p: Parts) -> None:
    fast = bool(run.trainer.extra.get("fast_dev_run"))
    if _single_entry(p.trainer):
        log.info("FSDP: no validation before fit() or after it; val_loss is that of the last in-fit validation")
    if run.val_before_fit and resume.path is None and not fast and not _single_entry(p.trainer):
        # no eval-graph compilation before the first step, and the weights stay where fit() trains them
        # (LitDeepSeek.eager, .kept_on_device)
        with p.module.eager(), p.module.kept_on_device():
            p.history.val_loss_start = float(_validate(p)[0]["val/loss"])
        log.info("val loss before training: %.4f", p.history.val_loss_start)


def resume_command(output_dir: Path) -> str:
    """The command that continues this run; for a sweep job, the sweep's own command line into its sweep dir (its
    finished jobs are kept, the others continue or start)."""
    info = hydra_info()
    if "sweep_dir" in info:
        drop, args, where = ("ckpt_path", "resume", "hydra.sweep.dir"), sys.argv[1:], info["sweep_dir"]
        keep = [a for a in args if a.split("=", 1)[0].lstrip("+~") not in drop]
        return " ".join(["python train.py", *map(shlex.quote, keep),
                         shlex.quote(f"hydra.sweep.dir={hydra_value(Path(where).resolve())}"), "ckpt_path=last"])
    keep = [o for o in info.get("overrides", [])
            if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "resume", "hydra.run.dir")]
    return " ".join(["python train.py", *map(shlex.quote, keep),
                     shlex.quote(f"hydra.run.dir={hydra_value(output_dir)}"), "ckpt_path=last"])


def fit(cfg: DictConfig, run: RunConfig, resume: Resume, p: Parts, t_start: float) -> float:
    """trainer.fit, turning an interrupt into a saved checkpoint + results.json, and a failure into results.json."""
    t_fit = time.perf_counter()
    try:
        p.trainer.fit(p.module, datamodule=p.dm, ckpt_path=str(resume.path) if resume.path is not None else None)
        p.train_loss = p.trainer.callback_metrics.get("train/loss")
    except SystemExit:  # Lightning's SIGTERMException, or its exit after a second Ctrl-C
        name = p.interrupt.signal_name
        if name is None:
            raise
        saved = p.interrupt.saved
        _write_results(p, results(cfg, run, resume, p, t_start, time.perf_counter() - t_fit, status="interrupted",
                                  extra={"signal": name, "checkpoint": str(saved) if saved else None}))
        where = f"checkpoint saved: {saved}" if saved else "no checkpoint saved"
        then = f"resume with: {resume_command(run.output_dir)}" if (p.ckpt_dir / "last.ckpt").exists() else \
            "nothing to resume: start again with the same command"
        print(f"interrupted ({name}) at step {p.trainer.global_step}; {where}\n{then}", file=sys.stderr)
        raise SystemExit(EXIT_CODES.get(name, 1)) from None
    except Exception as e:
        _write_results(p, results(cfg, run, resume, p, t_start, time.perf_counter() - t_fit, status="failed",
                                  extra={"error": fault_message(e), "error_type": type(e).__name__}))
        raise
    return time.perf_counter() - t_fit


def finish(run: RunConfig, p: Parts) -> tuple[str | None, str | None]:
    """Validate the final weights unless the last step was validated, checkpoint them; (last, best) paths."""
    if run.trainer.extra.get("fast_dev_run"):
        return None, None
    trainer, module = p.trainer, p.module
    p.history.merge_into(module, trainer.global_step)  # a finished run resumed: fit() ran no train start
    if (not module.val_history or module.val_history[-1][0] != trainer.global_step) and not _single_entry(trainer):
        _validate(p)  # make val_loss describe the final weights
    if p.ckpt_cb is None or getattr(p.ckpt_cb, "_last_global_step_saved", -1) != trainer.global_step:
        p.ckpt_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(p.ckpt_dir / "last.ckpt")
    best = p.ckpt_cb.best_model_path if p.ckpt_cb is not None and p.ckpt_cb.best_model_path else None
    if best is not None and (Path(best).resolve().parent != p.ckpt_dir.resolve() or not Path(best).exists()):
        best = None  # the restored ModelCheckpoint state may name another run's file (FSDP's is a directory)
    return str((p.ckpt_dir / "last.ckpt").resolve()), best


def results(cfg: DictConfig, run: RunConfig, resume: Resume, p: Parts, t_start: float, fit_time: float,
            status: str = "completed", checkpoint: str | None = None, best: str | None = None,
            extra: dict | None = None) -> dict:
    """results.json: counters over the whole run (every resume included), times of this process."""
    trainer, module = p.trainer, p.module
    train_loss = p.train_loss if p.train_loss is not None else trainer.callback_metrics.get("train/loss")
    val_loss = module.val_history[-1][1] if module.val_history else None  # fast_dev_run validates one batch too
    steps = int(trainer.global_step) - (resume.step or 0)
    tokens_seen = p.dm.samples_seen() * p.dm.seq_len
    tokens_now = steps * p.batch["global_batch_tokens"]
    tps = None
    if steps > 0:
        tps = (p.throughput.tokens_per_sec if p.throughput is not None and p.throughput.train_time
               else tokens_now / max(fit_time, 1e-9))
    out = {
        "run_dir": str(run.output_dir.resolve()),
        "status": status,
        "resumed_from": str(resume.path) if resume.path is not None else None,
        "resumed_at_step": resume.step,
        "val_loss": val_loss,  # the mean over val_tokens target tokens (training/val_loss.py), as eval.py reports
        "val_tokens": module.val_tokens if val_loss is not None else None,
        "val_loss_start": p.history.val_loss_start,
        "val_perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "train_loss": float(train_loss) if train_loss is not None else None,
        "global_step": int(trainer.global_step),
        "steps_trained": steps,  # by this process
        "tokens_seen": int(tokens_seen),  # by the whole run
        "tokens_per_sec": float(tps) if tps is not None else None,
        **p.batch,  # global_batch_size, global_batch_tokens, world_size, per-device batch, accumulation
        **p.stats,
        "checkpoint": checkpoint,
        "best_checkpoint": best,
        "fit_time_sec": round(fit_time, 2),
        # from the process launch (training/startup.py); fit_to_first_step_sec: the part from trainer.fit();
        # compile_time_sec: torch.compile's seconds in it
        "time_to_first_step_sec": _first_step_secs(p, "time_to_first_step"),
        "fit_to_first_step_sec": _first_step_secs(p, "fit_to_first_step"),
        "compile_time_sec": _first_step_secs(p, "compile_time"),
        # the graphs compiled before the first step: found in Inductor's on-disk cache (a warm start) / compiled
        "first_step_graphs": getattr(p.throughput, "graphs", None),
        # the parts before fit(): launch (Python, imports, Hydra), data, model (+ trainer), validation (before
        # training); with fit_to_first_step_sec they add up to time_to_first_step_sec
        "startup_sec": stage_seconds(),
        "compile": run.compile,  # what was compiled and how ("regional", "full:reduce-overhead"), None: eager
        "wall_time_sec": round(time.perf_counter() - t_start, 2),
        # this rank's peak of torch's allocator (rank 0 writes results.json); None on CPU
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if torch.cuda.is_available() and torch.cuda.is_initialized() else None),
        "val_history": module.val_history,
        "config": p.model_cfg.to_dict(),
        "data": {k: v for k, v in p.dm.describe().items() if k != "token_cache"},
        "overrides": hydra_info().get("overrides", []),
        "optim": run.optim_dict(),
        "scheduler": run.scheduler.to_dict(),
    }
    out.update(extra or {})
    return out


def _first_step_secs(p: Parts, name: str) -> float | None:
    value = getattr(p.throughput, name, None) if p.throughput is not None else None
    return round(value, 2) if value is not None else None


def _write_results(p: Parts, res: dict) -> None:
    if not p.trainer.is_global_zero:
        return
    path = Path(res["run_dir"]) / "results.json"
    try:
        write_json(path, res)
    except OSError as e:  # a full or read-only disk: the one-line error of the failure itself is what matters
        log.error("cannot write %s: %s", path, e)


def report(p: Parts, res: dict) -> None:
    """results.json, the wandb summary and the end-of-run summary block."""
    from deepseek_mini.training.loggers import write_readable_run
    from deepseek_mini.training.summary import format_summary

    _write_results(p, res)
    if not p.trainer.is_global_zero:
        return
    for lg in p.loggers:
        if hasattr(lg, "experiment") and type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update({k: v for k, v in res.items() if isinstance(v, (int, float))})
    write_readable_run(res["run_dir"], p.resolved, res)  # wandb/config.json + summary.json: offline runs readable
    print(format_summary(res), flush=True)  # the last thing on screen (training/summary.py)


# ---------------------------------------------------------------------- train
@task_wrapper
def train(cfg: DictConfig) -> dict:
    import lightning as L

    from deepseek_mini.training.strategies import release_process_group

    # time_to_first_step_sec and wall_time_sec count from the process launch (training/startup.py)
    t_start = start_job()
    output_dir = Path(cfg.paths.output_dir)
    quiet_console()  # library noise (litlogger tip, LeafSpec, matplotlib DEBUG, ...): see training/console.py
    run = RunConfig.from_cfg(cfg, output_dir)  # every setting, before data preparation or any write
    set_cpu_threads(run.cpu_threads, cfg.trainer)  # before any torch work; checked in RunConfig; training/threads.py
    log.info(run.summary((cfg.get("data") or {}).get("source")))
    done = finished_without_checkpoint(output_dir, run.ckpt_path, run.resume, run.trainer.max_steps)
    gone = done is not None
    if not gone:
        resume = checkpoint_to_resume(run)  # verified (zip/CRC) before data preparation
        if run.trainer.max_steps == resume.step:
            done = finished_results(output_dir, resume.step)
    if done is not None:
        # nothing to train, and re-reporting would lose what fit() measured (a resumed sweep re-runs finished jobs)
        step = run.trainer.max_steps
        print(f"{output_dir}: the run completed at step {step}{' (its checkpoints are gone)' if gone else ''}; "
              f"nothing to train, its records are kept (give trainer.max_steps > {step} to train on"
              f"{', from a checkpoint' if gone else ''})", file=sys.stderr)
        return done
    if run.compile and run.trainer.on_gpu:
        start_compile_workers()  # Inductor's compile workers start while the data and model are prepared
    if run.trainer.single_gpu is not None:  # our Triton kernels compile meanwhile too (other ranks: at fit start)
        compile_kernels_ahead(run.model, run.trainer.trainer_kwargs()["precision"], run.trainer.single_gpu)
    acquire_run_lock(output_dir)
    with RestoreSignalHandlers():  # however the run ends, Ctrl-C works as before it (guards.py)
        try:
            remove_stale_temp_files(_checkpoint_dir(cfg, output_dir))
            L.seed_everything(run.seed, workers=True)
            parts = None
            # before the first step a Ctrl-C or SIGTERM has nothing to save: say so and exit as an interrupt does
            with StopBeforeFit() as stop:
                try:
                    dm, model_cfg = prepare_data(cfg, run, resume)
                    mark("data")
                    parts = build_parts(cfg, run, resume, dm, model_cfg)
                    mark("model")
                    validate_before_fit(run, resume, parts)
                    mark("validation")
                except (KeyboardInterrupt, SystemExit) as e:
                    from lightning.pytorch.trainer.states import TrainerStatus

                    # Lightning turns an interrupt inside trainer.validate() into sys.exit(1), the trainer marked so
                    lightning_stop = parts is not None and parts.trainer.state.status == TrainerStatus.INTERRUPTED
                    if isinstance(e, SystemExit) and not lightning_stop:
                        raise
                    name = stop.signal_name or "SIGINT"
                    print(f"interrupted ({name}) before training started: nothing was trained or saved; start again "
                          "with the same command", file=sys.stderr)
                    raise SystemExit(EXIT_CODES[name]) from None
            fit_time = fit(cfg, run, resume, parts, t_start)
            checkpoint, best = finish(run, parts)
            res = results(cfg, run, resume, parts, t_start, fit_time, checkpoint=checkpoint, best=best)
            report(parts, res)
            release_process_group()  # 6. every rank, once communication is over (training/strategies.py)
            return res
        finally:
            release_run_lock(output_dir)
