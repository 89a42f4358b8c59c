"""Multi-device training: strategy factories for `configs/trainer/{ddp,fsdp}.yaml`, batch arithmetic, helpers.

Hydra YAML cannot express a set of classes (FSDP's `auto_wrap_policy={Block}`) or a torch dtype, so
`trainer.strategy` may be a node with a `_target_`; `build_trainer_nodes` instantiates it (and any other Trainer
argument given as such a node, e.g. `+trainer.profiler._target_=...`; training/train.py calls it), and
`fsdp_strategy` builds the FSDPStrategy from plain strings.

Batch arithmetic: `data.batch_size` is per device, so one optimizer step sees
    global batch = batch_size x world_size (devices x nodes) x accumulate_grad_batches  sequences
and `seq_len` times that in tokens (`global_batch`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from deepseek_mini.checkpoint import is_sharded_checkpoint

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def global_batch(batch_size: int, seq_len: int, world_size: int = 1, accumulate_grad_batches: int = 1) -> dict:
    """Sequences and tokens per optimizer step over all ranks (`batch_size` is per device)."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size),
                    ("accumulate_grad_batches", accumulate_grad_batches)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    samples = int(batch_size) * int(world_size) * int(accumulate_grad_batches)
    return {"per_device_batch_size": int(batch_size), "world_size": int(world_size),
            "accumulate_grad_batches": int(accumulate_grad_batches),
            "global_batch_size": samples, "global_batch_tokens": samples * int(seq_len)}


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def _replace_dir(tmp: Path, path: Path) -> None:
    """path := tmp (a complete checkpoint, file or directory). Directories cannot be swapped in one rename:
    the old one is renamed aside first and deleted after, so between the two renames (not during the
    minutes-long shard write) a kill leaves `.<name>.old` complete beside `.<name>.tmp` complete."""
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class AtomicFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy whose sharded checkpoints are written beside the target and then moved in.

    Lightning writes the shards of `last.ckpt/` into the existing directory, over the previous ones, and
    meta.pt last: a save killed midway (preemption, OOM on another rank, SIGKILL) left neither the old
    checkpoint nor a new one, and shards of two steps under one meta.pt can even pass a size check. Here
    every rank writes into `.<name>.tmp/`, and rank 0 moves it into place once all ranks are done."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0:
            _remove(tmp)  # a killed save's leftovers
        self.barrier("dsm_sharded_save_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("dsm_sharded_save_written")
        if self.global_rank == 0:
            _replace_dir(tmp, path)
        self.barrier("dsm_sharded_save_moved")


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "sharded",
                  param_dtype: str | None = "bfloat16", reduce_dtype: str | None = "float32",
                  buffer_dtype: str | None = "float32", activation_checkpointing: bool = False,
                  cpu_offload: bool = False, **kwargs: Any) -> AtomicFSDPStrategy:
    """Lightning FSDPStrategy wrapping each transformer `Block` in its own FSDP unit.

    Mixed precision is set here, never left to Lightning's `bf16-mixed` plugin: the plugin would also
    cast *buffers* to bf16, and the router's `tokens_per_expert` counts (exact only up to 256 in bf16)
    and its `e_score_correction_bias` (updated in steps of `bias_update_speed`, below bf16's resolution
    once the bias is ~0.5) must stay fp32. So a MixedPrecision is always passed, whatever `param_dtype`:
    `param_dtype=None` keeps fp32 parameters in compute (the trainer's autocast alone lowers the
    matmuls) with the buffers still fp32; a buffer_dtype other than fp32 is refused. `state_dict_type="sharded"` saves each checkpoint as a directory (one shard per rank plus
    `meta.pt`), which resumes with `ckpt_path=<dir>`; "full" gathers a normal .ckpt file on rank 0.

    GPUs only: Lightning refuses FSDP unless the accelerator is a GPU, and torch's FSDP itself raises
    "FSDP needs a non-CPU accelerator device" on a CPU-only machine (checked with torch 2.13 + gloo).
    """
    from torch.distributed.fsdp import MixedPrecision

    from deepseek_mini.model.transformer import Block

    if _dtype(buffer_dtype) not in (None, torch.float32):
        raise ValueError(f"buffer_dtype={buffer_dtype!r}: the router's expert counts and biases must stay float32")
    # param_dtype=None used to pass no MixedPrecision at all, and Lightning's plugin then made every buffer bf16
    mixed = MixedPrecision(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype),
                           buffer_dtype=torch.float32)
    return AtomicFSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
               mixed_precision=mixed, activation_checkpointing_policy={Block} if activation_checkpointing else None,
               cpu_offload=cpu_offload, **kwargs)


