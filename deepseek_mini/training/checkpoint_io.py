"""Checkpoint files: written atomically, checked before they are read, IO failures named in one line.

* `AtomicCheckpointIO`: checkpoints are written to `.<name>.tmp-<pid>`, fsynced, then renamed, so a crash
  during a save never leaves a partial `last.ckpt`; a full disk or read-only directory raises
  `CheckpointWriteError` ("cannot write checkpoint <path>: No space left on device") and leaves the last
  good checkpoint as it was.
* `remove_stale_temp_files`: the `.tmp-<pid>` files a killed save left behind, removed at the next start.
* `read_checkpoint_meta` / `checkpoint_global_step`: a checkpoint's step and states, memory-mapped. The file is
  verified first by `deepseek_mini.checkpoint.check_checkpoint_file` (resume.resolve_ckpt_path calls it).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from deepseek_mini.checkpoint import load_checkpoint_dict
from deepseek_mini.training.errors import CheckpointWriteError, one_line

log = logging.getLogger(__name__)

TMP_GLOB = ".*.tmp-*"


def _write_cause(exc: BaseException, directory: Path) -> str:
    """Why a write failed, in the words of the OS. torch's zip writer reports a full disk as
    `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`; the free space says what it was."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    try:
        if shutil.disk_usage(directory).free == 0:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return one_line(exc, 200)


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same directory, fsync, then os.replace onto the target.

    Unlike Lightning's default (which serialises the whole checkpoint into memory first) this streams to
    disk, and the rename makes `last.ckpt` either the old or the new complete file, never a partial one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, RuntimeError) and not isinstance(e, OSError) and "inline_container" not in str(e) \
                    and "PytorchStreamWriter" not in str(e):
                raise  # not an IO failure
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {_write_cause(e, path.parent)}") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # pragma: no cover (platforms without directory fsync)
            pass


def remove_stale_temp_files(ckpt_dir: Path) -> list[Path]:
    """Delete the `.<name>.tmp-<pid>` files of saves that were killed midway (the caller holds the run lock,
    so no other process is writing them)."""
    removed = []
    for p in Path(ckpt_dir).glob(TMP_GLOB) if Path(ckpt_dir).is_dir() else []:
        try:
            p.unlink()
            removed.append(p)
        except OSError as e:
            log.warning("cannot remove stale temporary checkpoint %s: %s", p, e)
    if removed:
        log.info("removed %d temporary checkpoint file(s) of an interrupted save: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def read_checkpoint_meta(path: Path) -> dict:
    """The checkpoint's dict, memory-mapped (tensors are not read): global_step, hyper_parameters, callback
    and datamodule states. A sharded FSDP checkpoint directory keeps them in its meta.pt."""
    return load_checkpoint_dict(Path(path) / "meta.pt" if Path(path).is_dir() else path, mmap=True)


def checkpoint_global_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint (memory-mapped, so the weights are not read)."""
    step = read_checkpoint_meta(path).get("global_step")
    return int(step) if step is not None else None
