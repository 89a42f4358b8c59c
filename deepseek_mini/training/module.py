"""LitDeepSeek: the LightningModule around DeepSeekV2.

* loss = next-token cross-entropy + the model's auxiliary balance losses (+ lambda x the multi-token
  prediction loss when model.num_nextn_predict_layers > 0), added here explicitly;
* AdamW (decay on >=2-D parameters only; a Triton step on CUDA; deepseek_mini/optim/) with warmup + cosine /
  DeepSeek's step schedule; on one GPU under bf16-mixed the weight matrices are bf16 during fit, with
  their fp32 masters in that optimizer (optim.bf16_weights; checkpoints hold the fp32 values);
* the auxiliary-loss-free bias update after every optimizer step (summed over ranks under DDP);
* optional torch.compile of the inner model (training/compile.py: each transformer block once per block
  kind, or the whole model), kept out of the state dict (keys stay "model.*"); with a CUDA-graph mode
  (`compile="reduce-overhead"`) the compiled forward and backward are replayed as CUDA graphs.

Logging stays free of extra host syncs on the GPU: per-step values are logged as tensors (Lightning
reads them only every `log_every_n_steps`), and the router statistics and gradient norm are computed
only on those logging steps.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2
from deepseek_mini.optim.adamw import TritonAdamW
from deepseek_mini.optim.clip import clip_in_fused_step, grad_norm
from deepseek_mini.optim.policy import build_adamw, param_groups
from deepseek_mini.optim.precision import bf16_weight_parameters, bf16_weights_on
from deepseek_mini.optim.schedule import lr_lambda
from deepseek_mini.training.compile import compile_kernels_ahead, compile_model, parse_compile
from deepseek_mini.training.expert_parallel import is_expert_parallel
from deepseek_mini.training.val_loss import TokenMeanLoss


def expert_load_stats(tokens_per_expert: torch.Tensor) -> dict[str, torch.Tensor]:
    """max/mean and min/mean load and normalised routing entropy (1 = perfectly even) of one layer."""
    tpe = tokens_per_expert.float()
    mean = tpe.mean().clamp_min(1e-9)
    p = tpe / tpe.sum().clamp_min(1e-9)
    entropy = -(p * p.clamp_min(1e-12).log()).sum() / math.log(max(2, tpe.numel()))
    return {"max_load": tpe.max() / mean, "min_load": tpe.min() / mean, "entropy": entropy}


def _sharded_grads(trainer) -> bool:
    """True under FSDP with sharding: p.grad is this rank's shard, so norms need a cross-rank sum."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    return (isinstance(strategy, FSDPStrategy) and trainer.world_size > 1
            and getattr(strategy.sharding_strategy, "name", "") != "NO_SHARD")


