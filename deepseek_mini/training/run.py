"""evaluate(cfg) and the builders train() shares: loggers, callbacks, model statistics.

`train` lives in training/train.py; `task_wrapper` / `cli_errors` in training/errors.py. They are re-exported
here, so `from deepseek_mini.training.run import train, evaluate, cli_errors, optimized_metric` keeps working.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from deepseek_mini.checkpoint import CheckpointError
from deepseek_mini.config import ModelConfig, count_parameters
from deepseek_mini.training.errors import USER_ERRORS, cli_errors, task_wrapper
from deepseek_mini.training.results import hydra_info as _hydra_info
from deepseek_mini.training.results import optimized_metric
from deepseek_mini.training.results import write_json as _write_json
from deepseek_mini.training.run_config import model_config_from, resolve_precision

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, output_dir: Path, resume_step: int | None = None) -> list:
    """Instantiate cfg.logger.*. On resume (`resume_step` set) the CSV logger keeps the earlier rows and
    wandb continues the run whose id is stored in <run dir>/wandb_run_id.txt."""
    import hydra

    from deepseek_mini.training.loggers import fold_offline_runs, read_wandb_run_id, wandb_online_problem

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
                # a resume that was killed before wandb.finish left its own directory: fold it in now
                fold_offline_runs(Path(lg_cfg.get("save_dir") or output_dir) / "wandb", run_id)
                log.info("resuming wandb run %s", run_id)
            if lg_cfg.get("name") is None:
                kwargs["name"] = (f"{Path(hinfo['sweep_dir']).name}/{hinfo['job_num']}" if "sweep_dir" in hinfo
                                  else output_dir.name)
            if lg_cfg.get("group") in (None, cfg.get("task_name")) and "sweep_dir" in hinfo:
                kwargs["group"] = f"{cfg.get('task_name')}-{Path(hinfo['sweep_dir']).name}"  # one group per sweep
            os.makedirs(lg_cfg.get("save_dir") or output_dir, exist_ok=True)
        if lg_cfg._target_ in ("lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger"):
            lg_cfg = OmegaConf.merge(lg_cfg, {"_target_": "deepseek_mini.training.loggers.ResumableCSVLogger"})
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


def model_stats(model_cfg: ModelConfig) -> dict:
    counts = count_parameters(model_cfg)
    return {"params_total": counts.total, "params_active": counts.active, "params_mtp": counts.mtp,
            "kv_cache_bytes_per_token": model_cfg.kv_cache_bytes_per_token(2)}  # bf16 cache


# ---------------------------------------------------------------------- evaluate
@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    """eval.py: the steps of deepseek_mini/training/evaluate.py, then the prompt's continuation, eval.json."""
    from torch.utils.data import DataLoader, Subset

    from deepseek_mini.checkpoint import load_checkpoint, tokenizer_file
    from deepseek_mini.data import load_tokenizer
    from deepseek_mini.generation_args import check_length, read_prompt
    from deepseek_mini.training import evaluate as steps

    settings = steps.check_eval_settings(cfg)  # before anything is loaded (sampling settings included)
    prompt = read_prompt(cfg)  # prompt=..., or prompt_file=<path> / - (stdin)
    device = settings.device
    torch.manual_seed(settings.seed)
    loaded = load_checkpoint(settings.ckpt_path, map_location=device)  # verified: a damaged file is refused
    model, mcfg = loaded.model.eval(), loaded.config
    tok_path = tokenizer_file(settings.ckpt_path)
    if tok_path is None:
        raise CheckpointError(f"no tokenizer.json beside {settings.ckpt_path}: cannot tokenize text for this model")
    tok = load_tokenizer(str(tok_path))  # its size against the model's: load_checkpoint checked it
    check_length(len(tok.encode(prompt).ids) or 1, int(cfg.max_new_tokens), mcfg.max_position_embeddings)
    data, data_from, validated = steps.eval_data(OmegaConf.to_container(cfg.data, resolve=True), settings.ckpt_path,
                                                 _hydra_info().get("overrides", []))
    seq_len = steps.check_seq_len(data, mcfg)
    windows, data_desc, text_hash = steps.val_windows(data, tok_path, seq_len,
                                                      announce=lambda d: print(f"evaluating on {d} ({data_from})"))
    batch = int(data.get("val_batch_size") or data["batch_size"])
    how = None if validated is None else validated.changes(len(windows), windows.n_tokens, text_hash)
    if how is not None:  # its files were edited since
        changed = f"the validation text has changed since training: {how}"
        data_from += f"; {changed}"  # eval.json
        print(f"warning: {changed}; the loss is not comparable with the run's val_loss", file=sys.stderr)
    limit = settings.limit_batches
    if limit == "auto":  # on the run's own data, the windows its validation covered (over all its ranks), else all
        n = len(windows) if validated is None else steps.validated_windows(
            len(windows), validated.limit_val_batches, validated.batch, validated.world_size)
        limit = -(-n // batch) if n < len(windows) else None
        windows = Subset(windows, range(n))
    loader = DataLoader(windows, batch_size=batch, shuffle=False)
    val = steps.val_loss(model, loader, device, limit)
    expert_load = steps.expert_load_rows(mcfg, val.tokens_per_expert)
    kv, kv_rows = steps.kv_cache_stats(model, mcfg, device)
    continuation = _eval_sample(cfg, prompt, model, tok, device)

    loss = val.loss
    result = {
        "run_dir": str(settings.output_dir.resolve()),
        "checkpoint": str(settings.ckpt_path),
        "tokenizer": str(tok_path),
        "data": data_desc,
        "data_from": data_from,
        "data_settings": {k: data.get(k) for k in ("source", "train_files", "val_files", "hub_name", "hub_config",
                                                   "hub_val_split", "val_fraction", "max_chars", "seq_len")},
        "val_batches": val.batches,
        "val_tokens": val.tokens,  # target tokens: the loss is their mean
        "limit_batches": limit,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 50 else None,
        "kv_cache_bytes_per_token": kv,
        **{k: v for k, v in model_stats(mcfg).items() if k != "kv_cache_bytes_per_token"},
        "expert_load": expert_load,
        "prompt": prompt,
        "sample": continuation,
        "config": mcfg.to_dict(),
        "device": str(device),
        "kv_cache_table": kv_rows,
    }
    _write_json(settings.output_dir / "eval.json", result)
    from deepseek_mini.analysis.kv_cache import format_table

    print(format_table(kv_rows))
    for row in expert_load:
        print(f"MoE layer {row['layer']}: max/mean load {row['max_load']:.2f}, min/mean {row['min_load']:.2f}, "
              f"routing entropy {row['entropy']:.3f}")
    ppl = f"{result['perplexity']:.2f}" if result["perplexity"] is not None else "inf"
    print(f"loss {loss:.4f} (mean over {val.tokens} target tokens, {val.batches} batches)  perplexity {ppl}  "
          f"KV cache {kv['computed_bf16']} B/token (bf16)")
    print(f"prompt {prompt!r} -> {continuation!r}")
    print(f"run dir: {settings.output_dir.resolve()}")
    return result


def _eval_sample(cfg: DictConfig, prompt: str, model, tok, device: torch.device) -> str:
    """The prompt's sampled continuation, for eval.json (the settings and length were checked up front)."""
    from deepseek_mini.data.tokenizer import eos_id

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    ids = tok.encode(prompt).ids or [eos_id(tok)]
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    with autocast:
        gen = model.generate(torch.tensor([ids], device=device), int(cfg.max_new_tokens),
                             temperature=float(cfg.temperature), top_k=int(cfg.top_k) if cfg.get("top_k") else None,
                             top_p=cfg.get("top_p"), generator=g)
    return tok.decode(gen[0, len(ids):].tolist())


from deepseek_mini.training.train import train  # noqa: E402  (train() uses the builders above)

__all__ = ["USER_ERRORS", "build_callbacks", "build_loggers", "cli_errors", "evaluate", "model_config_from",
           "model_stats", "optimized_metric", "resolve_precision", "task_wrapper", "train"]
