"""Throughput of the project's own training step: Lightning Trainer + LitDeepSeek + TextDataModule.

Used by scripts/bench_train.py. It is the same path `python train.py` takes on a GPU (bf16-mixed with
fp32 master weights, fused AdamW, gradient clipping, torch.compile of the inner model, the real data
loader); only loggers, checkpoints and validation are off, so the number is the training step itself.
"""

from __future__ import annotations

import re
import time

import lightning as L
import torch

from deepseek_mini.config import ModelConfig
from deepseek_mini.data import TextDataModule
from deepseek_mini.training.module import LitDeepSeek

# GPU kernel name -> where the time goes (first match wins); used to summarise torch.profiler traces
KERNEL_CATEGORIES = [
    ("MLA decode kernel", r"mla_decode"),
    ("optimizer (AdamW)", r"adam|Adam"),
    ("grad clipping / norms", r"multi_tensor_apply|norm_kernel|foreach|lpnorm|LpNorm"),
    ("expert weight casts", r"^triton_(poi|per|red)_.*grouped_mm__to_copy"),
    ("grouped expert GEMMs", r"[Gg]rouped|GroupProblemShape|^triton_tem.*grouped"),
    ("attention", r"cudnn|flash|fmha|attention|sdpa|mha"),
    ("GEMMs", r"gemm|Gemm|GEMM|sm90_xmma|nvjet|cutlass|cublas|ampere_|sm80_"),
    ("fused Triton glue (inductor)", r"^triton_"),
    ("sort / scan / index", r"sort|Sort|scan|Scan|radix|index|Index|gather|scatter|cub::"),
    ("memcpy / memset", r"[Mm]emcpy|[Mm]emset"),
]
NOT_KERNELS = re.compile(r"^Optimizer\.|^ProfilerStep|#")  # profiler ranges that carry a device time of their own


def kernel_breakdown(prof, steps: int) -> dict:
    """GPU kernel time per step by category, and the 25 most expensive kernels, from a torch.profiler run."""
    from torch.autograd import DeviceType

    cats: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != DeviceType.CUDA:
            continue
        us = float(evt.self_device_time_total)
        if us <= 0 or NOT_KERNELS.search(evt.key):
            continue
        cat = next((c for c, pat in KERNEL_CATEGORIES if re.search(pat, evt.key)), "other")
        cats[cat] = cats.get(cat, 0.0) + us
        kernels.append((us, evt.count, cat, evt.key[:140]))
    kernels.sort(reverse=True)
    total = sum(cats.values())
    return {"gpu_ms_per_step": total / 1e3 / steps,
            "by_category_ms": {c: round(v / 1e3 / steps, 3) for c, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"ms_per_step": round(us / 1e3 / steps, 3), "calls_per_step": n / steps, "category": c,
                             "name": k} for us, n, c, k in kernels[:25]]}


class StepTimer(L.Callback):
    """Wall time of optimizer steps [warmup, warmup + steps), synchronised at both ends only; then optionally
    `profile` more steps under torch.profiler (after the timed window, so it does not slow the timing)."""

    def __init__(self, warmup: int, steps: int, profile: int = 0):
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.t0 = self.t1 = None
        self.prof = None
        self.profile_wall_s = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.t0 is None:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        if self.profile and trainer.global_step == self.warmup + self.steps and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
            self._p0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup + self.steps and self.t1 is None:
            torch.cuda.synchronize()
            self.t1 = time.perf_counter()
        if self.prof is not None and self.profile_wall_s is None and \
                trainer.global_step == self.warmup + self.steps + self.profile:
            torch.cuda.synchronize()
            self.profile_wall_s = time.perf_counter() - self._p0
            self.prof.__exit__(None, None, None)


def lightning_throughput(cfg: ModelConfig, data_files, val_files, batch_size: int, seq_len: int, warmup: int,
                         steps: int, cache_dir: str, num_workers: int = 4, compile: bool | str = True,
                         profile_steps: int = 0) -> dict:
    dm = TextDataModule(source="text", train_files=data_files, val_files=val_files, vocab_size=cfg.vocab_size,
                        seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, num_proc=8,
                        cache_dir=cache_dir)
    t_prep = time.perf_counter()
    dm.prepare_data()
    prep_s = time.perf_counter() - t_prep
    model_cfg = cfg.to_dict()
    model_cfg["vocab_size"] = max(cfg.vocab_size, dm.vocab_size)
    total = warmup + steps + profile_steps
    module = LitDeepSeek(model_cfg, optim={"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "fused": True},
                         scheduler={"name": "warmup_cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
                         compile=compile, max_steps=total, log_every_n_steps=50)
    timer = StepTimer(warmup, steps, profile_steps)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=total,
                        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer], log_every_n_steps=50)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=dm)
    elapsed = timer.t1 - timer.t0
    res = {"tokens_per_sec": steps * batch_size * seq_len / elapsed, "step_ms": 1000 * elapsed / steps,
           "data_prep_s": prep_s, "train_tokens": int(len(dm.train_tokens)),
           "final_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}
    if timer.prof is not None and timer.profile_wall_s is not None:
        res["profile"] = kernel_breakdown(timer.prof, profile_steps)
        res["profile"]["wall_ms_per_step_profiled"] = 1000 * timer.profile_wall_s / profile_steps
    return res
