"""Reliability (issue 7): exact kill-and-resume, atomic checkpoints, one-line errors, training faults.

The CLI runs use a tiny model on a tiny stdlib slice; bad-config and bad-data cases run the real entry
point in-process (same code path as `python train.py ...`, without a new interpreter per case).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from model_helpers import write_training_checkpoint

from deepseek_mini import cli as cli_mod
from deepseek_mini.checkpoint import CheckpointError, check_checkpoint_file
from deepseek_mini.training import reliability as rel
from deepseek_mini.training.checkpoint_io import AtomicCheckpointIO
from deepseek_mini.training.errors import fault_message, is_oom
from deepseek_mini.training.loggers import WANDB_RUN_ID_FILE, wandb_online_problem
from deepseek_mini.training.resume import RNGStateCallback

CONFIGS = str(ROOT / "configs")

TINY = [
    "model.vocab_size=512", "model.max_position_embeddings=64", "model.hidden_size=64", "model.num_hidden_layers=2",
    "model.n_routed_experts=4", "model.bias_update_speed=0.01",  # router bias buffers must survive the resume
    "data.seq_len=32", "data.batch_size=4", "data.max_chars=200000", "data.val_fraction=0.1",
    "trainer=cpu", "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1", "scheduler.warmup_steps=2", "callbacks.samples=null",
    "callbacks.progress_bar=null", "callbacks.expert_load=null", "trainer.enable_model_summary=false",
    "val_before_fit=false",
]


def cli(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Like a user: no HYDRA_FULL_ERROR, wandb offline unless `env` says otherwise."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})})
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_inprocess(script: str, args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """`python <script> <args>` in this process, through the console-script entry points of
    deepseek_mini.cli (the same cli_entry/hydra.main/cli_errors stack as train.py); (exit code, output)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code = 0
    try:
        (cli_mod.train_main if script == "train.py" else cli_mod.eval_main)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# ---------------------------------------------------------------------- 1. resume
