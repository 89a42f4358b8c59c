"""train(cfg) and evaluate(cfg): what train.py and eval.py run, given a composed Hydra config.

Both are wrapped by `task_wrapper`: whatever happens, the wandb run is finished (exit code 1 on error),
so each job of a multirun gets its own wandb run, and memory is released between jobs. `cli_errors`
turns the user's mistakes (bad model config, missing data, unreadable checkpoint) into a one-line
message and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from deepseek_mini.checkpoint import CheckpointError
from deepseek_mini.config import ConfigError, ModelConfig, count_parameters
from deepseek_mini.data import DataError
from deepseek_mini.training.sizing import apply_sizing, wandb_sweep_fields

log = logging.getLogger(__name__)

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError, DataError)  # one line, exit status 2


# ---------------------------------------------------------------------- wrappers
def _finish_wandb(exit_code: int) -> None:
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        _log_to_files(logging.INFO, f"closing wandb run {wandb.run.id}")  # the run summary stays the last line
        wandb.finish(exit_code=exit_code)


def _log_to_files(level: int, msg: str) -> None:
    """Record a message in train.log only (the console gets the one-line `error:` from cli_errors)."""
    record = log.makeRecord(log.name, level, __file__, 0, msg, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _job_dir(cfg: DictConfig) -> Path | None:
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
    def wrapped(cfg: DictConfig):
        from deepseek_mini.training.reliability import TrainingFault, fault_message, is_oom

        failed = True
        multirun = "sweep_dir" in _hydra_info()
        try:
            out = fn(cfg)
            failed = False
            return out
        except Exception as e:
            expected = isinstance(e, (*USER_ERRORS, TrainingFault)) or is_oom(e)
            msg = fault_message(e) if expected else f"{type(e).__name__}: {fault_message(e)}"
            if not multirun:
                if expected:
                    _log_to_files(logging.ERROR, f"{type(e).__name__}: {msg}")
                else:
                    log.exception("run failed")
                raise
            job = _hydra_info().get("job_num")
            if expected:
                log.error("job %s failed: %s", job, msg)
            else:
                log.exception("job %s failed: %s", job, msg)
            out_dir = _job_dir(cfg)
            result = {"status": "failed", "error": msg, "error_type": type(e).__name__, "job_num": job,
                      "overrides": _hydra_info().get("overrides", [])}
            if out_dir is not None:
                result["run_dir"] = str(out_dir.resolve())
                _write_json(out_dir / "results.json", result)
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
    fault (non-finite loss, CUDA out of memory) prints `error: <message>` and exits with status 1."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        from deepseek_mini.training.reliability import TrainingFault, fault_message, is_oom

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as e:
            if not (isinstance(e, TrainingFault) or is_oom(e)):
                raise
            print(f"error: {fault_message(e)}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapped


# ---------------------------------------------------------------------- helpers
def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def model_config_from(cfg: DictConfig) -> ModelConfig:
    """cfg.model -> validated ModelConfig (raises ConfigError before any data is prepared)."""
    if "model" not in cfg or cfg.model is None:
        raise ConfigError("no model config: choose one with model=<preset>")
    # `sizing:` (sweep experiments): iso-FLOP expert widths etc., see deepseek_mini/training/sizing.py
    return ModelConfig.from_dict(apply_sizing(_container(cfg.model), _container(cfg.get("sizing"))))


def resolve_precision(trainer_cfg: dict) -> str:
    precision = str(trainer_cfg.get("precision", "auto"))
    if precision != "auto":
        return precision
    accel = str(trainer_cfg.get("accelerator", "auto"))
    gpu = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    return "bf16-mixed" if gpu else "32-true"


def _hydra_info() -> dict:
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


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except Exception:
        return False


def build_loggers(cfg: DictConfig, output_dir: Path, resume_step: int | None = None) -> list:
    """Instantiate cfg.logger.*. On resume (`resume_step` set) the CSV logger keeps the earlier rows and
    wandb continues the run whose id is stored in <run dir>/wandb_run_id.txt."""
    import hydra

    from deepseek_mini.training.reliability import read_wandb_run_id, wandb_online_problem

    loggers = []
    node = cfg.get("logger")
    if not node:
        return loggers
    hinfo = _hydra_info()
    for name, lg_cfg in node.items():
        if lg_cfg is None or "_target_" not in lg_cfg:
            continue
        kwargs = {}
        if "WandbLogger" in lg_cfg._target_:
            problem = None if lg_cfg.get("offline", True) else wandb_online_problem()
            if problem:  # never let logging kill training
                msg = (f"logger.wandb.offline=false but {problem}; logging offline instead "
                       "(upload later with `wandb sync`)")
                log.warning(msg)
                warnings.warn(msg, stacklevel=2)
                kwargs["offline"] = True
            run_id = read_wandb_run_id(output_dir) if resume_step is not None else None
            if run_id and lg_cfg.get("id") is None:
                kwargs.update(id=run_id, resume="allow")
                log.info("resuming wandb run %s", run_id)
            if lg_cfg.get("name") is None:
                kwargs["name"] = (f"{Path(hinfo['sweep_dir']).name}/{hinfo['job_num']}" if "sweep_dir" in hinfo
                                  else output_dir.name)
            if lg_cfg.get("group") in (None, cfg.get("task_name")) and "sweep_dir" in hinfo:
                kwargs["group"] = f"{cfg.get('task_name')}-{Path(hinfo['sweep_dir']).name}"  # one group per sweep
            os.makedirs(lg_cfg.get("save_dir") or output_dir, exist_ok=True)
        if lg_cfg._target_ in ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger"):
            lg_cfg = OmegaConf.merge(lg_cfg, {"_target_": "deepseek_mini.training.reliability.ResumableCSVLogger"})
            kwargs["resume_step"] = resume_step
        loggers.append(hydra.utils.instantiate(lg_cfg, **kwargs))
        log.info("logger %s: %s", name, type(loggers[-1]).__name__)
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    import hydra

    out = []
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if cb_cfg is None or "_target_" not in cb_cfg:
            continue
        out.append(hydra.utils.instantiate(cb_cfg))
        log.debug("callback %s: %s", name, type(out[-1]).__name__)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def optimized_metric(cfg: DictConfig, results: Any) -> float | None:
    """The value a Hydra sweeper (Optuna) minimizes: results[cfg.optimized_metric], inf if missing or NaN."""
    metric = cfg.get("optimized_metric")
    if not metric or not isinstance(results, dict):
        return None
    value = results.get(metric)
    return float("inf") if value is None or value != value else float(value)  # NaN/None would crash Optuna


def model_stats(model_cfg: ModelConfig) -> dict:
    counts = count_parameters(model_cfg)
    return {"params_total": counts.total, "params_active": counts.active,
            "kv_cache_bytes_per_token": model_cfg.kv_cache_bytes_per_token(2)}  # bf16 cache


# ---------------------------------------------------------------------- train
@task_wrapper
def train(cfg: DictConfig) -> dict:
    import hydra
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy

    from deepseek_mini.training.callbacks import CheckpointDirDescriber, ThroughputMonitor
    from deepseek_mini.training.console import quiet_console
    from deepseek_mini.training.loggers import write_readable_run
    from deepseek_mini.training.module import LitDeepSeek
    from deepseek_mini.training.reliability import (
        AtomicCheckpointIO,
        NonFiniteLossGuard,
        RNGStateCallback,
        check_config,
        checkpoint_global_step,
        fault_injector_from_env,
        resolve_ckpt_path,
        write_wandb_run_id,
    )
    from deepseek_mini.training.strategies import build_strategy, global_batch
    from deepseek_mini.training.summary import format_summary
    from deepseek_mini.training.threads import set_cpu_threads

    t_start = time.perf_counter()
    quiet_console()  # library noise (litlogger tip, LeafSpec, matplotlib DEBUG, ...): see training/console.py
    set_cpu_threads(cfg.get("cpu_threads", "auto"), cfg.trainer)  # before any torch work; training/threads.py
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:  # validate before the (slow) data preparation; name keys as the user writes them (model.x)
        model_cfg = model_config_from(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("ModelConfig.", "model.").replace("ModelConfig:", "model:")) from None
    check_config(cfg, model_cfg)
    # ckpt_path=last / resume=true: <this run dir>/checkpoints/last.ckpt (cli_entry picks the latest run when
    # no hydra.run.dir is given); any checkpoint is checked for truncation/corruption before data prep
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, resume=bool(cfg.get("resume", False)))
    resume_step = checkpoint_global_step(ckpt_path) if ckpt_path is not None else None
    if ckpt_path is not None:
        log.info("resuming from %s (global step %s)", ckpt_path, resume_step)
    L.seed_everything(cfg.seed, workers=True)

    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    if dm.vocab_size != model_cfg.vocab_size:
        log.warning("tokenizer has %d tokens, model.vocab_size=%d: using the tokenizer's size",
                    dm.vocab_size, model_cfg.vocab_size)
        model_cfg = model_cfg.replace(vocab_size=dm.vocab_size)
    if dm.seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len={dm.seq_len} exceeds model.max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}")
    stats = model_stats(model_cfg)
    log.info("model: %s attention, %.2fM parameters (%.2fM active), %d KV-cache bytes/token",
             model_cfg.attention, stats["params_total"] / 1e6, stats["params_active"] / 1e6,
             stats["kv_cache_bytes_per_token"])

    trainer_kwargs = _container(cfg.trainer)
    trainer_kwargs.pop("_target_", None)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs)
    build_strategy(trainer_kwargs)  # trainer.strategy may be a node with a _target_ (ddp, fsdp)
    module = LitDeepSeek(model_cfg.to_dict(), optim=_container(cfg.optim), scheduler=_container(cfg.scheduler),
                         compile=cfg.get("compile", False), max_steps=int(trainer_kwargs["max_steps"]),
                         log_every_n_steps=int(trainer_kwargs.get("log_every_n_steps", 10)))

    callbacks = build_callbacks(cfg)
    ckpt_cb = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    ckpt_dir = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else output_dir / "checkpoints"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["model"] = model_cfg.to_dict()
    callbacks.append(CheckpointDirDescriber(ckpt_dir, resolved))
    callbacks += [RNGStateCallback(), NonFiniteLossGuard(ckpt_dir)]
    injector = fault_injector_from_env(_hydra_info().get("job_num"))  # test hook (DSMINI_FAULT)
    if injector is not None:
        callbacks.append(injector)
    throughput = next((c for c in callbacks if isinstance(c, ThroughputMonitor)), None)
    loggers = build_loggers(cfg, output_dir, resume_step=resume_step)
    if not loggers:  # LearningRateMonitor refuses to run without a logger; train/lr is logged anyway
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]

    plugins = trainer_kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(hasattr(p, "save_checkpoint") for p in plugins):
        plugins.append(AtomicCheckpointIO())  # write elsewhere, fsync, rename: never a partial last.ckpt
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    batch = global_batch(dm.batch_size, dm.seq_len, trainer.world_size, trainer.accumulate_grad_batches)
    log.info("global batch: %d sequences = %d tokens per optimizer step (data.batch_size=%d per device x %d ranks "
             "x accumulate_grad_batches=%d)", batch["global_batch_size"], batch["global_batch_tokens"],
             dm.batch_size, trainer.world_size, trainer.accumulate_grad_batches)
    hinfo = _hydra_info()
    for lg in loggers:
        # swept values (kv_lora_rank, n_routed_experts, attention, ...) also as top-level keys for wandb grouping
        lg.log_hyperparams({**wandb_sweep_fields(resolved["model"], hinfo.get("overrides")), **resolved,
                            "model_stats": stats, "hydra": hinfo})
        lg.log_metrics({f"model/{k}": float(v) for k, v in stats.items()}, step=0)
        if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero and lg.version:
            write_wandb_run_id(output_dir, str(lg.version))  # so ckpt_path=last continues this wandb run

    fast = bool(trainer_kwargs.get("fast_dev_run"))
    # Lightning's FSDP wraps the root module once per trainer entry point; a second entry (validate() before
    # or after fit()) finds the Blocks already wrapped, leaves the root's parameters (embeddings, head) as
    # flat shards and fails ("'weight' must be 2-D", seen on 2 H200s). Under FSDP all evaluation therefore
    # happens inside fit(), at trainer.val_check_interval.
    single_entry = isinstance(trainer.strategy, FSDPStrategy)
    if single_entry:
        log.info("FSDP: no validation before fit() or after it; val_loss is that of the last in-fit validation")
    val_loss_start = None
    if cfg.get("val_before_fit", True) and ckpt_path is None and not fast and not single_entry:
        val_loss_start = float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])
        log.info("val loss before training: %.4f", val_loss_start)

    t_fit = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
    fit_time = time.perf_counter() - t_fit
    train_loss = trainer.callback_metrics.get("train/loss")  # before a final validate() replaces callback_metrics

    checkpoint = best = None
    if not fast:
        if (not module.val_history or module.val_history[-1][0] != trainer.global_step) and not single_entry:
            trainer.validate(module, datamodule=dm, verbose=False)  # make val_loss describe the final weights
        if ckpt_cb is None or getattr(ckpt_cb, "_last_global_step_saved", -1) != trainer.global_step:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(ckpt_dir / "last.ckpt")
        checkpoint = str((ckpt_dir / "last.ckpt").resolve())
        best = ckpt_cb.best_model_path if ckpt_cb is not None and ckpt_cb.best_model_path else None
    val_loss = module.val_history[-1][1] if module.val_history else None  # fast_dev_run validates one batch too

    tokens_per_step = batch["global_batch_tokens"]
    tokens_seen = (throughput.tokens_seen if throughput and throughput.tokens_seen
                   else trainer.global_step * tokens_per_step)
    tps = throughput.tokens_per_sec if throughput and throughput.train_time else tokens_seen / max(fit_time, 1e-9)
    results = {
        "run_dir": str(output_dir.resolve()),
        "status": "completed",
        "resumed_from": str(ckpt_path) if ckpt_path is not None else None,
        "resumed_at_step": resume_step,
        "val_loss": val_loss,
        "val_loss_start": val_loss_start,
        "val_perplexity": math.exp(val_loss) if val_loss is not None and val_loss < 50 else None,
        "train_loss": float(train_loss) if train_loss is not None else None,
        "global_step": int(trainer.global_step),
        "tokens_seen": int(tokens_seen),
        "tokens_per_sec": float(tps),
        **batch,  # global_batch_size, global_batch_tokens, world_size, per-device batch, accumulation
        **stats,
        "checkpoint": checkpoint,
        "best_checkpoint": best,
        "fit_time_sec": round(fit_time, 2),
        "time_to_first_step_sec": (round(throughput.time_to_first_step, 2)
                                   if throughput and throughput.time_to_first_step is not None else None),
        "wall_time_sec": round(time.perf_counter() - t_start, 2),
        "val_history": module.val_history,
        "config": model_cfg.to_dict(),
        "data": {k: v for k, v in dm.describe().items() if k != "token_cache"},
        "overrides": hinfo.get("overrides", []),
    }
    if trainer.is_global_zero:
        _write_json(output_dir / "results.json", results)
        for lg in loggers:
            if hasattr(lg, "experiment") and type(lg).__name__ == "WandbLogger":
                lg.experiment.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float))})
        write_readable_run(output_dir, resolved, results)  # wandb/config.json + summary.json: offline runs readable
        print(format_summary(results), flush=True)  # the last thing on screen (training/summary.py)
    return results


# ---------------------------------------------------------------------- evaluate
@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    import hydra

    from deepseek_mini.checkpoint import load_checkpoint
    from deepseek_mini.generation_args import check_length, check_sampling, read_prompt
    from deepseek_mini.training.module import expert_load_stats

    if cfg.get("ckpt_path") in (None, "", "???"):
        raise CheckpointError("give the checkpoint to evaluate: python eval.py ckpt_path=<run>/checkpoints/last.ckpt")
    check_sampling(cfg)  # temperature, top_k, top_p, max_new_tokens: generation_args.py, as scripts/generate.py
    prompt = read_prompt(cfg)  # prompt=..., or prompt_file=<path> / - (stdin)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(cfg.ckpt_path).expanduser().resolve()
    device = cfg.get("device", "auto")
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    torch.manual_seed(cfg.seed)

    loaded = load_checkpoint(ckpt_path, map_location=device)
    model, mcfg = loaded.model.eval(), loaded.config
    folder = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent
    tok_path = next((p for p in (folder / "tokenizer.json", folder.parent / "tokenizer.json") if p.is_file()), None)
    if tok_path is None:
        raise CheckpointError(f"no tokenizer.json beside {ckpt_path}: cannot tokenize text for this model")
    from tokenizers import Tokenizer  # the prompt's length is checked before any data is prepared

    check_length(len(Tokenizer.from_file(str(tok_path)).encode(prompt).ids) or 1, int(cfg.max_new_tokens),
                 mcfg.max_position_embeddings)

    dm = hydra.utils.instantiate(cfg.data, tokenizer_path=str(tok_path), vocab_size=mcfg.vocab_size)
    dm.prepare()
    if dm.vocab_size > mcfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {dm.vocab_size} tokens but the model only {mcfg.vocab_size}")
    seq_len = min(dm.seq_len, mcfg.max_position_embeddings)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    limit = cfg.get("limit_batches")
    total_loss, n_batches, tpe = 0.0, 0, None
    with torch.no_grad(), autocast:
        for i, (x, y) in enumerate(dm.val_dataloader()):
            if limit is not None and i >= limit:
                break
            x, y = x[:, :seq_len].to(device), y[:, :seq_len].to(device)
            out = model(x, labels=y, return_logits=False)
            total_loss += float(out.loss)
            n_batches += 1
            if out.router_stats:
                batch_tpe = torch.stack([s["tokens_per_expert"].float() for s in out.router_stats])
                tpe = batch_tpe if tpe is None else tpe + batch_tpe
    loss = total_loss / max(1, n_batches)

    expert_load = []
    if tpe is not None:
        for layer, row in zip(mcfg.moe_layer_indices, tpe.cpu()):
            expert_load.append({"layer": layer, **{k: round(float(v), 4) for k, v in expert_load_stats(row).items()},
                                "tokens_per_expert": [int(v) for v in row.tolist()]})

    from deepseek_mini.inference import format_table, kv_cache_table, measure_kv_bytes, with_attention

    kv = {"computed_bf16": mcfg.kv_cache_bytes_per_token(2), "computed_fp32": mcfg.kv_cache_bytes_per_token(4)}
    if device.type == "cuda":  # measured: allocate the cache of one long generation and read the allocator
        n_tok = min(4096, mcfg.max_position_embeddings)
        measured = measure_kv_bytes(model, 1, n_tok, device=device, dtype=torch.bfloat16)
        kv["measured_bf16"] = measured["measured_bytes"] / n_tok

    tok = dm.tokenizer
    ids = tok.encode(prompt).ids or [dm.eos_token_id]
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    max_new = int(cfg.max_new_tokens)  # fits: check_length above
    with autocast:
        gen = model.generate(torch.tensor([ids], device=device), max_new, temperature=float(cfg.temperature),
                             top_k=int(cfg.top_k) if cfg.get("top_k") else None, top_p=cfg.get("top_p"),
                             generator=g)
    continuation = tok.decode(gen[0, len(ids):].tolist())

    result = {
        "run_dir": str(output_dir.resolve()),
        "checkpoint": str(ckpt_path),
        "tokenizer": str(tok_path),
        "data": dm.describe().get("source"),
        "val_batches": n_batches,
        "val_tokens": n_batches * dm.val_batch_size * seq_len,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 50 else None,
        "kv_cache_bytes_per_token": kv,
        **{k: v for k, v in model_stats(mcfg).items() if k != "kv_cache_bytes_per_token"},
        "expert_load": expert_load,
        "prompt": prompt,
        "sample": continuation,
        "config": mcfg.to_dict(),
        "device": str(device),
    }
    # the paper's comparison at this checkpoint's shape: the same model with MHA, GQA, MQA and MLA caches
    heads = mcfg.num_attention_heads
    groups = mcfg.num_key_value_heads if mcfg.attention == "gqa" else max(2, heads // 4)
    groups = groups if heads % groups == 0 else 1
    kv_rows = kv_cache_table({f"this shape/{a}": with_attention(mcfg, a, groups) for a in ("mha", "gqa", "mqa", "mla")})
    result["kv_cache_table"] = kv_rows
    _write_json(output_dir / "eval.json", result)
    print(format_table(kv_rows))
    for row in expert_load:
        print(f"MoE layer {row['layer']}: max/mean load {row['max_load']:.2f}, min/mean {row['min_load']:.2f}, "
              f"routing entropy {row['entropy']:.3f}")
    ppl = f"{result['perplexity']:.2f}" if result["perplexity"] is not None else "inf"
    print(f"loss {loss:.4f}  perplexity {ppl}  KV cache {kv['computed_bf16']} B/token (bf16)")
    print(f"prompt {prompt!r} -> {continuation!r}")
    print(f"run dir: {output_dir.resolve()}")
    return result
