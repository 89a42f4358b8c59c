"""What a person sees: the run summary block, the progress bar after a resume, the quiet console, CPU threads."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from conftest import TINY_OVERRIDES, run_cli

from deepseek_mini.config import ConfigError
from deepseek_mini.training.summary import format_summary
from deepseek_mini.training.threads import resolve_cpu_threads

RESULTS = {
    "run_dir": "/runs/r1", "val_loss": 4.416491985321045, "val_loss_start": 8.335296630859375,
    "val_perplexity": 82.7912, "train_loss": 4.38123, "global_step": 200, "tokens_seen": 409600,
    "tokens_per_sec": 7312.4, "time_to_first_step_sec": 1.23, "wall_time_sec": 61.04,
    "checkpoint": "/runs/r1/checkpoints/last.ckpt", "best_checkpoint": "/runs/r1/checkpoints/best-step200.ckpt",
}


def test_summary_block_has_every_field():
    text = format_summary(RESULTS)
    assert "8.3353 -> 4.4165" in text and "8.335296" not in text  # 4 decimals
    assert "perplexity 82.79" in text
    assert "409,600 seen" in text and "7,312 tokens/s" in text
    assert "first step after 1.2 s" in text and "wall 1 min 1.0 s" in text
    assert "best ckpt: /runs/r1/checkpoints/best-step200.ckpt" in text
    assert "last ckpt: /runs/r1/checkpoints/last.ckpt" in text
    assert "run dir: /runs/r1" in text
    assert "resume: python train.py hydra.run.dir=/runs/r1 ckpt_path=last trainer.max_steps=400" in text
    assert "evaluate: python eval.py ckpt_path=/runs/r1/checkpoints/best-step200.ckpt" in text


def test_summary_block_without_checkpoint_or_start_loss():
    """debug=fdr: no checkpoint, no validation before fit; a validation batch still ran, so its loss shows."""
    text = format_summary({**RESULTS, "checkpoint": None, "best_checkpoint": None, "val_loss_start": None,
                           "run_dir": "/runs/my run"})
    assert "None" not in text and "val loss: 4.4165" in text
    assert "resume:" not in text and "evaluate:" not in text
    assert "run dir: /runs/my run" in text


def _loader():
    torch.manual_seed(0)
    data = torch.randint(0, 300, (6, 2, 17))
    return torch.utils.data.DataLoader([(b[:, :-1], b[:, 1:]) for b in data], batch_size=None)


def test_progress_bar_after_resume_counts_optimizer_steps(tmp_path):
    """Resumed at step 4 of 8: the bar ends at 8/8 (Lightning's counted this fit's batches against the
    remaining steps: 40/29), no `Epoch 0/-2`, no `v_num`; loss, val loss, lr and tokens/s are shown."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_module import TINY

    from deepseek_mini.training.callbacks import ProgressBar, ThroughputMonitor
    from deepseek_mini.training.module import LitDeepSeek

    def trainer(max_steps, bar=None):
        return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=2, default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), ThroughputMonitor(window=2),
                                    bar or ProgressBar(every_n_steps=2)])

    first = trainer(4)
    first.fit(LitDeepSeek(TINY, optim={"lr": 1e-2}, max_steps=8, log_every_n_steps=2), train_dataloaders=_loader(),
              val_dataloaders=_loader())
    seen = {}

    class Spy(ProgressBar):
        def on_train_end(self, trainer, pl_module):
            task = self.progress.tasks[self.train_progress_bar_id]
            seen.update(completed=task.completed, total=task.total, description=task.description,
                        metrics=self.get_metrics(trainer, pl_module))
            super().on_train_end(trainer, pl_module)

    resumed = trainer(8, Spy(every_n_steps=2))
    resumed.fit(LitDeepSeek(TINY, optim={"lr": 1e-2}, max_steps=8, log_every_n_steps=2), train_dataloaders=_loader(),
                val_dataloaders=_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.global_step == 8
    assert (seen["completed"], seen["total"]) == (8, 8)
    assert "Epoch" not in seen["description"] and "train" in seen["description"]
    metrics = seen["metrics"]
    assert "v_num" not in metrics
    assert {"loss", "val", "lr", "tok/s"} <= set(metrics), metrics
    assert float(metrics["val"]) == pytest.approx(float(resumed.callback_metrics["val/loss"]), abs=1e-4)


def test_quiet_console_drops_library_noise():
    import lightning as L

    from deepseek_mini.training.console import quiet_console

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_console()
        warnings.warn("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is"
                      " not resumable.", UserWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("Precision bf16-mixed is not supported by the model summary.  Estimated model size in MB will"
                      " not be accurate. Using 32 bits instead.", UserWarning, stacklevel=1)
        warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).addHandler(handler)
        try:
            L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        finally:
            for name in ("lightning.pytorch", "lightning.fabric"):
                logging.getLogger(name).removeHandler(handler)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]
    messages = [r.getMessage() for r in records]
    assert not any("litlogger" in m or "TPU available" in m for m in messages), messages
    assert logging.getLogger("matplotlib").getEffectiveLevel() >= logging.INFO
    assert logging.getLogger("datasets").getEffectiveLevel() >= logging.WARNING  # "JAX version ... available"
    from deepseek_mini.training.console import _LIGHTNING_NOISE

    for gpu_line in ("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]",
                     "You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize them, "
                     "you should set `torch.set_float32_matmul_precision('medium' | 'high')`"):
        assert not _LIGHTNING_NOISE.filter(logging.makeLogRecord({"msg": gpu_line}))