def build_trainer_nodes(trainer_kwargs: dict) -> dict:
    """Instantiate every Trainer argument that is a config node with a `_target_` (`trainer.strategy`, a
    `+trainer.profiler._target_=...`, the items of a `trainer.plugins` list), in place; returns the dict.
    Lightning takes those arguments as objects: a node passed on as a dict failed deep inside the run."""
    import hydra

    def build(value):
        if isinstance(value, dict) and "_target_" in value:
            return hydra.utils.instantiate(value)
        if isinstance(value, (list, tuple)):
            return [build(v) for v in value]
        return value

    for key, value in trainer_kwargs.items():
        trainer_kwargs[key] = build(value)
    return trainer_kwargs


def consolidate_checkpoint(path: str | os.PathLike, output_file: str | os.PathLike | None = None) -> Path:
    """Sharded FSDP checkpoint directory -> one ordinary .ckpt that `load_checkpoint` / eval.py read.

    Same as `python -m lightning.pytorch.utilities.consolidate_checkpoint <dir>`; runs in one process on
    the CPU. The output defaults to `<dir>.consolidated` beside the directory, so `tokenizer.json` and
    `model_config.json` of the checkpoint directory are still found next to it.
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint
    from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is not a sharded FSDP checkpoint directory (no meta.pt)")
    out = Path(output_file) if output_file is not None else path.with_name(path.name + ".consolidated")
    checkpoint = _format_checkpoint(_load_distributed_checkpoint(path))
    torch.save(checkpoint, out)
    return out


class DumpWeights(L.Callback):
    """Test aid: at the end of training every rank saves its full model state (parameters and buffers,
    router biases included) to `<dirpath>/rank<r>.pt`, so a test can check that the ranks agree.

    Enable from the command line: `+callbacks.dump_weights._target_=deepseek_mini.training.strategies.DumpWeights
    +callbacks.dump_weights.dirpath=<dir>`. Under FSDP each rank dumps only its shards.
    """

    def __init__(self, dirpath: str | os.PathLike):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.model.state_dict().items()}
        state["__global_step__"] = torch.tensor(trainer.global_step)
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")


def release_process_group() -> None:
    """The end of a distributed run: CUDA graphs freed, then the process group destroyed (PyTorch's documented
    shutdown: every rank calls destroy_process_group once communication is over).

    The order matters: a CUDA graph that captured NCCL collectives keeps their communicator in use, and
    destroying it under a live graph can wait forever (pytorch/pytorch#115388). With the padded expert-parallel
    dispatch and compile=full:reduce-overhead the all-to-alls are inside the graphs: on two H200s (2026-11-30,
    torch 2.11) such a run printed its summary and then did not exit until killed 30 s later. torch.compiler.reset
    drops the compiled code and its CUDA-graph trees (a later run in the same process, a multirun job, compiles
    afresh anyway)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    torch.compiler.reset()
    dist.destroy_process_group()


__all__ = ["AtomicFSDPStrategy", "DumpWeights", "build_trainer_nodes", "consolidate_checkpoint", "fsdp_strategy", "global_batch",
           "is_sharded_checkpoint", "release_process_group"]
