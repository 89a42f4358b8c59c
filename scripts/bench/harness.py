"""Benchmark timing and profiler breakdowns, shared by bench_train.py and bench_decode.py in this folder.

lightning_throughput times the project's own training step: Lightning Trainer + LitDeepSeek + TextDataModule,
the same path `python train.py` takes on a GPU (bf16-mixed with fp32 master weights, the Triton AdamW step,
gradient clipping, torch.compile of the inner model as `compile` says (regional or full, training/compile.py),
the real data loader); only loggers, checkpoints and validation are off, so the number is the training step itself. kernel_breakdown sorts a torch.profiler trace's
GPU time into categories.
"""

from __future__ import annotations

import re
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch

from deepseek_mini.config import ModelConfig
from deepseek_mini.data import TextDataModule
from deepseek_mini.training.module import LitDeepSeek

# GPU kernel name -> where the time goes (first match wins); used to summarise torch.profiler traces
KERNEL_CATEGORIES = [
    ("MLA decode kernel", r"mla_decode"),
    ("optimizer (AdamW)", r"adam|Adam"),
    ("grad clipping / norms", r"multi_tensor_apply|norm_kernel|foreach|lpnorm|LpNorm|_sum_squares"),
    ("expert weight casts", r"^triton_(poi|per|red)_.*grouped_mm__to_copy"),
    ("grouped expert GEMMs", r"[Gg]rouped|GroupProblemShape|^triton_tem.*grouped"),
    ("attention", r"cudnn|flash|fmha|attention|sdpa|mha"),
    ("GEMMs", r"gemm|Gemm|GEMM|sm90_xmma|nvjet|cutlass|cublas|ampere_|sm80_"),
    ("fused Triton glue", r"^triton_|^_swiglu_backward"),  # inductor's kernels and the experts' SwiGLU backward
    ("sort / scan / index", r"sort|Sort|scan|Scan|radix|index|Index|gather|scatter|cub::"),
    ("memcpy / memset", r"[Mm]emcpy|[Mm]emset"),
]
NOT_KERNELS = re.compile(r"^Optimizer\.|^ProfilerStep|#")  # profiler ranges that carry a device time of their own


def kernel_breakdown(prof, steps: int) -> dict:
    """GPU kernel time per step by category, and the 40 most expensive kernels, from a torch.profiler run."""
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
    return {"gpu_ms_per_step": total / 1e3 / steps, **idle_gaps(prof, steps),
            "by_category_ms": {c: round(v / 1e3 / steps, 3) for c, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"ms_per_step": round(us / 1e3 / steps, 3), "calls_per_step": n / steps, "category": c,
                             "name": k} for us, n, c, k in kernels[:40]]}


def idle_gaps(prof, steps: int, top: int = 12) -> dict:
    """Where the GPU sits idle: the union of kernel intervals against the profiled span, and the longest gaps
    between consecutive kernels with the kernels on either side and the host-side calls that overlap them
    (a long cudaStreamSynchronize or aten::item there is a host sync; Python there is launch overhead)."""
    from torch.autograd import DeviceType

    kern, host = [], []
    for evt in prof.events():
        tr = evt.time_range
        if getattr(evt, "device_type", None) == DeviceType.CUDA:
            if not NOT_KERNELS.search(evt.name) and tr.end > tr.start:
                kern.append((tr.start, tr.end, evt.name))
        elif tr.end - tr.start > 200:  # host calls over 0.2 ms
            host.append((tr.start, tr.end, evt.name))
    if not kern:
        return {}
    kern.sort()
    busy, gaps, cur_end, last = 0.0, [], kern[0][0], kern[0][2]
    for start, end, name in kern:
        if start > cur_end:
            gaps.append((start - cur_end, cur_end, start, last, name))
        if end > cur_end:
            busy += end - max(start, cur_end)
            cur_end, last = end, name
    span = cur_end - kern[0][0]
    # many short gaps are the launch latency between dependent kernels (even inside a CUDA graph); few long
    # ones are the host falling behind
    short = sum(g[0] for g in gaps if g[0] < 10)
    gaps.sort(reverse=True)
    out = []
    for us, g0, g1, before, after in gaps[:top]:
        during = sorted({n for s, e, n in host if s < g1 and e > g0})[:8]
        out.append({"gap_ms": round(us / 1e3, 3), "after": before[:80], "before": after[:80], "host": during})
    return {"gpu_busy_ms_per_step": busy / 1e3 / steps, "gpu_span_ms_per_step": span / 1e3 / steps,
            "gpu_idle_ms_per_step": (span - busy) / 1e3 / steps, "kernels_per_step": len(kern) / steps,
            "idle_in_short_gaps_ms_per_step": short / 1e3 / steps, "idle_gaps": out}