@pytest.mark.parametrize("value, accelerator, expected", [("auto", "cpu", 1), ("2", "cpu", 2), (3, "auto", 3)])
def test_cpu_threads(value, accelerator, expected, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_cpu_threads(value, {"accelerator": accelerator}) == expected


def test_cpu_threads_auto_leaves_gpu_runs_and_omp_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_cpu_threads("auto", {"accelerator": "gpu"}) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_cpu_threads("auto", {"accelerator": "cpu"}) is None


@pytest.mark.parametrize("bad", ["many", 0, -1, 1.5, True])
def test_cpu_threads_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=rf"^cpu_threads={bad}: must be auto or a positive integer$"):
        resolve_cpu_threads(bad)


def test_wandb_logger_is_quiet(tmp_path):
    from deepseek_mini.training.loggers import WandbLogger

    quiet = WandbLogger(project="p", offline=True, save_dir=str(tmp_path))
    assert quiet._wandb_init["settings"].silent is True
    assert "anonymous" not in quiet._wandb_init  # Lightning's anonymous=None made wandb warn
    loud = WandbLogger(project="p", offline=True, save_dir=str(tmp_path), verbose=True)
    assert "settings" not in loud._wandb_init


@pytest.mark.slow
def test_tiny_run_ends_on_the_summary_block(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if o != "callbacks.progress_bar=null"]
    proc = run_cli("train.py", *overrides, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}")
    lines = proc.stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if "run summary" in line)
    block = "\n".join(lines[start:])
    assert lines[-1] == f"results: {run_dir.resolve() / 'results.json'}", lines[-3:]
    res = json.loads((run_dir / "results.json").read_text())
    assert f"{res['val_loss_start']:.4f} -> {res['val_loss']:.4f}" in block
    assert f"run dir: {run_dir.resolve()}" in block and "resume: python train.py hydra.run.dir=" in block
    assert res["time_to_first_step_sec"] is not None and res["time_to_first_step_sec"] > 0
    out = proc.stdout + proc.stderr
    for noise in ("litlogger", "LeafSpec", "anonymous setting", "Total FLOPs", "\nwandb:", "v_num", "Epoch 0"):
        assert noise not in out, noise  # (the tests set WANDB_SILENT; test_wandb_logger_is_quiet covers wandb)
    # the offline wandb run is readable without an account
    assert json.loads((run_dir / "wandb" / "summary.json").read_text())["val_loss"] == res["val_loss"]
    assert json.loads((run_dir / "wandb" / "config.json").read_text())["model"]["vocab_size"] == 512


@pytest.mark.slow
def test_fast_dev_run_reports_its_validation_loss(cache_dir, tmp_path):
    proc = run_cli("train.py", *TINY_OVERRIDES, "debug=fdr", f"paths.cache_dir={cache_dir}",
                   f"hydra.run.dir={tmp_path / 'fdr'}")
    assert "val loss: None" not in proc.stdout and "-> None" not in proc.stdout
    assert "matplotlib" not in proc.stdout + proc.stderr
    res = json.loads((tmp_path / "fdr" / "results.json").read_text())
    assert res["val_loss"] is not None