class LitDeepSeek(L.LightningModule):
    def __init__(self, model_config: dict[str, Any], optim: dict[str, Any] | None = None,
                 scheduler: dict[str, Any] | None = None, compile: bool | str = False, max_steps: int = 1000,
                 log_every_n_steps: int = 10):
        super().__init__()
        # plain dicts only, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters()
        self.model = DeepSeekV2(ModelConfig.from_dict(model_config))
        self.optim_cfg = dict(optim or {})
        self.sched_cfg = dict(scheduler or {"name": "constant", "warmup_steps": 0})
        self.compile = parse_compile(compile)  # a CompileSpec (scope, mode), or None
        # CUDA graphs (cudagraph trees) reuse their output buffers on the next replay: anything kept past
        # the step that produced it (logged values, validation sums) is cloned first
        self._cudagraphs = self.compile is not None and self.compile.cudagraphs
        self.max_steps = max_steps
        self.log_every = max(1, int(log_every_n_steps))
        self._forward = self.model  # replaced by the compiled module in configure_model (not registered)
        self.eager_only = False  # eager(): the uncompiled model, whatever `compile` says
        self._stay_on_device = False  # kept_on_device(): Lightning's teardown leaves the weights where they are
        self._val_tpe: list[torch.Tensor] | None = None
        self._val_dropped: list[torch.Tensor] | None = None
        self.val_expert_load: torch.Tensor | None = None  # [moe layers, experts] tokens at the last validation
        self.val_history: list[tuple[int, float]] = []  # (global_step, val loss per target token)
        self.val_tokens = 0  # target tokens of the last validation
        self._master_opt: TritonAdamW | None = None  # holds the fp32 masters during fit (bf16_weights)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def configure_model(self) -> None:
        if self.compile and self._forward is self.model:
            # keep the compiled wrapper out of the module tree: state_dict keys stay "model.*"
            # dynamic=False: batches are packed to a fixed length; a different shape (a short last val
            # batch) gets its own static graph instead of turning the training graph dynamic
            object.__setattr__(self, "_forward", compile_model(self.model, self.compile, dynamic=False))

    def __setattr__(self, name, value):
        if name == "_forward":  # never register the (possibly compiled) alias as a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if self.eager_only:
            return self.model(input_ids, labels=labels, return_logits=False)
        if self._cudagraphs and self._forward is not self.model:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's graph outputs may be reused
        return self._forward(input_ids, labels=labels, return_logits=False)

    @contextmanager
    def kept_on_device(self):
        """Inside the block, `cpu()` leaves the module where it is. Lightning's teardown at the end of
        trainer.validate() moves the model to the CPU, and the fit() that follows the validation before fit moves
        it back: on a `small` run on an H200 that round trip of the fp32 weights (2.8 GB) cost ~1.7 s down
        (profiled, 2026-12-01) plus the way back, before the first training step."""
        self._stay_on_device = True
        try:
            yield
        finally:
            self._stay_on_device = False

    def cpu(self):
        if self._stay_on_device:
            return self
        return super().cpu()

    @contextmanager
    def eager(self):
        """Run the model uncompiled inside the block. The validation before fit() uses it: compiled, it would
        compile (and, with CUDA graphs, record) the forward-only eval graph before the first training step: on
        CPU (2026-11-30, a 3-layer `tiny`, compile=full, cold) the first step came at 158.7 s with it and 119.5 s
        without. The first validation inside fit() compiles that graph instead."""
        self.eager_only = True
        try:
            yield
        finally:
            self.eager_only = False

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        """A detached value that may outlive this step (a CUDA-graph output is overwritten by the next replay)."""
        t = t.detach()
        return t.clone() if self._cudagraphs else t

    # ------------------------------------------------------------------ steps
    def _log_router(self, prefix: str, router_stats: list[dict]) -> None:
        for layer, stats in zip(self.config.moe_layer_indices, router_stats):
            for k, v in expert_load_stats(stats["tokens_per_expert"]).items():
                self.log(f"{prefix}/moe/layer{layer}/{k}", v)
            self.log(f"{prefix}/moe/layer{layer}/dropped_fraction", self._keep(stats["dropped_fraction"]))
        if router_stats and "tokens_per_device" in router_stats[0]:  # expert parallelism: the real devices
            from deepseek_mini.training.expert_parallel import device_load_metrics

            for k, v in device_load_metrics(self.config.moe_layer_indices, router_stats, self.trainer.strategy).items():
                self.log(f"{prefix}/{k}", v)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x, y)
        loss = out.loss + out.aux_loss
        if out.mtp_loss is not None:  # multi-token prediction: lambda / D x sum of the depths' losses (model/mtp.py)
            loss = loss + out.mtp_loss
            self.log("train/mtp_loss", self._keep(sum(out.mtp_losses) / len(out.mtp_losses)))  # unweighted mean
            for k, value in enumerate(out.mtp_losses, start=1):
                self.log(f"train/mtp_loss_{k}", self._keep(value))
        lm = self._keep(out.loss)
        # not prog_bar=True: Lightning would turn it into a float after every batch, a host sync per step
        # (callbacks.ProgressBar reads it every log_every_n_steps instead)
        self.log("train/loss", lm)
        self.log("train/perplexity", torch.exp(lm))
        self.log("train/aux_loss", self._keep(out.aux_loss))
        for name, value in out.aux_losses.items():
            self.log(f"train/{name}", self._keep(value))
        if self.global_step % self.log_every == 0:
            self._log_router("train", out.router_stats)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step % self.log_every == 0:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            norm = None
            if is_expert_parallel(self.trainer.strategy):  # expert parallelism: every rank's experts
                norm = self.trainer.strategy.grad_norm(self)
            elif _sharded_grads(self.trainer):  # FSDP: each rank holds a shard; sum the squares over ranks
                sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.device))
                torch.distributed.all_reduce(sq)
                norm = sq.sqrt()
            elif grads:  # before clipping (Lightning clips after this hook)
                norm = grad_norm(optimizer, grads)
            if norm is not None:
                self.log("train/grad_norm", norm)
                if getattr(self.trainer.precision_plugin, "scaler", None) is None:  # fp16's scaled grads may be inf
                    self.last_grad_norm = norm.detach()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning refuses to clip for a fused AdamW under any AMP precision, because with fp16 a
        # GradScaler would still have to unscale the gradients. bf16 has no scaler, so the gradients are
        # already true gradients and plain norm clipping is exact; only fp16 goes through Lightning.
        # The total norm each clipping path computes is kept for NonFiniteLossGuard (training/guards.py), which
        # stops a run whose gradient norm is inf or NaN: clipping by an inf norm zeroes every update, so such a
        # run would otherwise go on, learn nothing and end "completed".
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        norm = None
        if (gradient_clip_val and is_expert_parallel(self.trainer.strategy)
                and gradient_clip_algorithm in (None, "norm")):  # expert parallelism: the norm over all experts
            norm = self.trainer.strategy.clip_grad_norm_(self, optimizer, gradient_clip_val)
        elif gradient_clip_val and _sharded_grads(self.trainer) and gradient_clip_algorithm in (None, "norm"):
            norm = self.trainer.model.clip_grad_norm_(gradient_clip_val)  # FSDP root: the norm over all shards
        elif gradient_clip_val and scaler is None and gradient_clip_algorithm in (None, "norm"):
            raw = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
            norm = clip_in_fused_step(raw, self.parameters(), gradient_clip_val)
            if norm is None:
                norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val, foreach=True)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if isinstance(norm, torch.Tensor):
            self.last_grad_norm = norm.detach()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        raw = getattr(optimizer, "_optimizer", optimizer)
        if getattr(raw, "grad_scale", None) is not None:  # clip_in_fused_step's scale holds for one step only
            raw.grad_scale = None
        # aux-loss-free balancing (DeepSeek-V3): nudge router biases from this step's expert counts
        all_reduce = None
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            def all_reduce(t):
                torch.distributed.all_reduce(t)
                return t
        self.model.update_expert_bias(all_reduce)

    def on_validation_epoch_start(self) -> None:
        self._val_tpe, self._val_dropped = None, None
        self._val_loss, self._val_batches = TokenMeanLoss(), 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x, y)
        # val/loss is logged once per validation, in on_validation_epoch_end, as the mean over target tokens
        # (eval.py computes the same number with the same TokenMeanLoss)
        self._val_loss.update(out.loss, y)
        self._val_batches += 1
        self.log("val/aux_loss", self._keep(out.aux_loss), sync_dist=True)
        for name, value in out.aux_losses.items():
            self.log(f"val/{name}", self._keep(value), sync_dist=True)
        if out.router_stats:
            tpe = [self._keep(s["tokens_per_expert"]).float() for s in out.router_stats]
            dropped = [self._keep(s["dropped_fraction"]).float() for s in out.router_stats]
            if self._val_tpe is None:
                self._val_tpe, self._val_dropped = tpe, dropped
            else:
                self._val_tpe = [a + b for a, b in zip(self._val_tpe, tpe)]
                self._val_dropped = [a + b for a, b in zip(self._val_dropped, dropped)]
        return self._keep(out.loss)

    def on_validation_epoch_end(self) -> None:
        if self._val_batches == 0:
            return
        n = self._val_batches
        distributed = self.trainer.world_size > 1 and torch.distributed.is_initialized()
        # the mean over all ranks' target tokens (val_history / results.json), not rank 0's shard
        mean, self.val_tokens = self._val_loss.compute(torch.distributed.all_reduce if distributed else None)
        loss = torch.tensor(mean, device=self.device)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)  # the same on all ranks
        self.log("val/perplexity", torch.exp(loss), sync_dist=True)
        self.val_history.append((int(self.global_step), mean))
        if self._val_tpe is not None:
            tpe = torch.stack(self._val_tpe)
            if self.trainer.world_size > 1 and torch.distributed.is_initialized():
                torch.distributed.all_reduce(tpe)
            self.val_expert_load = tpe.detach().cpu()
            for layer, row, dropped in zip(self.config.moe_layer_indices, tpe, self._val_dropped):
                for k, v in expert_load_stats(row).items():  # row is summed over ranks already
                    self.log(f"val/moe/layer{layer}/{k}", v, sync_dist=True)
                self.log(f"val/moe/layer{layer}/dropped_fraction", dropped / n, sync_dist=True)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        o = self.optim_cfg
        optimizer = build_adamw(param_groups(self.model, float(o.get("weight_decay", 0.1))), o.get("fused", "auto"),
                                torch.cuda.is_available() and self.device.type == "cuda", o.get("moments_dtype", "auto"),
                                lr=float(o.get("lr", 3e-3)), betas=tuple(o.get("betas", (0.9, 0.95))),
                                eps=float(o.get("eps", 1e-8)))
        self._use_bf16_weights(optimizer)
        # the Triton kernels of the step (model, optimizer) compile in the background while the first step is
        # compiled and run, not one after the other inside it (training/compile.py)
        compile_kernels_ahead(self.config, str(self.trainer.precision) if self._trainer is not None else "32",
                              self.device)
        if isinstance(optimizer, TritonAdamW):
            optimizer.compile_ahead(scaled=self._step_divides_gradients())
        if getattr(optimizer, "moments_dtype", torch.float32) == torch.bfloat16:
            rank_zero_info("optim.moments_dtype: AdamW moments stored in bf16 (updated in fp32; DeepSeek-V3's optimizer "
                           "states); optim.moments_dtype=float32 keeps them fp32")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.sched_cfg, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _step_divides_gradients(self) -> bool:
        """Whether the fused AdamW steps of this fit will divide the gradients by `grad_scale`: norm clipping
        folded into the step (configure_gradient_clipping: one GPU, DDP, expert parallelism; not FSDP's sharded
        gradients), or fp16's GradScaler."""
        trainer = self._trainer
        if trainer is None:
            return False
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return True
        return bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm in (None, "norm") and \
            not _sharded_grads(trainer)

    def _use_bf16_weights(self, optimizer) -> None:
        """optim.bf16_weights: the weight matrices in bf16 for this fit, their fp32 values in the optimizer."""
        from lightning.pytorch.strategies import SingleDeviceStrategy

        if self._master_opt is not None:  # a fit that raised never reached on_fit_end: its masters are the truth
            self._master_opt.release_masters()
            self._master_opt = None
        trainer = self._trainer  # None when configure_optimizers is called outside a Trainer
        on = bf16_weights_on(
            self.optim_cfg.get("bf16_weights", "auto"), optimizer, on_cuda=self.device.type == "cuda",
            bf16_autocast=trainer is not None and str(trainer.precision) == "bf16-mixed",
            single_device=trainer is not None and type(trainer.strategy) is SingleDeviceStrategy,
            accumulate=trainer.accumulate_grad_batches if trainer is not None else 1)
        if on:
            weights = bf16_weight_parameters(self.model)
            optimizer.keep_fp32_masters(weights)
            self._master_opt = optimizer
            rank_zero_info(f"optim.bf16_weights: {sum(p.numel() for p in weights) / 1e6:.0f}M weights (the matrices "
                           "but the embedding) in bf16 for this fit, their fp32 masters in the optimizer (checkpoints "
                           "hold fp32)")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints hold the fp32 masters, not the bf16 copies: the same file an fp32 run writes. (Like
        # the state_dict's own entries these are the live tensors; the checkpoint IO serialises them at once.)
        if self._master_opt is not None:
            names = {p: name for name, p in self.named_parameters()}
            for p, master in self._master_opt.masters.items():
                checkpoint["state_dict"][names[p]] = master.detach()

    def on_fit_start(self) -> None:
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        """compile=regional:reduce-overhead records the training step at the first one of each fit: the weights it
        reads (bf16 during fit, fp32 outside) are other tensors from one fit to the next."""
        if hasattr(self._forward, "reset"):
            self._forward.reset()

    def on_fit_end(self) -> None:
        self._drop_graphs()
        # outside fit() the model is fp32 again, holding the master values
        if self._master_opt is not None:
            self._master_opt.release_masters()
            self._master_opt = None
