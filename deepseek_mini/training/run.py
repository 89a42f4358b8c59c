"""evaluate(cfg) and the builders train() shares: loggers, callbacks, model statistics.

`train` lives in training/train.py; `task_wrapper` / `cli_errors` in training/errors.py. They are re-exported
here, so `from deepseek_mini.training.run import train, evaluate, cli_errors, optimized_metric` keeps working.
"""

from __future__ import annotations

import logging
import math
import os
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

    from deepseek_mini.training.loggers import read_wandb_run_id, wandb_online_problem

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
    return {"params_total": counts.total, "params_active": counts.active,
            "kv_cache_bytes_per_token": model_cfg.kv_cache_bytes_per_token(2)}  # bf16 cache


# ---------------------------------------------------------------------- evaluate
@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    import hydra

    from deepseek_mini.checkpoint import load_checkpoint
    from deepseek_mini.training.module import expert_load_stats

    if cfg.get("ckpt_path") in (None, "", "???"):
        raise CheckpointError("give the checkpoint to evaluate: python eval.py ckpt_path=<run>/checkpoints/last.ckpt")
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

    from deepseek_mini.analysis.kv_cache import format_table, kv_cache_table, measure_kv_bytes, with_attention

    kv = {"computed_bf16": mcfg.kv_cache_bytes_per_token(2), "computed_fp32": mcfg.kv_cache_bytes_per_token(4)}
    if device.type == "cuda":  # measured: allocate the cache of one long generation and read the allocator
        n_tok = min(4096, mcfg.max_position_embeddings)
        measured = measure_kv_bytes(model, 1, n_tok, device=device, dtype=torch.bfloat16)
        kv["measured_bf16"] = measured["measured_bytes"] / n_tok

    tok = dm.tokenizer
    prompt = str(cfg.get("prompt", ""))
    ids = tok.encode(prompt).ids or [dm.eos_token_id]
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    max_new = min(int(cfg.max_new_tokens), mcfg.max_position_embeddings - len(ids))
    with autocast:
        gen = model.generate(torch.tensor([ids], device=device), max_new, temperature=float(cfg.temperature),
                             top_k=cfg.get("top_k"), generator=g)
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


from deepseek_mini.training.train import train  # noqa: E402  (train() uses the builders above)

__all__ = ["USER_ERRORS", "build_callbacks", "build_loggers", "cli_errors", "evaluate", "model_config_from",
           "model_stats", "optimized_metric", "resolve_precision", "task_wrapper", "train"]
