"""What a person sees: the run summary block (end to end: test_train.py), the progress bar after a resume, the quiet
console, CPU threads."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
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


def test_samples_skip_the_validation_before_training_unless_asked():
    """SampleGenerations: no samples at step 0 (an untrained model's, before the first optimizer step: seconds of the
    cold start) unless at_start; samples at every later validation either way."""
    from types import SimpleNamespace

    from deepseek_mini.training.callbacks import SampleGenerations

    calls = []

    class Model:
        config = SimpleNamespace(max_position_embeddings=64)

        def generate(self, x, n, **kw):
            calls.append(n)
            return torch.zeros(1, x.shape[1] + n, dtype=torch.long)

    tok = SimpleNamespace(encode=lambda s: SimpleNamespace(ids=[1, 2]), decode=lambda ids: "x")
    pl_module = SimpleNamespace(model=Model(), device=torch.device("cpu"))
    for step, at_start, expected in ((0, False, 0), (0, True, 1), (2, False, 1), (2, True, 1)):
        trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tok, eos_token_id=0), sanity_checking=False,
                                  global_step=step, strategy=object(), loggers=[])
        calls.clear()
        SampleGenerations(prompts=["a"], max_new_tokens=4, at_start=at_start).on_validation_end(trainer, pl_module)
        assert calls == [4] * expected, (step, at_start)


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
    # on a machine with a GPU, Lightning's advice for this CPU Trainer ("GPU available but not used") is no noise
    assert [str(w.message) for w in caught if "GPU available but not used" not in str(w.message)] == \
        ["an unrelated warning"]
    messages = [r.getMessage() for r in records]
    assert not any("litlogger" in m or "TPU available" in m for m in messages), messages
    assert logging.getLogger("matplotlib").getEffectiveLevel() >= logging.INFO
    assert logging.getLogger("datasets").getEffectiveLevel() >= logging.WARNING  # "JAX version ... available"
    from deepseek_mini.training.console import _LIGHTNING_NOISE

    for gpu_line in ("LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]",
                     "You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize them, "
                     "you should set `torch.set_float32_matmul_precision('medium' | 'high')`"):
        assert not _LIGHTNING_NOISE.filter(logging.makeLogRecord({"msg": gpu_line}))


@pytest.mark.parametrize("value, accelerator, expected", [("auto", "cpu", 1), ("1", "cpu", 1),
                                                           (os.cpu_count(), "auto", os.cpu_count())])
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
def test_fast_dev_run_reports_its_validation_loss(cache_dir, tmp_path):
    proc = run_cli("train.py", *TINY_OVERRIDES, "debug=fdr", f"paths.cache_dir={cache_dir}",
                   f"hydra.run.dir={tmp_path / 'fdr'}")
    assert "val loss: None" not in proc.stdout and "-> None" not in proc.stdout
    assert "matplotlib" not in proc.stdout + proc.stderr
    res = json.loads((tmp_path / "fdr" / "results.json").read_text())
    assert res["val_loss"] is not None


@pytest.mark.slow
def test_resumed_offline_wandb_run_keeps_one_directory(cache_dir, tmp_path, capsys, monkeypatch):
    """wandb names an offline run's directory after its start second, so a resume (same run id) used to
    leave a second offline-run-* directory; now its transaction log is folded into the first one, where
    `wandb sync <dir>` finds both parts of the run."""
    import wandb

    try:
        _resume_offline_wandb_run_in_process(tmp_path / "run", cache_dir, capsys, monkeypatch)
    finally:  # the in-process wandb service puts WANDB_SERVICE in os.environ: later CLI subprocesses would share
        wandb.teardown()  # it, and a SIGKILLed run's id would stay "in use" there
        os.environ.pop("WANDB_SERVICE", None)


def _resume_offline_wandb_run_in_process(run_dir, cache_dir, capsys, monkeypatch):
    from test_reliability import TINY, run_inprocess

    common = [*TINY, f"paths.cache_dir={cache_dir}", "logger=wandb", f"hydra.run.dir={run_dir}"]
    code, out = run_inprocess("train.py", [*common, "trainer.max_steps=4"], capsys, monkeypatch)
    assert code == 0, out[-3000:]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    (first,) = (run_dir / "wandb").glob("offline-run-*")
    first_log = (first / f"run-{run_id}.wandb").read_bytes()
    console = first / "files" / "output.log"  # wandb does not always capture the console in-process
    first_console = console.read_bytes() if console.is_file() else None

    code, out = run_inprocess("train.py", [*common, "ckpt_path=last"], capsys, monkeypatch)  # to step 8
    assert code == 0, out[-3000:]
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == run_id
    assert list((run_dir / "wandb").glob("offline-run-*")) == [first]  # one directory, the first one
    assert (first / f"run-{run_id}.wandb").read_bytes() == first_log  # the first part untouched
    (resumed,) = [f for f in first.glob("*.wandb") if f.name != f"run-{run_id}.wandb"]
    assert resumed.name.startswith(f"run-{run_id}-") and resumed.stat().st_size > 0  # the resumed part beside it
    if first_console is not None:
        assert console.read_bytes().startswith(first_console)  # appended (test_fold_offline_runs_... checks it)
    assert (run_dir / "wandb" / "latest-run").resolve() == first.resolve()  # wandb's links follow
    assert json.loads((run_dir / "results.json").read_text())["global_step"] == 8

    # wandb's own `wandb sync` picks up both parts from the one directory (dry run: no account needed)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_SERVICE")}
    proc = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(first)], env=env,
                          capture_output=True, text=True, timeout=120)
    listing = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Would sync 2 run(s)" in listing, listing
    assert f"run-{run_id}.wandb" in listing and resumed.name in listing


def test_fold_offline_runs_merges_later_parts_only(tmp_path):
    """Unit check of the folding (no wandb run): the parts of one run id, wandb's `-1` suffix for a start in
    the same second, a `.synced` marker; another run's and an online run's directories are left alone."""
    from deepseek_mini.training.loggers import fold_offline_runs

    wb = tmp_path / "wandb"

    def part(name: str, console: str, synced: bool = False, run_id: str = "abc"):
        d = wb / name
        (d / "files").mkdir(parents=True)
        (d / "logs").mkdir()
        (d / "tmp").mkdir()
        (d / f"run-{run_id}.wandb").write_bytes(name.encode())
        if synced:
            (d / f"run-{run_id}.wandb.synced").write_text("")
        (d / "files" / "output.log").write_text(console)
        (d / "files" / "config.yaml").write_text(name)
        (d / "logs" / "debug.log").write_text(console)
        return d

    first = part("offline-run-20260101_000000-abc", "a\n")
    part("offline-run-20260101_000500-abc", "b\n", synced=True)
    part("offline-run-20260101_000500-abc-1", "c\n")
    other = part("offline-run-20260101_000100-xyz", "x\n", run_id="xyz")
    online = part("run-20260101_000200-abc", "o\n")
    (wb / "latest-run").symlink_to("offline-run-20260101_000500-abc-1")

    assert fold_offline_runs(wb, "abc") == first
    assert sorted(p.name for p in wb.iterdir()) == sorted([first.name, other.name, online.name, "latest-run"])
    assert sorted(p.name for p in first.glob("*.wandb*")) == [
        "run-abc-20260101_000500-1.wandb", "run-abc-20260101_000500.wandb", "run-abc-20260101_000500.wandb.synced",
        "run-abc.wandb"]
    assert (first / "run-abc-20260101_000500-1.wandb").read_bytes() == b"offline-run-20260101_000500-abc-1"
    assert (first / "files" / "output.log").read_text() == "a\nb\nc\n"  # console and logs appended in order
    assert (first / "logs" / "debug.log").read_text() == "a\nb\nc\n"
    assert (first / "files" / "config.yaml").read_text() == "offline-run-20260101_000500-abc-1"  # the latest
    assert os.readlink(wb / "latest-run") == first.name
    assert fold_offline_runs(wb, "abc") == first and fold_offline_runs(wb / "none", "abc") is None


def test_resume_folds_a_killed_resumes_directory_before_wandb_starts(tmp_path):
    """A resume killed before wandb.finish leaves its own offline directory; the next resume folds it in."""
    from omegaconf import OmegaConf

    from deepseek_mini.training.loggers import WANDB_RUN_ID_FILE
    from deepseek_mini.training.run import build_loggers

    (tmp_path / WANDB_RUN_ID_FILE).write_text("abc\n")
    for name in ("offline-run-20260101_000000-abc", "offline-run-20260101_000500-abc"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
        (tmp_path / "wandb" / name / "run-abc.wandb").write_text(name)
    cfg = OmegaConf.create({"task_name": "train", "logger": {"wandb": {
        "_target_": "deepseek_mini.training.loggers.WandbLogger", "project": "p", "offline": True,
        "save_dir": str(tmp_path)}}})
    (logger,) = build_loggers(cfg, tmp_path, resume_step=4)
    assert logger._wandb_init["id"] == "abc" and logger._wandb_init["resume"] == "allow"
    (first,) = (tmp_path / "wandb").glob("offline-run-*")
    assert sorted(p.name for p in first.iterdir()) == ["run-abc-20260101_000500.wandb", "run-abc.wandb"]


def test_cpu_threads_beyond_the_cores_are_refused():
    """More threads than cores only contend; cpu_threads=100000 failed to create them and the process crashed."""
    n = (os.cpu_count() or 1) + 1
    with pytest.raises(ConfigError, match=rf"^cpu_threads={n}: must be at most this machine's {n - 1} cores"):
        resolve_cpu_threads(n)


@pytest.mark.parametrize("path", ["/tmp/runs/2026-12-02_10-00-00-000001", "/tmp/runs/ü", "/tmp/a b", "/tmp/a,b",
                                  "/tmp/it's", "/tmp/back\\slash", "/tmp/x=y", "/tmp/a\\'b", "/tmp/end\\"])
def test_printed_paths_parse_back_through_hydra(path):
    """The resume / evaluate commands a run prints: Hydra reads each path back unchanged (a non-ASCII run dir printed
    bare was a parse error when run as printed), and the shell word is one word."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from deepseek_mini.training.summary import _arg, hydra_value

    assert OverridesParser.create().parse_override(f"hydra.run.dir={hydra_value(path)}").value() == path
    (word,) = shlex.split(_arg("hydra.run.dir", path))
    assert OverridesParser.create().parse_override(word).value() == path