class StepTimer(L.Callback):
    """Wall time of optimizer steps [warmup, warmup + steps), synchronised at both ends only; then optionally
    `profile` more steps under torch.profiler (after the timed window, so it does not slow the timing)."""

    def __init__(self, warmup: int, steps: int, profile: int = 0, sync_debug: bool = False):
        self.warmup, self.steps, self.profile = warmup, steps, profile
        # one warm step before the timed window under torch.cuda.set_sync_debug_mode("warn"): every host
        # sync in the step is recorded with the Python stack that caused it
        self.sync_debug = sync_debug and warmup >= 2
        self.syncs: dict[str, int] = {}
        self._showwarning = None
        self.t0 = self.t1 = None
        self.prof = None
        self.profile_wall_s = None

    def _record_sync(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._showwarning(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-6:]
        site = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        self.syncs[site] = self.syncs.get(site, 0) + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sync_debug and trainer.global_step == self.warmup - 1 and self._showwarning is None:
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._record_sync
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if self._showwarning is not None and trainer.global_step == self.warmup:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._showwarning
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


def text_datamodule(cfg: ModelConfig, data_files, val_files, batch_size: int, seq_len: int, cache_dir: str,
                    num_workers: int = 4) -> TextDataModule:
    """The benchmark's real-text data: its prepare_data() trains the tokenizer and writes the token cache under
    cache_dir the first time, and reads them after."""
    return TextDataModule(source="text", train_files=data_files, val_files=val_files, vocab_size=cfg.vocab_size,
                          seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, num_proc=8,
                          cache_dir=cache_dir)


def lightning_throughput(cfg: ModelConfig, data_files, val_files, batch_size: int, seq_len: int, warmup: int,
                         steps: int, cache_dir: str, num_workers: int = 4, compile: bool | str = True,
                         profile_steps: int = 0, sync_debug: bool = False, fused: bool | str = "auto",
                         bf16_weights: bool | str = "auto", moments_dtype: str = "auto") -> dict:
    dm = text_datamodule(cfg, data_files, val_files, batch_size, seq_len, cache_dir, num_workers)
    t_prep = time.perf_counter()
    dm.prepare_data()
    prep_s = time.perf_counter() - t_prep
    model_cfg = cfg.to_dict()
    model_cfg["vocab_size"] = max(cfg.vocab_size, dm.vocab_size)
    total = warmup + steps + profile_steps
    module = LitDeepSeek(model_cfg, optim={"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "fused": fused,
                                                 "bf16_weights": bf16_weights, "moments_dtype": moments_dtype},
                         scheduler={"name": "warmup_cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
                         compile=compile, max_steps=total, log_every_n_steps=50)
    timer = StepTimer(warmup, steps, profile_steps, sync_debug)
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
    if sync_debug:
        res["host_syncs"] = timer.syncs
    if timer.prof is not None and timer.profile_wall_s is not None:
        res["profile"] = kernel_breakdown(timer.prof, profile_steps)
        res["profile"]["wall_ms_per_step_profiled"] = 1000 * timer.profile_wall_s / profile_steps
    return res
