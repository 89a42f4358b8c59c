"""Callbacks that report on a run: a sync-free progress bar, throughput + MFU, expert-load heatmaps, sample
generations. (The checkpoint callbacks are in checkpointing.py.)"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from deepseek_mini.config import flops_per_token
from deepseek_mini.training import startup

log = logging.getLogger(__name__)

# Measured bf16 dense matmul ceiling of an H100 (FLOPs/s); the default peak for MFU on a GPU.
DEFAULT_GPU_PEAK_FLOPS = 798e12


def _wandb(trainer: L.Trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _files_only(level: int, msg: str, *args) -> None:
    """A log record for train.log only: console handlers would write into the live progress bar's line."""
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, msg, args, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class ProgressBar(RichProgressBar):
    """Rich progress bar over optimizer steps: `train 40/200 ━━━ 0:00:12 • 0:00:48 loss 4.38 | val 4.42 |
    lr 3.0e-04 | tok/s 12.3k` (elapsed • ETA).

    * Counts optimizer steps against trainer.max_steps, from trainer.global_step, so a run resumed at step 40
      of 200 shows 40/200 (Lightning's default counts batches of this fit against the remaining steps and
      shows `40/29`, `Epoch 0/-2` for max_epochs=-1, and the logger's `v_num`; none of these here).
    * No host sync per step: Lightning turns every value logged with `prog_bar=True` into a Python number
      after *every* batch, and each `.item()` stalls the host until the GPU has finished the step (6 ms of
      idle GPU per step on the `small` MoE on an H100). LitDeepSeek therefore logs train/loss and train/lr
      without `prog_bar`; this bar reads them from the trainer's callback metrics itself, once every
      `every_n_steps` optimizer steps. tokens/s is ThroughputMonitor's last window (already a Python
      number); val loss is read after each validation. (`refresh_rate` stays Rich's redraws per second.)
    """

    # callback metric -> label in the bar
    LABELS = {"train/loss": "loss", "val/loss": "val", "train/lr": "lr"}

    @staticmethod
    def check_config_options(options: dict, key: str, model=None) -> None:
        """Value rules, run by the settings check before data preparation (run_config.check_node_options)."""
        from deepseek_mini.training.run_config import as_int

        as_int(f"{key}.every_n_steps", options.get("every_n_steps"))

    def __init__(self, every_n_steps: int = 10, show: tuple[str, ...] | list[str] = ("train/loss", "train/lr"),
                 **kwargs):
        super().__init__(**kwargs)
        self.every_n_steps = max(1, int(every_n_steps))
        self.show = tuple(show)
        self._shown: dict[str, float] = {}
        self._shown_step: int | None = None

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps is not None and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'train':{len(self.validation_description)}}"  # padded like "Validation": no flicker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch: on_train_epoch_start did not run
        self._update(self.train_progress_bar_id, trainer.global_step)  # optimizer steps, resumed ones included
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        step = trainer.global_step
        if trainer.training and (self._shown_step is None or step - self._shown_step >= self.every_n_steps):
            metrics = trainer.callback_metrics
            shown = {k: float(metrics[k]) for k in self.show if k in metrics}  # the one sync, per interval
            if shown:  # nothing logged yet (the first batch): try again next batch
                self._shown, self._shown_step = shown, step
        values = dict(self._shown)
        val = trainer.progress_bar_metrics.get("val/loss")  # a float since the last validation ended
        if val is not None:
            values["val/loss"] = float(val)
        out = {}
        for key in (*self.show, "val/loss"):
            if key in values:
                label = self.LABELS.get(key, key)
                out[label] = f"{values[key]:.1e}" if key.endswith("/lr") else f"{values[key]:.4f}"
        monitor = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
        if monitor is not None and monitor.last_tokens_per_sec:
            out["tok/s"] = _si(monitor.last_tokens_per_sec)
        return out  # Lightning's own items (v_num, ...) are left out on purpose


