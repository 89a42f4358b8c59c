"""Throughput of the project's own training step: Lightning Trainer + LitDeepSeek + TextDataModule.

Used by scripts/bench_train.py. It is the same path `python train.py` takes on a GPU (bf16-mixed with
fp32 master weights, fused AdamW, gradient clipping, torch.compile of the inner model, the real data
loader); only loggers, checkpoints and validation are off, so the number is the training step itself.
"""

from __future__ import annotations

import time

import lightning as L
import torch

from deepseek_mini.config import ModelConfig
from deepseek_mini.data import TextDataModule
from deepseek_mini.training.module import LitDeepSeek


class StepTimer(L.Callback):
    """Wall time of optimizer steps [warmup, warmup + steps), synchronised at both ends only."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 is None:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup + self.steps and self.t1 is None:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()


def lightning_throughput(cfg: ModelConfig, data_files, val_files, batch_size: int, seq_len: int, warmup: int,
                         steps: int, cache_dir: str, num_workers: int = 4) -> dict:
    dm = TextDataModule(source="text", train_files=data_files, val_files=val_files, vocab_size=cfg.vocab_size,
                        seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, num_proc=8,
                        cache_dir=cache_dir)
    t_prep = time.perf_counter()
    dm.prepare_data()
    prep_s = time.perf_counter() - t_prep
    model_cfg = cfg.to_dict()
    model_cfg["vocab_size"] = max(cfg.vocab_size, dm.vocab_size)
    module = LitDeepSeek(model_cfg, optim={"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "fused": True},
                         scheduler={"name": "warmup_cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
                         compile=True, max_steps=warmup + steps, log_every_n_steps=50)
    timer = StepTimer(warmup, steps)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=warmup + steps,
                        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer], log_every_n_steps=50)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=dm)
    elapsed = timer.t1 - timer.t0
    return {"tokens_per_sec": steps * batch_size * seq_len / elapsed, "step_ms": 1000 * elapsed / steps,
            "data_prep_s": prep_s, "train_tokens": int(len(dm.train_tokens))}
