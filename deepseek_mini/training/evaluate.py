"""The steps of eval.py (`deepseek_mini.training.run.evaluate` runs them in order).

1. `check_eval_settings`: ckpt_path, limit_batches, device and the output directory, before anything is loaded;
2. the model through the verified loader (`deepseek_mini.checkpoint.load_checkpoint`) and its tokenizer;
3. `eval_data`: which text to evaluate on: the data the checkpoint was trained on (checkpoints/data.json),
   changed by any `data.<key>=` override, or the data config the command line chose with `data=<name>`;
4. `val_windows`: only the validation windows of that text, tokenized with the checkpoint's tokenizer: eval
   needs no training files when `data.val_files` are given (source=text);
5. `val_loss`: the mean cross-entropy over target tokens, the same TokenMeanLoss as training's validation, so
   eval.py on the data a run was trained on prints that run's val_loss;
6. `expert_load_rows`, `kv_cache_stats`: routing balance and the KV-cache sizes at this checkpoint's shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import OmegaConf

from deepseek_mini.checkpoint import CheckpointError, read_data_record
from deepseek_mini.config import ConfigError, ModelConfig
from deepseek_mini.data import DataError
from deepseek_mini.generation_args import parse_device  # shared with scripts/generate.py
from deepseek_mini.training.run_config import check_data_values, check_read_fields
from deepseek_mini.training.val_loss import TokenMeanLoss


@dataclass
class EvalSettings:
    ckpt_path: Path
    device: torch.device
    limit_batches: int | str | None  # a count, "auto" (see batch_limit) or None (all)
    output_dir: Path
    seed: int = 1234


# ---------------------------------------------------------------------- 1. settings
def check_limit_batches(value: Any) -> int | str | None:
    """limit_batches=auto (training's validation batches), a positive integer, or null (every batch)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"limit_batches={value}: must be a positive integer, auto (as many as the run's "
                          "validation) or null (every validation batch)")
    return value


class RunValidation(NamedTuple):
    """How the training run validated on its data (checkpoints/data.json)."""

    limit_val_batches: int | float | None
    world_size: int
    batch: int  # its validation batches' size
    windows: int | None  # the validation windows its data had then (None: not recorded)
    tokens: int | None  # the validation split's tokens then
    text_hash: str | None = None  # the sha256 of the validation documents' text then

    def changes(self, windows: int, tokens: int, text_hash: str) -> str | None:
        """What differs between the validation text now (its windows, tokens and hash) and the run's, or None."""
        if (self.windows not in (None, windows)) or (self.tokens not in (None, tokens)):
            return f"{windows} windows of {tokens} tokens, the run had {self.windows} of {self.tokens}"
        if self.text_hash not in (None, text_hash):
            return f"its documents hash to {text_hash[:12]}, the run's to {self.text_hash[:12]}"
        return None