class ThroughputMonitor(L.Callback):
    """tokens/s and MFU over windows of `window` optimizer steps, excluding validation time.

    The only device synchronisation is at the end of each window. MFU = analytic training FLOPs per
    token (6 x active matmul params + attention term, `deepseek_mini.config.flops_per_token`) x tokens/s
    / `peak_flops` per device. Also keeps the run totals for results.json: `tokens_seen`, and
    `tokens_per_sec` without the run's first window (a resumed run is a new run), which holds torch.compile,
    CUDA-graph recording and cuDNN autotuning: with it, a 40-step compiled `small` run on an H100 reported
    28k tokens/s against a steady ~240k. `time_to_first_step` is the seconds from the process launch
    (training/startup.py) to the end of the first optimizer step (one sync, once); `fit_to_first_step` the
    part from the start of trainer.fit() (setup, torch.compile, the first batch), `compile_time` torch's
    own count of compile seconds in it.
    """

    @staticmethod
    def check_config_options(options: dict, key: str, model=None) -> None:
        """Value rules, run by the settings check before data preparation (run_config.check_node_options)."""
        from deepseek_mini.training.run_config import as_float, as_int

        as_int(f"{key}.window", options.get("window"))
        if options.get("peak_flops") is not None:  # MFU divides by it
            as_float(f"{key}.peak_flops", options["peak_flops"], 0.0, rule="must be a positive number (FLOPs/s) or null")

    def __init__(self, window: int = 10, peak_flops: float | None = None):
        self.window = max(1, int(window))
        self.peak_flops = peak_flops
        self.tokens_seen = 0
        self.train_time = 0.0
        self._warmup: tuple[float, int] | None = None  # (seconds, tokens) of this fit's first window
        self._t0: float | None = None
        self._tokens_in_window = 0
        self._flops_per_token = 0.0
        self.last_tokens_per_sec = 0.0  # the last window's rate (the progress bar shows it)
        self.time_to_first_step: float | None = None  # from the process launch
        self.fit_to_first_step: float | None = None  # from trainer.fit()
        self.compile_time: float | None = None  # torch.compile's seconds before the first step
        self.graphs: dict | None = None  # graphs before the first step: from Inductor's cache / compiled
        self._t_fit_start: float | None = None

    def on_fit_start(self, trainer, pl_module):
        self._t_fit_start = time.perf_counter()

    def _tokens_per_step(self, trainer, pl_module, batch) -> int:
        x = batch[0]
        return int(x.numel()) * trainer.world_size

    def on_train_start(self, trainer, pl_module):
        seq_len = trainer.datamodule.seq_len if trainer.datamodule is not None else 256
        self._flops_per_token = flops_per_token(pl_module.config, seq_len)
        if self.peak_flops is None and pl_module.device.type == "cuda":
            self.peak_flops = DEFAULT_GPU_PEAK_FLOPS
        self._t0 = None  # started at the first training batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens_in_window += self._tokens_per_step(trainer, pl_module, batch)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if self.time_to_first_step is None and self._t_fit_start is not None:
            _sync(pl_module.device)
            self.fit_to_first_step = time.perf_counter() - self._t_fit_start
            self.time_to_first_step = startup.seconds_since_start()
            self.compile_time = startup.compile_seconds()
            self.graphs = startup.graph_counts()
        if trainer.global_step % self.window == 0 and self._t0 is not None:
            _sync(pl_module.device)
            now = time.perf_counter()
            dt = max(1e-9, now - self._t0)
            tps = self._tokens_in_window / dt
            self.last_tokens_per_sec = tps
            self._add(dt, self._tokens_in_window)
            metrics = {"train/tokens_per_sec": tps, "train/tokens_seen": float(self.tokens_seen)}
            if self.peak_flops:
                metrics["train/mfu"] = self._flops_per_token * tps / trainer.world_size / float(self.peak_flops)
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)
            self._tokens_in_window, self._t0 = 0, now

    def _add(self, seconds: float, tokens: int) -> None:
        self.train_time += seconds
        self.tokens_seen += tokens
        if self._warmup is None:
            self._warmup = (seconds, tokens)

    def _pause(self, pl_module):
        if self._t0 is not None:
            _sync(pl_module.device)
            self._add(time.perf_counter() - self._t0, self._tokens_in_window)
            self._tokens_in_window, self._t0 = 0, None

    def on_validation_start(self, trainer, pl_module):
        self._pause(pl_module)  # validation time is not training time

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:  # resume timing after a validation (and its checkpointing / sampling hooks)
            _sync(pl_module.device)
            self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._pause(pl_module)

    @property
    def tokens_per_sec(self) -> float:
        """Steady-state rate: everything after the first window, or all of it when there is only one."""
        warm_s, warm_tokens = self._warmup or (0.0, 0)
        if self.train_time - warm_s > 0 and self.tokens_seen - warm_tokens > 0:
            return (self.tokens_seen - warm_tokens) / (self.train_time - warm_s)
        return self.tokens_seen / self.train_time if self.train_time else 0.0


