"""Checkpoint callbacks: retention without duplicate bytes (RunCheckpoint) and a self-describing checkpoint
dir (model_config.json, tokenizer.json, config.yaml, data.json)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)


# the metrics LitDeepSeek logs (training/module.py), as a checkpoint's monitor may name them
_LOGGED = re.compile(r"^(train|val)/(loss|perplexity|aux_loss|expert_balance|device_balance|comm_balance"
                     r"|moe/layer\d+/(max_load|min_load|entropy|dropped_fraction))$"
                     r"|^train/(lr|grad_norm|mtp_loss|mtp_loss_\d+)$")


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (every option as documented there) that never stores the same bytes twice,
    and can keep the best checkpoints weights-only.

    last.ckpt is written at every validation (the resume point), best-step<N>.ckpt when val/loss is among the
    `save_top_k` best. When both are written at the same step they hold the same state, so last.ckpt becomes a
    hard link to the best file instead of a second copy. A hard link rather than Lightning's `save_last="link"`:
    that symlink points at the last *top-k* file, an older step whenever the loss did not improve, and a
    symlink dangles once its target is deleted (save_top_k) or left behind by a copy. A hard link is an
    ordinary file to every reader; `cp -a`, `rsync -aH` and `tar` keep one copy, plain `cp -r` makes two
    complete files; and since every save renames a new file over its name (AtomicCheckpointIO), rewriting
    or deleting one name never changes the other.

    best_weights_only: best-step files hold the weights and hyper-parameters only (what eval.py, generate.py
    and export_hf.py read), a third (fp32 moments) to a half (bf16 moments) of a full checkpoint; resuming reads
    last.ckpt, which always has the full state. (Lightning's `save_weights_only` would strip last.ckpt too.)
    """

    @staticmethod
    def check_config_options(options: dict, key: str, model=None) -> None:
        """Value rules, run by the settings check before data preparation (run_config.check_node_options): those
        ModelCheckpoint.__init__ enforces (Lightning 2.6), which it applied only when Hydra built the callback,
        after the tokenizer and token caches."""
        from deepseek_mini.training.run_config import _fail, as_int

        as_int(f"{key}.save_top_k", options.get("save_top_k"), low=-1)
        for name in ("every_n_train_steps", "every_n_epochs"):
            if options.get(name) is not None:
                as_int(f"{key}.{name}", options[name], low=0)
        if options.get("mode") not in ("min", "max"):
            _fail(f"{key}.mode", options.get("mode"), "use min or max")
        triggers = [name for name in ("every_n_train_steps", "every_n_epochs") if (options.get(name) or 0) >= 1]
        triggers += ["train_time_interval"] * (options.get("train_time_interval") is not None)
        if len(triggers) > 1:
            _fail(f"{key}.{triggers[1]}", options.get(triggers[1]), f"cannot be combined with {key}.{triggers[0]}")
        monitor = options.get("monitor")
        if monitor is not None and not (isinstance(monitor, str) and _LOGGED.match(monitor)):
            # Lightning looks the name up at the first validation, after training steps, and raises there
            _fail(f"{key}.monitor", monitor, "a metric the run logs, e.g. val/loss, val/perplexity, train/loss")
        if options.get("monitor") is None and options.get("save_top_k") not in (-1, 0, 1):
            _fail(f"{key}.save_top_k", options.get("save_top_k"),
                  "needs a monitor (e.g. val/loss) to rank checkpoints; without one use -1, 0 or 1")

    def __init__(self, *args, best_weights_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.best_weights_only = bool(best_weights_only)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        # Lightning (2.6) writes last.ckpt only at a step where it also wrote a top-k file; the resume point
        # must follow every validation, improved or not
        if (self.save_last and self._last_global_step_saved != trainer.global_step
                and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        is_last = filepath == self.last_model_path  # Lightning sets it just before saving last.ckpt
        twin = self._last_checkpoint_saved  # the top-k file this validation wrote, if it wrote one
        same_state = (is_last and twin and twin != filepath and self._last_global_step_saved == trainer.global_step
                      and not self.best_weights_only)
        if not (same_state and self._hard_link(trainer, twin, filepath)):
            trainer.save_checkpoint(filepath, self.save_weights_only or (self.best_weights_only and not is_last))
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))  # as Lightning does: no reference cycle

    @staticmethod
    def _hard_link(trainer, target: str, linkpath: str) -> bool:
        """linkpath := another name of target (renamed into place, so never a partial file); False where the
        filesystem has no hard links (the caller then writes a copy)."""
        ok = True
        if trainer.is_global_zero:
            tmp = Path(linkpath).with_name(f".{Path(linkpath).name}.link-{os.getpid()}")
            try:
                tmp.unlink(missing_ok=True)
                os.link(target, tmp)
                os.replace(tmp, linkpath)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                log.warning("cannot hard-link %s to %s (%s); writing a copy", linkpath, target, e)
                ok = False
        ok = trainer.strategy.broadcast(ok)
        trainer.strategy.barrier()
        return ok


class CheckpointDirDescriber(L.Callback):
    """Makes the checkpoint dir self-describing: model_config.json, tokenizer.json, config.yaml and data.json
    (the data the model is trained on, which eval.py evaluates on unless told otherwise)."""

    def __init__(self, dirpath: str | os.PathLike, resolved_config: dict | None = None):
        self.dirpath = Path(dirpath)
        self.resolved_config = resolved_config

    @rank_zero_only
    def on_fit_start(self, trainer, pl_module):
        dm = trainer.datamodule
        record = data_record(dm)
        if record is not None:  # eval.py's limit_batches=auto evaluates on the windows this validation covers
            record["limit_val_batches"], record["world_size"] = trainer.limit_val_batches, trainer.world_size
        describe_checkpoint_dir(self.dirpath, pl_module.config.to_dict(), getattr(dm, "tokenizer_path", None),
                                self.resolved_config, record)


# the TextDataModule arguments that say which text the validation windows come from, and how they are batched
DATA_KEYS = ("source", "train_files", "val_files", "hub_name", "hub_config", "hub_split", "hub_val_split",
             "text_field", "val_fraction", "max_chars", "seq_len", "batch_size", "val_batch_size")


def data_record(dm) -> dict | None:
    """What the model is trained on: the corpus description and the datamodule arguments (file paths
    absolute), enough for eval.py to rebuild the same validation windows. None for other datamodules."""
    if dm is None or not all(hasattr(dm, k) for k in DATA_KEYS) or not hasattr(dm, "describe"):
        return None
    described = dm.describe()
    # val_hash: the validation documents' sha256, so eval.py sees an edit that keeps the window and token counts
    return {"description": described.get("source"), "datamodule": {k: getattr(dm, k) for k in DATA_KEYS},
            "val_tokens": described.get("val_tokens"), "val_windows": described.get("val_windows"),
            "val_hash": getattr(getattr(dm, "corpus", None), "val_hash", None)}


def describe_checkpoint_dir(dirpath: Path, model_config: dict, tokenizer_path: str | None,
                            resolved_config: dict | None = None, data: dict | None = None) -> None:
    from deepseek_mini.checkpoint import DATA_RECORD

    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "model_config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, dirpath / "tokenizer.json")
    if resolved_config is not None:
        import yaml

        (dirpath / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
    if data is not None:
        (dirpath / DATA_RECORD).write_text(json.dumps(data, indent=2, default=str) + "\n")