def validated_windows(n_windows: int, limit: int | float | None, batch: int, world: int = 1) -> int:
    """How many leading validation windows a training run validated on, with trainer.limit_val_batches `limit`
    (a count, or a fraction as Lightning reads it), validation batches of `batch` windows and `world` ranks. Each
    rank validates the first batches of its rank-strided share of ceil(n / world) windows (TextDataModule.
    val_dataloader), so together they cover the first world x (its windows) of them."""
    per_rank = -(-n_windows // world)
    if limit is None or isinstance(limit, bool) or (isinstance(limit, float) and limit >= 1.0):
        k = per_rank
    elif isinstance(limit, float):
        k = max(1, int(-(-per_rank // batch) * limit)) * batch
    else:
        k = int(limit) * batch
    return min(n_windows, world * min(per_rank, k))


def check_writable(directory: Path, key: str) -> Path:
    """The directory exists (or is created) and a file can be written into it."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}={directory}: cannot write there ({e.strerror or type(e).__name__})") from None
    return directory


def check_eval_options(cfg) -> tuple[int, int | str | None, torch.device]:
    """Every eval.py setting that can be checked without writing or reading anything (each a one-line error):
    cli_entry runs this before Hydra creates the eval's run dir, evaluate() again (API callers). The data settings
    go by training's rules (DataSettings: sizes, fraction, cache dir), so `data.batch_size=0` or a word where a
    number belongs stops here, not in a DataLoader or a float() traceback after the model is loaded.
    Returns (seed, limit_batches, device)."""
    from deepseek_mini.generation_args import check_sampling, check_seed
    from deepseek_mini.training.run_config import data_settings

    if (OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, "ckpt_path")) or cfg.get("ckpt_path") in (None, "", "???"):
        raise CheckpointError("give the checkpoint to evaluate: python eval.py ckpt_path=<run>/checkpoints/last.ckpt")
    seed = check_seed(cfg)  # first: data.seed follows it (${seed})
    limit = check_limit_batches(cfg.get("limit_batches"))
    device = parse_device(cfg.get("device", "auto"))
    data_settings(cfg)
    check_sampling(cfg)  # temperature, top_k, top_p, max_new_tokens: generation_args.py, as scripts/generate.py
    return seed, limit, device


def check_eval_settings(cfg) -> EvalSettings:
    """Everything eval.py can check before it loads a checkpoint or any data: check_eval_options, and the output
    directory written to."""
    seed, limit, device = check_eval_options(cfg)
    output_dir = check_writable(Path(cfg.paths.output_dir), "paths.output_dir")
    return EvalSettings(Path(str(cfg.ckpt_path)).expanduser().resolve(), device, limit, output_dir, seed)


# ---------------------------------------------------------------------- 3. which data
WINDOW_KEYS = ("seq_len", "batch_size", "val_batch_size")  # how the text is cut into batches of windows
BATCH_KEYS = ("batch_size", "val_batch_size")  # how the windows are batched (not which they are)


def data_overrides(overrides: list[str]) -> tuple[bool, list[str]]:
    """(whether the command line chose a data config with `data=<name>`, the `data.<key>` it set)."""
    group, keys = False, []
    for o in overrides:
        name = o.lstrip("+~").split("=", 1)[0]
        if name == "data":
            group = True
        elif name.startswith("data."):
            keys.append(name[len("data."):].split(".")[0])
    return group, list(dict.fromkeys(keys))


def eval_data(cfg_data: dict, ckpt_path: Path, overrides: list[str]) -> tuple[dict, str, RunValidation | None]:
    """The data arguments to evaluate on, where they come from (printed, and recorded in eval.json), and how the
    training run validated when these are exactly its validation data (else None): limit_batches=auto evaluates
    on the windows validated_windows counts.

    By default the text the checkpoint was trained on (its checkpoints/data.json). `data=<name>` on the command
    line picks other text, still cut into windows as in training (the recorded seq_len and batch sizes).
    `data.<key>=` overrides win over both. Cache location and loader workers are always this run's."""
    record = read_data_record(ckpt_path)
    group, keys = data_overrides(overrides)
    if record is None:
        why = "data=... on the command line" if group else "eval.yaml's data: the checkpoint records no training data"
        if keys:  # what eval.json's data_from says must name what the command line set
            why += f", with {', '.join(f'data.{k}' for k in keys)} from the command line"
        check_read_fields(cfg_data)
        return cfg_data, why, None
    recorded = record.get("datamodule") or {}
    where = ckpt_path.parent / "data.json"
    if not isinstance(recorded, dict):
        raise CheckpointError(f"cannot read {where}: its datamodule is a {type(recorded).__name__}, not a mapping")
    try:  # the recorded sizes by training's rules: a hand-edited record would fail in a DataLoader or int()
        check_data_values(recorded)
    except ConfigError as e:
        raise CheckpointError(f"cannot read {where}: {e}") from None
    limit, world = record.get("limit_val_batches"), record.get("world_size", 1)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0):
        raise CheckpointError(f"cannot read {where}: limit_val_batches={limit!r} is not a count or a fraction")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise CheckpointError(f"cannot read {where}: world_size={world!r} is not a number of ranks")
    take = WINDOW_KEYS if group else tuple(recorded)
    data = {**cfg_data, **{k: recorded[k] for k in take if k in recorded}}
    data.update({k: cfg_data.get(k) for k in keys})
    if "batch_size" in keys and "val_batch_size" not in keys:
        # eval's batches are validation batches, and those are val_batch_size long when it is set: the recorded
        # one would silently win over the data.batch_size=N the command line asked for
        data["val_batch_size"] = None
    why = "data=... from the command line, windows as in training" if group else "the data this checkpoint was trained on"
    if keys:
        why += f", with {', '.join(f'data.{k}' for k in keys)} from the command line"
    check_read_fields(data)  # data.val_files=x on the recorded stdlib source would be ignored, yet named
    # the same windows whatever their batching: the run's validation is counted in its own batches
    same = not group and all(data.get(k) == recorded.get(k) for k in recorded if k not in BATCH_KEYS)
    counts = [v if isinstance(v, int) and not isinstance(v, bool) else None
              for v in (record.get("val_windows"), record.get("val_tokens"))]
    text_hash = record.get("val_hash") if isinstance(record.get("val_hash"), str) else None
    batch = int(recorded.get("val_batch_size") or recorded.get("batch_size") or 1)
    return data, why, RunValidation(limit, world, batch, *counts, text_hash) if same else None


# ---------------------------------------------------------------------- 4. the validation windows
def check_seq_len(data: dict, mcfg: ModelConfig) -> int:
    seq_len = data.get("seq_len")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"data.seq_len={seq_len}: must be a positive integer")
    if seq_len > mcfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len={seq_len}: exceeds the checkpoint's max_position_embeddings="
                          f"{mcfg.max_position_embeddings}")
    return seq_len


def _files_label(files: list[str]) -> str:
    return files[0] + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")


def val_windows(data: dict, tokenizer_path: Path, seq_len: int, announce=print):
    """(TokenWindows over the validation text, its description, the sha256 of its documents' text). `announce`
    gets the one line naming the data, before any tokenization. With source=text and val_files the training files
    are not read at all."""
    from deepseek_mini.data import TokenWindows, build_token_cache, expand_files, load_corpus, load_tokenizer

    source = data.get("source", "stdlib")
    val_files = data.get("val_files")
    val_only = source == "text" and bool(val_files)
    if val_only:  # checked here, under their own name (load_corpus reads them as the stand-in training files)
        expand_files(val_files, "val_files")
    cache_dir = os.path.abspath(os.path.expanduser(str(data.get("cache_dir") or ".cache/deepseek_mini")))
    corpus = load_corpus(
        source,
        # the validation text is all eval needs: it stands in for the (unread) training files
        train_files=val_files if val_only else data.get("train_files"),
        val_files=val_files,
        hub_name=data.get("hub_name"), hub_config=data.get("hub_config"), hub_split=data.get("hub_split", "train"),
        hub_val_split=data.get("hub_val_split"), text_field=data.get("text_field", "text"),
        val_fraction=float(data.get("val_fraction", 0.01)), max_chars=data.get("max_chars"), cache_dir=cache_dir,
    )
    description = (f"text val:{_files_label(expand_files(val_files, 'val_files'))}" if val_only
                   else f"the validation part of {corpus.description}")
    announce(description)
    tokenizer = load_tokenizer(str(tokenizer_path))
    cache = build_token_cache(corpus, tokenizer, str(tokenizer_path), cache_dir, num_proc=int(data.get("num_proc", 1)))
    windows = TokenWindows(cache.path("val"), cache.dtype, cache.n_tokens("val"), seq_len)
    if len(windows) == 0:
        raise DataError(f"validation data {description} has {cache.n_tokens('val')} tokens, fewer than "
                        f"data.seq_len + 1 = {seq_len + 1}: no window to evaluate")
    return windows, description, corpus.val_hash


# ---------------------------------------------------------------------- 5. loss
@dataclass
class ValLoss:
    loss: float  # mean cross-entropy per target token
    tokens: int  # target tokens evaluated
    batches: int
    tokens_per_expert: torch.Tensor | None  # [MoE layers, experts], summed over the batches


def val_loss(model, loader, device: torch.device, limit_batches: int | None = None) -> ValLoss:
    """The mean over target tokens of the first `limit_batches` batches (all if None), as training validates."""
    acc, tpe, n = TokenMeanLoss(), None, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        for x, y in loader:
            if limit_batches is not None and n >= limit_batches:
                break
            x, y = x.to(device), y.to(device)
            out = model(x, labels=y, return_logits=False)
            acc.update(out.loss, y)
            n += 1
            if out.router_stats:
                batch_tpe = torch.stack([s["tokens_per_expert"].float() for s in out.router_stats])
                tpe = batch_tpe if tpe is None else tpe + batch_tpe
    loss, tokens = acc.compute()
    return ValLoss(loss, tokens, n, None if tpe is None else tpe.cpu())


# ---------------------------------------------------------------------- 6. routing and cache sizes
def expert_load_rows(mcfg: ModelConfig, tokens_per_expert: torch.Tensor | None) -> list[dict]:
    from deepseek_mini.training.module import expert_load_stats

    if tokens_per_expert is None:
        return []
    return [{"layer": layer, **{k: round(float(v), 4) for k, v in expert_load_stats(row).items()},
             "tokens_per_expert": [int(v) for v in row.tolist()]}
            for layer, row in zip(mcfg.moe_layer_indices, tokens_per_expert)]


def kv_cache_stats(model, mcfg: ModelConfig, device: torch.device) -> tuple[dict, list[dict]]:
    """KV bytes per token (computed; measured with the CUDA allocator on a GPU), and the paper's comparison at
    this checkpoint's shape: the same model with MHA, GQA, MQA and MLA caches."""
    from deepseek_mini.analysis.kv_cache import kv_cache_table, measure_kv_bytes, with_attention

    kv = {"computed_bf16": mcfg.kv_cache_bytes_per_token(2), "computed_fp32": mcfg.kv_cache_bytes_per_token(4)}
    if device.type == "cuda":  # measured: allocate the cache of one long generation and read the allocator
        n_tok = min(4096, mcfg.max_position_embeddings)
        measured = measure_kv_bytes(model, 1, n_tok, device=device, dtype=torch.bfloat16)
        kv["measured_bf16"] = measured["measured_bytes"] / n_tok
    heads = mcfg.num_attention_heads
    groups = mcfg.num_key_value_heads if mcfg.attention == "gqa" else max(2, heads // 4)
    groups = groups if heads % groups == 0 else 1
    rows = kv_cache_table({f"this shape/{a}": with_attention(mcfg, a, groups) for a in ("mha", "gqa", "mqa", "mla")})
    return kv, rows


__all__ = ["EvalSettings", "RunValidation", "ValLoss", "validated_windows", "check_eval_options", "check_eval_settings", "check_seq_len", "data_overrides", "eval_data",
           "expert_load_rows", "kv_cache_stats", "parse_device", "val_loss", "val_windows"]