# The heatmap's fixed colour scale: load / mean of the layer, on a log2 axis from 1/4 to 4 (0 = an expert
# that got no token is drawn at the bottom colour). Fixed so that two validations, or two runs, compare
# colour for colour; 1.0 (perfect balance) is the middle of the scale.
HEATMAP_RANGE = (0.25, 4.0)


def expert_heatmap_figure(load: torch.Tensor, layers: list[int], title: str):
    """Tokens per expert, one row per MoE layer, normalised by the row mean (1.0 = perfectly balanced),
    on the fixed HEATMAP_RANGE log scale (values outside are clipped to its end colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    lo, hi = HEATMAP_RANGE
    rel = (load / load.mean(dim=1, keepdim=True).clamp_min(1e-9)).clamp(lo, hi).numpy()
    n_layers, n_experts = rel.shape
    # readable at any expert count: 7-14 inches wide (a 160-expert V2 layer gets thin cells, not a 60" figure)
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.0, 0.25 * n_experts + 3)), min(9.0, max(3.0, 0.4 * n_layers + 1.8))))
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=LogNorm(vmin=lo, vmax=hi), interpolation="nearest")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_xticks(range(n_experts), [str(e) if n_experts <= 32 or e % 4 == 0 else "" for e in range(n_experts)])
    ax.set_yticks(range(n_layers), [str(layer) for layer in layers])
    ax.set_title(title)
    bar = fig.colorbar(im, ax=ax, label="tokens / layer mean (1 = balanced)")
    bar.ax.minorticks_off()  # LogNorm's minor labels (3x10^-1, ...) only clutter the five that matter
    bar.set_ticks([0.25, 0.5, 1.0, 2.0, 4.0], labels=["<=1/4", "1/2", "1", "2", ">=4"])
    fig.tight_layout()
    return fig


class ExpertLoadHeatmap(L.Callback):
    """After each validation: a tokens-per-expert heatmap (wandb image, and <run dir>/expert_load.png) on a
    fixed colour scale, and each MoE layer's max/mean load as a wandb line over validation steps.

    The validation before training is drawn once the first optimizer step is done (at the start of the second,
    or at the end of the fit): drawing it costs ~0.5 s of matplotlib that the first step need not wait for."""

    def __init__(self):
        self.history: list[list[float]] = []  # [step, layer 0 max load, layer 1 ...], one row per validation
        self._before_fit: tuple[torch.Tensor, int] | None = None  # the validation before training, not drawn yet

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        load = getattr(pl_module, "val_expert_load", None)
        if load is None or trainer.sanity_checking:
            return
        if trainer.global_step == 0 and not trainer.training and self._before_fit is None and not self.history:
            self._before_fit = (load, trainer.global_step)
            return
        self._draw_before_fit(trainer, pl_module)
        self._draw(trainer, pl_module, load, trainer.global_step)

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= 1:
            self._draw_before_fit(trainer, pl_module)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module):
        self._draw_before_fit(trainer, pl_module)

    @rank_zero_only
    def on_exception(self, trainer, pl_module, exception):
        self._draw_before_fit(trainer, pl_module)

    def _draw_before_fit(self, trainer, pl_module) -> None:
        if self._before_fit is not None:
            load, step = self._before_fit
            self._before_fit = None
            self._draw(trainer, pl_module, load, step)

    def _draw(self, trainer, pl_module, load: torch.Tensor, step: int) -> None:
        import matplotlib.pyplot as plt

        layers = pl_module.config.moe_layer_indices
        fig = expert_heatmap_figure(load, layers, f"expert load, validation at step {step}")
        out = Path(trainer.default_root_dir) / "expert_load.png"
        fig.savefig(out, dpi=120)
        rel_max = (load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)).tolist()
        self.history.append([step, *rel_max])
        wb = _wandb(trainer)
        if wb is not None:
            import wandb

            line = wandb.plot.line_series(
                xs=[row[0] for row in self.history], ys=[[row[i + 1] for row in self.history] for i in range(len(layers))],
                keys=[f"layer {layer}" for layer in layers], title="max expert load / mean, per MoE layer",
                xname="step")
            wb.experiment.log({"val/expert_load_heatmap": wandb.Image(fig), "val/expert_max_load_by_layer": line,
                               "trainer/global_step": step})
        plt.close(fig)


class SampleGenerations(L.Callback):
    """After each validation: continue a few prompts; a growing wandb table (step, prompt, sample), and the
    samples in train.log (not on the console, where they would land in the progress bar's line).

    `prompts: null` takes them from the validation text: the first `prompt_tokens` tokens of the first
    `n_prompts` windows of the first validation batch, fixed for the run so samples compare across steps.
    `at_start`: also sample at the validation before training (step 0). Off by default: an untrained model's
    samples are noise, and they came before the first optimizer step: 3-4 s of a warm start at `small` on an H200,
    up to ~9 s of a cold one (the first eager decode: CUDA's and the decode kernels' first launches).
    """

    @staticmethod
    def check_config_options(options: dict, key: str, model=None) -> None:
        """Value rules, run by the settings check before data preparation (run_config.check_node_options): the
        sampling rules of eval.py and generate.py (generation_args.check_sampling), which the model's generate()
        would otherwise apply at the first validation, after training had run."""
        from deepseek_mini.generation_args import check_sampling
        from deepseek_mini.training.run_config import _fail, as_int

        check_sampling(options, prefix=f"{key}.")
        as_int(f"{key}.n_prompts", options.get("n_prompts"), low=0)
        as_int(f"{key}.prompt_tokens", options.get("prompt_tokens"))
        prompts = options.get("prompts")
        if prompts is not None and (not isinstance(prompts, (list, tuple))
                                    or not all(isinstance(p, str) for p in prompts)):
            # list("abc") would sample from the prompts "a", "b" and "c"
            _fail(f"{key}.prompts", prompts, "a list of prompts (e.g. ['def ','class ']) or null")
        max_new = options.get("max_new_tokens")
        if model is not None and max_new >= model.max_position_embeddings:  # at least one prompt token must fit
            _fail(f"{key}.max_new_tokens", max_new,
                  f"must be < model.max_position_embeddings={model.max_position_embeddings}")

    def __init__(self, prompts: list[str] | None = None, max_new_tokens: int = 48, temperature: float = 0.8,
                 top_k: int | None = 50, seed: int = 0, n_prompts: int = 3, prompt_tokens: int = 8,
                 at_start: bool = False):
        self.prompts = list(prompts) if prompts is not None else None
        self.max_new_tokens, self.temperature, self.top_k, self.seed = max_new_tokens, temperature, top_k, seed
        self.n_prompts, self.prompt_tokens = int(n_prompts), int(prompt_tokens)
        self.at_start = bool(at_start)
        self.rows: list[list[Any]] = []
        self._val_windows: torch.Tensor | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.prompts is None and self._val_windows is None and batch_idx == 0:
            self._val_windows = batch[0][: self.n_prompts, : self.prompt_tokens].detach().cpu()

    def prompts_from_validation(self, tok) -> list[str]:
        if self._val_windows is None:
            return []
        return [text for text in (tok.decode(row.tolist()) for row in self._val_windows) if text.strip()]

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        dm = trainer.datamodule
        tok = getattr(dm, "tokenizer", None)
        if tok is None or trainer.sanity_checking or (trainer.global_step == 0 and not self.at_start):
            return
        if self.prompts is None:
            self.prompts = self.prompts_from_validation(tok) or None
        if not self.prompts:
            return
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        from deepseek_mini.training.expert_parallel import is_expert_parallel

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)) or is_expert_parallel(trainer.strategy):
            # sharded parameters (FSDP, or experts under trainer=ep): a forward on rank 0 alone would wait forever
            # for the other ranks' shards
            if not getattr(self, "_warned_sharded", False):
                log.warning("sample generation is skipped under FSDP and expert parallelism; sample from the "
                            "(consolidated) checkpoint")
                self._warned_sharded = True
            return
        model = pl_module.model
        limit = model.config.max_position_embeddings
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        for prompt in self.prompts:
            ids = tok.encode(prompt).ids[-(limit - self.max_new_tokens):] or [dm.eos_token_id]
            x = torch.tensor([ids], device=pl_module.device)
            with torch.autocast(pl_module.device.type, dtype=torch.bfloat16, enabled=pl_module.device.type == "cuda"):
                out = model.generate(x, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                     generator=g)
            text = tok.decode(out[0, len(ids):].tolist())
            self.rows.append([trainer.global_step, prompt, text])
            _files_only(logging.INFO, "sample @ step %d: %r -> %r", trainer.global_step, prompt, text[:200])
        wb = _wandb(trainer)
        if wb is not None:
            wb.log_text("val/samples", columns=["step", "prompt", "sample"], data=self.rows, step=trainer.global_step)