@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, cache_dir, capsys, monkeypatch):
    common = [*TINY, f"paths.cache_dir={cache_dir}"]
    a, b = tmp_path / "a", tmp_path / "b"
    code, out = run_inprocess("train.py", [*common, "logger=csv", f"hydra.run.dir={a}"], capsys, monkeypatch)
    assert code == 0, out[-3000:]  # the uninterrupted reference (in this process: the kill needs its own)

    killed = cli("train.py", *common, f"hydra.run.dir={b}", env={"DSMINI_FAULT": "kill_at_step:6"})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL after step 6: last.ckpt is from step 4
    assert torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    run_id = (b / WANDB_RUN_ID_FILE).read_text().strip()

    resumed = cli("train.py", *common, f"hydra.run.dir={b}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    res = json.loads((b / "results.json").read_text())
    assert res["global_step"] == 8 and res["resumed_at_step"] == 4 and res["status"] == "completed"

    losses_a, losses_b = train_losses(a), train_losses(b)
    assert sorted(losses_b) == list(range(8)), "csv keeps the rows before the resume point and appends"
    assert [losses_b[s] for s in range(4, 8)] == [losses_a[s] for s in range(4, 8)]  # bit-identical

    sd_a = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    sd_b = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    bias = [k for k in sd_a["state_dict"] if k.endswith("e_score_correction_bias")]
    assert bias and sd_a["state_dict"][bias[0]].abs().sum() > 0
    for k, v in sd_a["state_dict"].items():
        assert torch.equal(v, sd_b["state_dict"][k]), k
    assert sd_a["lr_schedulers"] == sd_b["lr_schedulers"]
    assert (b / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    assert {p.name.rsplit("-", 1)[-1] for p in (b / "wandb").glob("offline-run-*")} == {run_id}
    assert not list((b / "checkpoints").glob(".*tmp*")), "no temporary checkpoint files left behind"


@pytest.mark.slow
def test_a_new_run_into_a_run_dir_that_holds_a_run_is_refused(tmp_path, cache_dir, capsys, monkeypatch):
    """A second, non-resumed run in the same dir would replace the first run's checkpoints, results and metrics
    (nothing lost): refused in one line with the dir unchanged; continuing it (ckpt_path=last) is the way in."""
    run = tmp_path / "run"
    args = [*TINY, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", "logger=none"]
    code, out = run_inprocess("train.py", [*args, "trainer.max_steps=4"], capsys, monkeypatch)
    assert code == 0, out[-3000:]
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    code, out = run_inprocess("train.py", [*args, "trainer.max_steps=6"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out and "holds a run" in "".join(error_lines(out)), out[-3000:]
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    code, out = run_inprocess("train.py", [*args, "trainer.max_steps=6", "ckpt_path=last"], capsys, monkeypatch)
    assert code == 0, out[-3000:]
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 6
    assert torch.load(res["checkpoint"], weights_only=True)["global_step"] == 6


def test_ckpt_path_last_without_run_dir_picks_latest_run(tmp_path):
    runs = tmp_path / "logs" / "train" / "runs"
    for i, name in enumerate(["2025-01-01_00-00-00-000001", "2025-01-02_00-00-00-000001"]):
        ck = runs / name / "checkpoints" / "last.ckpt"
        ck.parent.mkdir(parents=True)
        write_training_checkpoint(ck, step=i)
        os.utime(ck, (time.time() - 100 + i * 10,) * 2)
    (runs / "2025-01-03_00-00-00-000001").mkdir()  # newest dir, but no checkpoint
    argv = rel._preflight_resume(["resume=true", f"paths.log_dir={tmp_path / 'logs'}"], CONFIGS, "train")
    assert argv[-1] == f"hydra.run.dir={runs / '2025-01-02_00-00-00-000001'}"
    with pytest.raises(CheckpointError, match="no run under"):
        rel._preflight_resume(["ckpt_path=last", f"paths.log_dir={tmp_path / 'none'}"], CONFIGS, "train")
    # a given run dir without a checkpoint is refused before Hydra writes anything into it
    with pytest.raises(CheckpointError, match="no checkpoint"):
        rel._preflight_resume(["ckpt_path=last", f"hydra.run.dir={tmp_path / 'x'}"], CONFIGS, "train")
    assert not (tmp_path / "x").exists()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    cb = RNGStateCallback()
    torch.save(cb.state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    cb.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# ---------------------------------------------------------------------- 2. atomic / corrupt checkpoints
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):  # writes half a checkpoint, then the process "dies"
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert check_checkpoint_file(path) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.fixture
def bad_ckpts(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(4096)}, "global_step": 3}, good)
    data = good.read_bytes()
    out = {"truncated": tmp_path / "truncated.ckpt", "garbage": tmp_path / "garbage.ckpt",
           "empty": tmp_path / "empty.ckpt"}
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["garbage"].write_bytes(b"not a checkpoint at all\n" * 10)
    out["empty"].write_bytes(b"")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # bit rot inside the tensor data: caught by the zip CRC check
    out["corrupt"] = tmp_path / "corrupt.ckpt"
    out["corrupt"].write_bytes(bytes(flipped))
    return out


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "corrupt"])
def test_bad_checkpoint_is_one_line_error_in_train(kind, bad_ckpts, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    code, out = run_inprocess("train.py", [f"ckpt_path={bad_ckpts[kind]}", f"paths.cache_dir={cache}",
                                           f"hydra.run.dir={tmp_path / 'run'}", "logger=none"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out
    assert len(error_lines(out)) == 1 and str(bad_ckpts[kind]) in error_lines(out)[0], out
    assert not cache.exists(), "failed before any data preparation"


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_bad_checkpoint_is_one_line_error_in_eval(kind, bad_ckpts, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    code, out = run_inprocess("eval.py", [f"ckpt_path={bad_ckpts[kind]}", f"paths.cache_dir={cache}",
                                          f"hydra.run.dir={tmp_path / 'run'}"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out
    assert len(error_lines(out)) == 1 and f"cannot read checkpoint {bad_ckpts[kind]}" in error_lines(out)[0], out
    assert not cache.exists()


# ---------------------------------------------------------------------- 3. bad configuration
BAD_CONFIGS = [
    (["model.foo=1"], "model.foo"),                                        # unknown key (Hydra struct error)
    (["+model.foo=1"], "foo"),                                             # unknown ModelConfig field
    (["model.hidden_size=0"], "model.hidden_size"),
    (["model.num_hidden_layers=-2"], "model.num_hidden_layers"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.seq_len=0"], "data.seq_len"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["model.num_experts_per_tok=9"], "model.num_experts_per_tok"),        # top-k above the expert count
    (["model.n_group=3"], "n_group"),                                      # experts not divisible by groups
    (["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim"),             # odd rope dim
    (["model.attention=gqa", "model.num_key_value_heads=3"], "model.num_key_value_heads"),
    (["data.seq_len=2048"], "model.max_position_embeddings"),              # seq_len above positions
    (["model.attention=linear"], "model.attention"),                       # unknown attention type
    (["ckpt_path=/does/not/exist.ckpt"], "/does/not/exist.ckpt"),
    (["ckpt_path=last"], "ckpt_path=last"),                                # this run dir has no checkpoint
    (["model=tiny_typo"], "model/tiny_typo"),                              # unknown group option
    (["compile=fast"], "compile='fast'"),                                  # not a torch.compile mode
    (["optim.fused=apex"], "optim.fused='apex'"),                          # not an AdamW step we have
    (["optim.bf16_weights=fp8"], "optim.bf16_weights='fp8'"),              # not a setting
    (["+optim.foo=1"], "optim.foo=1: not one of the optim settings"),                # recorded but used by nothing
    (["+scheduler.warmup=5"], "scheduler.warmup=5: not one of the scheduler settings"),
    # options handed on to Lightning's Trainer, the strategy and torch's wrapper: checked against their signatures
    (["+trainer.foo=1"], "trainer.foo=1: not an argument of lightning's Trainer"),
    (["trainer=ddp", "trainer.accelerator=cpu", "+trainer.strategy.bucket_cap=50"],
     "trainer.strategy.bucket_cap=50: not an option of DDPStrategy or DistributedDataParallel"),
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.strategy.find_unused_parameters=maybe"],
     "trainer.strategy.find_unused_parameters='maybe': must be true or false"),
    (["+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler", "+trainer.profiler.bogus=1"],
     "trainer.profiler.bogus=1: not an option of SimpleProfiler"),
    (["+callbacks.model_checkpoint.every_n_step=5"],                       # was refused after data preparation
     "callbacks.model_checkpoint.every_n_step=5: not an option of RunCheckpoint"),
    (["trainer=ep", "trainer.accelerator=cpu", "+trainer.strategy.ep_degree=3"],
     "trainer.strategy.ep_degree=3: not an option of expert_parallel_strategy or DistributedDataParallel"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_error_before_data_prep(overrides, names, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    code, out = run_inprocess("train.py", [*overrides, f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'r'}",
                                           "logger=none"], capsys, monkeypatch)
    assert code == 2, out
    assert "Traceback" not in out
    lines = error_lines(out)
    assert len(lines) == 1 and names in lines[0], out
    assert not cache.exists(), "no data preparation before the config is checked"


@pytest.mark.slow
def test_unknown_key_from_the_command_line(tmp_path, capsys, monkeypatch):
    code, out = run_inprocess("train.py", ["model.foo=1", f"paths.cache_dir={tmp_path / 'cache'}",
                                           f"hydra.run.dir={tmp_path / 'r'}"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out
    assert out.strip().splitlines() == [
        "error: unknown config key 'model.foo' (check the spelling; to add a new key use +model.foo=...)"]
    full = cli("train.py", "model.foo=1", f"hydra.run.dir={tmp_path / 'r'}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr  # the full error stays available


def test_instantiated_nodes_are_checked_against_their_targets():
    """Every option of a node Hydra instantiates must be one its target accepts, following **kwargs through
    base classes and, for strategies, into torch's wrapper; targets whose **kwargs lead nowhere known pass."""
    from deepseek_mini.config import ConfigError
    from deepseek_mini.training.run_config import check_node_options, target_parameters

    csv = {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "${paths.output_dir}", "name": "csv"}
    check_node_options("logger.csv", csv)
    with pytest.raises(ConfigError, match=r"^logger.csv.flush_every=5: not an option of CSVLogger$"):
        check_node_options("logger.csv", {**csv, "flush_every": 5})
    with pytest.raises(ConfigError, match=r"^callbacks.x.enabled='yes please': must be true or false$"):
        check_node_options("callbacks.x", {"_target_": "deepseek_mini.training.console.ModelSummary",
                                           "enabled": "yes please"})
    check_node_options("callbacks.x", {"_target_": "deepseek_mini.training.console.ModelSummary",
                                       "enabled": "${trainer.enable_model_summary}"})  # checked where it points
    accepted, complete, followed = target_parameters("deepseek_mini.training.expert_parallel.expert_parallel_strategy")
    assert {"expert_parallel", "process_group_backend", "bucket_cap_mb"} <= set(accepted) and complete
    assert followed == ["DistributedDataParallel"]
    accepted, complete, followed = target_parameters("lightning.pytorch.loggers.WandbLogger")
    assert complete and followed == ["init"] and {"project", "mode", "group"} <= set(accepted)  # to wandb.init
    check_node_options("logger.wandb", {"_target_": "lightning.pytorch.loggers.WandbLogger", "entity": "me"})
    with pytest.raises(ConfigError, match=r"^logger.wandb.bogus=1: not an option of WandbLogger or init$"):
        check_node_options("logger.wandb", {"_target_": "lightning.pytorch.loggers.WandbLogger", "bogus": 1})
    accepted, complete, followed = target_parameters("deepseek_mini.data.TextDataModule")
    assert complete and followed == ["CorpusSpec"] and {"source", "train_files", "pin_memory"} <= set(accepted)


# ---------------------------------------------------------------------- 4. bad data
def _text_data(tmp_path: Path, name: str, content: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.mark.parametrize("case", ["missing", "glob", "empty", "jsonl_field", "too_small"])
def test_bad_data_is_one_line_error(case, tmp_path, capsys, monkeypatch):
    files = {
        "missing": str(tmp_path / "nope.txt"),
        "glob": str(tmp_path / "*.nothing"),
        "empty": str(_text_data(tmp_path, "empty.txt", b"")),
        "jsonl_field": str(_text_data(tmp_path, "docs.jsonl", b'{"content": "hello"}\n{"content": "world"}\n')),
        "too_small": str(_text_data(tmp_path, "small.txt", b"def f():\n    return 1\n" * 20)),
    }[case]
    expected = {"missing": "file not found", "glob": "matched no files", "empty": "empty",
                "jsonl_field": "text", "too_small": "too small"}[case]
    code, out = run_inprocess("train.py", ["data=text", f"data.train_files={files}", "data.val_fraction=0.5",
                                           "model.vocab_size=300", "data.seq_len=64", "data.batch_size=16",
                                           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'r'}",
                                           "logger=none"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out, out
    lines = error_lines(out)
    assert len(lines) == 1 and expected in lines[0], out


@pytest.mark.slow
def test_invalid_utf8_and_unreachable_wandb_do_not_stop_training(tmp_path, cache_dir):
    rng = random.Random(0)
    words = ["def", "return", "import", "class", "self", "value", "print", "for", "in", "range", "if", "else"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(2500)).encode()
    corpus = _text_data(tmp_path, "corpus.txt", text[:40000] + b"\xff\xfe bad \xc3\x28 bytes\n" + text[40000:])
    run = tmp_path / "run"
    proc = cli("train.py", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", "data=text",
               f"data.train_files={corpus}", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}",
               "logger=wandb", "logger.wandb.offline=false",
               env={"WANDB_MODE": None, "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "invalid UTF-8" in out or "invalid utf-8" in out.lower()
    assert "logging offline instead" in out and "127.0.0.1:9" in out
    res = json.loads((run / "results.json").read_text())
    assert res["data"]["invalid_utf8_replaced"] >= 3 and res["global_step"] == 2
    assert list((run / "wandb").glob("offline-run-*"))


def test_wandb_online_problems_are_detected(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert "no wandb API key" in wandb_online_problem()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert "cannot reach 127.0.0.1:9" in wandb_online_problem(timeout=1)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key, and wandb told to stay offline: no network probe
    assert wandb_online_problem() is None


# ---------------------------------------------------------------------- 5. faults while training
@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = cli("train.py", *TINY, "logger=csv", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}",
               env={"DSMINI_FAULT": "nan_at_step:6"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert error_lines(proc.stderr) == [
        f"error: non-finite loss (nan) at step 6; training stopped, last good checkpoint: {last}"]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_oom_in_one_sweep_job_fails_that_job_and_the_sweep_goes_on(tmp_path, cache_dir):
    sweep = tmp_path / "sweep"
    proc = cli("train.py", "-m", "seed=1,2", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2",
               "logger=csv", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}",
               env={"DSMINI_FAULT": "oom_at_step:2,job:1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = json.loads((sweep / "0" / "results.json").read_text())
    failed = json.loads((sweep / "1" / "results.json").read_text())
    assert ok["status"] == "completed" and ok["global_step"] == 2 and math.isfinite(ok["val_loss"])
    assert failed["status"] == "failed" and failed["error"].startswith("CUDA out of memory")
    assert "job 1 failed: CUDA out of memory" in proc.stdout + proc.stderr


def test_oom_detection_and_message():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert fault_message(torch.OutOfMemoryError("CUDA out of memory.\nTried")).startswith("CUDA out of memory (")


def test_a_resumed_checkpoint_is_read_through_once_per_process(tmp_path, monkeypatch):
    """cli_entry's check before Hydra and train() resolve the same file: its CRC and contents are checked once;
    a file changed since (another inode, size or time) is checked again."""
    from deepseek_mini.training import resume

    ck = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ck.parent.mkdir(parents=True)
    write_training_checkpoint(ck, step=3)
    calls = []
    check = resume.check_checkpoint_file
    monkeypatch.setattr(resume, "check_checkpoint_file", lambda p: calls.append(p) or check(p))
    assert resume.resolve_ckpt_path("last", tmp_path / "run") == ck
    assert resume.resolve_ckpt_path("last", tmp_path / "run") == ck and len(calls) == 1
    os.utime(ck, ns=(1, 1))
    assert resume.resolve_ckpt_path(str(ck), tmp_path) == ck and len(calls) == 2
    ck.write_bytes(b"not a checkpoint")  # replaced: refused, not taken from what was checked before
    with pytest.raises(CheckpointError):
        resume.resolve_ckpt_path("last", tmp_path / "run")
