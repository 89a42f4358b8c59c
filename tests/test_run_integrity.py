"""Run integrity (issue 19 items 4-9): a resume continues exactly the run it names or is refused before anything
is written; counters are cumulative; one training per run dir; interrupts and IO faults end cleanly."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from model_helpers import write_training_checkpoint
from test_reliability import CONFIGS, TINY, cli, error_lines, run_inprocess

from deepseek_mini.config import ConfigError
from deepseek_mini.optim.schedule import lr_lambda
from deepseek_mini.training import reliability as rel
from deepseek_mini.training import run_config as rc
from deepseek_mini.training.checkpoint_io import AtomicCheckpointIO, remove_stale_temp_files
from deepseek_mini.training.errors import CheckpointWriteError
from deepseek_mini.training.lock import acquire_run_lock, release_run_lock
from deepseek_mini.training.resume import resume_overrides

MODEL = [o for o in TINY if o.startswith("model.")]
NO_MODEL = [o for o in TINY if not o.startswith("model.")]


def snapshot(run: Path) -> dict[str, str]:
    """Every file under the run dir with the hash of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def lrs(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/lr"]) for r in csv.DictReader(f) if r.get("train/lr")}


@pytest.fixture(scope="module")
def run4(tmp_path_factory, cache_dir) -> Path:
    """A finished 4-step run (validated and checkpointed at steps 2 and 4), logged to csv and wandb."""
    run = tmp_path_factory.mktemp("integrity") / "run"
    proc = cli("train.py", *TINY, "trainer.max_steps=4", "trainer.val_check_interval=2", "val_before_fit=true",
               f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", "callbacks.throughput=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst, symlinks=True)
    return dst


# ---------------------------------------------------------------------- 4. resume with another model / data
@pytest.mark.slow
@pytest.mark.parametrize(("changed", "named"), [
    (["model.hidden_size=32"], "model.hidden_size=32"),
    (["model.num_hidden_layers=3", "model.kv_lora_rank=8"], "model.kv_lora_rank=8"),
    (["data.max_chars=100000"], "data.max_chars=100000"),
    (["data=text", "data.train_files={txt}"], "data.source='text'"),
])
def test_resume_with_another_model_or_data_is_refused_and_touches_nothing(changed, named, run4, cache_dir, capsys,
                                                                           monkeypatch, tmp_path):
    (tmp_path / "corpus.txt").write_text("other text\n" * 100)  # there: the data check up front lists the files
    changed = [o.format(txt=tmp_path / "corpus.txt") for o in changed]
    before = snapshot(run4)
    code, out = run_inprocess("train.py", [*TINY, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run4}",
                                           "ckpt_path=last", *changed], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and "cannot resume with a different model or data" in lines[0] and named in lines[0], out
    assert snapshot(run4) == before, "a refused resume writes nothing into the run dir"


def _change_last(run: Path, change) -> None:
    """Rewrite run's checkpoints/last.ckpt with `change` applied to its contents (a sound zip: only the checks of
    what it holds can refuse it). last.ckpt may be a hard link of the best: a new file replaces the name."""
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    change(ckpt)
    last.unlink()
    torch.save(ckpt, last)


EMB = "model.model.embed_tokens.weight"
BAD_RESUMES = {  # what is wrong with the run's last.ckpt or the command -> what the one line must say
    "weights of another shape": (lambda c: c["state_dict"].update({EMB: c["state_dict"][EMB][:, :-1]}), [],
                                 "model.embed_tokens.weight has shape"),
    "a config its weights are not": (lambda c: c["hyper_parameters"]["model_config"].update(hidden_size=48), [],
                                     "does not match its model config"),
    "integer weights": (lambda c: c["state_dict"].update({EMB: c["state_dict"][EMB].long()}), [],
                        "not a floating-point weight"),
    "nan weights": (lambda c: c["state_dict"][EMB].view(-1)[:3].fill_(float("nan")), [], "holds nan or inf"),
    "the weights only": (lambda c: c.pop("optimizer_states"), [], "holds the weights only"),
    "not Lightning's": (lambda c: c.pop("pytorch-lightning_version"), [], "not a Lightning training checkpoint"),
    "a config that is a word": (lambda c: c["hyper_parameters"].update(model_config="tiny"), [], "not a mapping"),
    "a config with a bad value": (lambda c: c["hyper_parameters"]["model_config"].update(rope_theta="abc"), [],
                                  "ModelConfig.rope_theta='abc'"),
    "a key that is not the model's": (lambda c: c["state_dict"].update({"foo.bar": torch.zeros(2)}), [],
                                      "keys that are not the model's: ['foo.bar']"),
    "hyper-parameters that are a word": (lambda c: c.update(hyper_parameters="tiny"), [],
                                         "hyper_parameters: a str, not a mapping"),
    "max_steps below the step": (None, ["trainer.max_steps=2"], "trainer.max_steps=2: below the step"),
    "a damaged config.yaml": ("config.yaml", [], "config.yaml (the run's recorded config)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_RESUMES))
def test_a_resume_the_checkpoint_cannot_carry_is_refused_and_touches_nothing(case, run4, cache_dir, tmp_path, capsys,
                                                                              monkeypatch):
    """What Lightning would restore is checked before anything runs: before, each of these ended in a traceback
    after data preparation, with the finished run's results.json, metrics and .hydra already rewritten."""
    change, args, says = BAD_RESUMES[case]
    run = _copy(run4, tmp_path / "run")
    if change == "config.yaml":
        (run / "checkpoints" / "config.yaml").write_text("{{{: [\n")
    elif change is not None:
        _change_last(run, change)
    before = snapshot(run)
    code, out = run_inprocess("train.py", [*TINY, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}",
                                           "ckpt_path=last", *args], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and says in lines[0], out[-3000:]
    assert snapshot(run) == before, "a refused resume writes nothing into the run dir"


def test_resume_overrides_adopt_what_the_user_did_not_ask_to_change(tmp_path):
    """Without the first run's model overrides the resume takes them from the checkpoint (as ++model.k=v)."""
    from hydra import compose, initialize_config_dir

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    recorded = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 512}
    torch.save({"global_step": 4, "hyper_parameters": {"model_config": recorded}}, ckpt_dir / "last.ckpt")
    (ckpt_dir / "config.yaml").write_text("data:\n  seq_len: 32\n  vocab_size: 512\n")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.max_chars=5"])
    adopt = resume_overrides(cfg, ckpt_dir / "last.ckpt", ["data.max_chars=5"])
    assert set(adopt) == {"++model.hidden_size=64", "++model.num_hidden_layers=2", "++data.seq_len=32",
                          "++data.vocab_size=512", "++model.vocab_size=512"}
    with pytest.raises(ConfigError, match=r"model.hidden_size=128 \(the run: 64\)"):
        resume_overrides(cfg, ckpt_dir / "last.ckpt", ["model.hidden_size=128"])


# ---------------------------------------------------------------------- 5 + 6. resume with new training settings
@pytest.mark.slow
def test_resume_without_model_overrides_new_batch_lr_and_steps(run4, cache_dir, tmp_path):
    """The resume repeats no model override, halves data.batch_size, changes optim.lr and extends max_steps 4 -> 6.
    The data stream continues at sample 16 (not 2 x 4), the new lr applies, the schedule continues down from the
    resume point (no jump), and results.json counts the whole run."""
    run = _copy(run4, tmp_path / "run")
    first = json.loads((run / "results.json").read_text())
    lr_before = lrs(run)[3]
    args = [*NO_MODEL, "data.batch_size=2", "optim.lr=0.001", "trainer.max_steps=6", "logger=csv",
            f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", "ckpt_path=last"]
    proc = cli("train.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "completed" and res["global_step"] == 6 and res["resumed_at_step"] == 4
    assert res["steps_trained"] == 2
    assert res["tokens_seen"] == (4 * 4 + 2 * 2) * 32, "cumulative, at each part's batch size"
    assert res["val_loss_start"] == first["val_loss_start"] and res["val_history"][:3] == first["val_history"]
    # validation keeps the run's windows (the command repeats limit_val_batches=2, so its batches stay 4 long,
    # not data.batch_size=2's): the val losses compare
    assert res["val_tokens"] == first["val_tokens"] == 2 * 4 * 32
    assert "++data.val_batch_size=4" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    assert res["config"]["hidden_size"] == 64 and res["optim"]["lr"] == 0.001
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    dm_state = next(v for k, v in ckpt.items() if k.endswith("TextDataModule"))
    assert dm_state["samples_seen"] == 4 * 4 + 2 * 2
    # lr: base 0.001 from step 4 on, continuing the cosine tail from the multiplier it had at step 4
    sched = {"name": "warmup_cosine", "warmup_steps": 2, "min_lr_ratio": 0.1}
    m4 = lr_lambda(sched, 4)(4)  # the finished 4-step schedule's multiplier (min_lr_ratio); re-stretched it was 0.55
    new = lrs(run)
    assert new[4] == pytest.approx(0.001 * m4) and new[5] <= new[4]
    assert lr_before > 0
    recorded = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 0.001, "the recorded config says what ran"


def test_extending_a_cosine_schedule_continues_down_from_the_resume_point():
    sched = {"name": "warmup_cosine", "warmup_steps": 15, "min_lr_ratio": 0.1}
    old = lr_lambda(sched, 200)
    m0 = old(200)
    assert lr_lambda(sched, 400)(200) > 1.5 * m0, "without an anchor the re-stretched cosine jumps up"
    new = lr_lambda(sched, 400, anchor=(200, m0))
    values = [new(s) for s in range(200, 401)]
    assert values[0] == pytest.approx(m0) and values[-1] == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:])), "never rises"
    mid = lr_lambda(sched, 300, anchor=(100, old(100)))
    assert mid(100) == pytest.approx(old(100)) and mid(300) == pytest.approx(0.1)
    assert [new(s) for s in range(10)] == [old(s) for s in range(10)]  # warmup untouched
    step = {"name": "step", "warmup_steps": 0, "milestones": [0.8, 0.9], "gamma": 0.5}
    ext = lr_lambda(step, 400, anchor=(200, lr_lambda(step, 200)(200)))
    assert ext(200) == 0.25 and ext(399) == 0.25


@pytest.mark.slow
def test_finished_checkpoint_in_a_new_run_dir(run4, cache_dir, tmp_path, capsys, monkeypatch):
    """Nothing left to train: 0 steps, no tokens/s, best_checkpoint not pointing into the other run."""
    out_dir = tmp_path / "again"
    code, out = run_inprocess("train.py", [*TINY, "trainer.max_steps=4", f"paths.cache_dir={cache_dir}",
                                           f"hydra.run.dir={out_dir}", f"ckpt_path={run4 / 'checkpoints' / 'last.ckpt'}",
                                           "logger=none"], capsys, monkeypatch)
    assert code == 0, out[-3000:]
    res = json.loads((out_dir / "results.json").read_text())
    assert res["steps_trained"] == 0 and res["tokens_per_sec"] is None and res["global_step"] == 4
    assert res["tokens_seen"] == 4 * 4 * 32
    # the history is the run's, not only a final re-validation (the fit loop is skipped, and its train start)
    first = json.loads((run4 / "results.json").read_text())
    assert res["val_history"] == first["val_history"] and [s for s, _ in res["val_history"]] == [0, 2, 4]
    assert res["val_loss_start"] == first["val_loss_start"] and res["val_loss"] == first["val_loss"]
    assert res["best_checkpoint"] is None or res["best_checkpoint"].startswith(str(out_dir.resolve()))
    assert str(run4) not in json.dumps({k: res[k] for k in ("checkpoint", "best_checkpoint")})


# ---------------------------------------------------------------------- 7. one training per run dir
HOLD = textwrap.dedent("""
    import sys, time
    from deepseek_mini.training.lock import acquire_run_lock
    acquire_run_lock(sys.argv[1]); print("locked", flush=True); time.sleep(60)
""")


def _holder(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(CONFIGS).parent)}
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_training_in_a_locked_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(ConfigError, match=rf"another training is running in this run dir \(pid {holder.pid} on "):
            acquire_run_lock(run)
        code, out = run_inprocess("train.py", [f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'c'}",
                                               "logger=none"], capsys, monkeypatch)
        assert code == 2 and len(error_lines(out)) == 1 and f"pid {holder.pid}" in out, out
        assert sorted(p.name for p in run.iterdir()) == [".run.lock"], "nothing written by the refused run"
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank of the holder's run joins it
        assert acquire_run_lock(run) is None
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.delenv("LOCAL_RANK")
    time.sleep(0.1)
    assert acquire_run_lock(run) == run.resolve() / ".run.lock", "the OS released the dead holder's lock"
    release_run_lock(run)


# ---------------------------------------------------------------------- 8. interrupts and IO faults
@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [("sigint", 130), ("sigterm", 143)])
def test_interrupt_saves_checkpoint_results_and_resume_command(sig, code, tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = cli("train.py", *TINY, "logger=csv", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}",
               env={"DSMINI_FAULT": f"{sig}_at_step:3"})
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "graceful shutdown" not in proc.stdout + proc.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "interrupted" and res["signal"] == sig.upper() and res["global_step"] == 3
    line = next(x for x in proc.stderr.splitlines() if x.startswith("resume with: "))
    assert f"hydra.run.dir={run}" in line and line.endswith("ckpt_path=last")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(("err", "words"), [(errno.ENOSPC, "No space left on device"),
                                            (errno.EROFS, "Read-only file system")])
def test_io_fault_at_save_is_one_line_and_keeps_the_last_good_checkpoint(err, words, tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    def failing(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(CheckpointWriteError) as e:
        io.save_checkpoint({"global_step": 2}, path)
    assert str(e.value) == f"cannot write checkpoint {path}: {words}"
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_torch_zip_writer_failure_names_the_disk(tmp_path, monkeypatch):
    """A full disk shows up from torch's zip writer as a RuntimeError; the free space tells what it was."""
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_dir_is_one_line(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint {d / 'last.ckpt'}: Permission denied"):
            AtomicCheckpointIO().save_checkpoint({}, d / "last.ckpt")
    finally:
        d.chmod(0o700)


@pytest.mark.slow
def test_disk_full_while_training_fails_in_one_line_with_results(tmp_path, cache_dir, capsys, monkeypatch):
    run, sigint = tmp_path / "run", signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(torch, "save", _enospc)
    code, out = run_inprocess("train.py", [*TINY, "trainer.max_steps=4", "trainer.val_check_interval=2",
                                           f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", "logger=none"],
                              capsys, monkeypatch)
    assert code == 1 and "Traceback" not in out, out[-3000:]
    # the failure at fit's end skipped Lightning's on_exception: Ctrl-C must not stay bound to that finished trainer
    assert signal.getsignal(signal.SIGINT) is sigint
    lines = error_lines(out)
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write checkpoint {run / 'checkpoints'}/")
    assert lines[0].endswith(": No space left on device")
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "failed" and "No space left on device" in res["error"] and res["global_step"] == 2
    assert not list((run / "checkpoints").glob(".*tmp*"))


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"good")
    stale = [tmp_path / ".last.ckpt.tmp-12345", tmp_path / ".best-step2.ckpt.tmp-999"]
    for p in stale:
        p.write_bytes(b"")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ---------------------------------------------------------------------- 7. (20.7) resume spellings, -m
@pytest.mark.parametrize("spelling", ["resume=yes", "resume=True", "resume=1", "resume=on"])
def test_any_true_spelling_of_resume_continues_the_latest_run(spelling, tmp_path):
    ck = tmp_path / "logs" / "train" / "runs" / "r1" / "checkpoints" / "last.ckpt"
    ck.parent.mkdir(parents=True)
    write_training_checkpoint(ck, step=1)
    argv = rel._preflight_resume([spelling, f"paths.log_dir={tmp_path / 'logs'}"], CONFIGS, "train")
    assert f"hydra.run.dir={ck.parent.parent}" in argv
    release_run_lock(ck.parent.parent)


def test_multirun_resume_without_sweep_dir_is_refused_up_front(tmp_path, capsys, monkeypatch):
    code, out = run_inprocess("train.py", ["-m", "seed=1,2", "ckpt_path=last", f"paths.log_dir={tmp_path}"],
                              capsys, monkeypatch)
    assert code == 2 and len(error_lines(out)) == 1 and "hydra.sweep.dir" in error_lines(out)[0], out
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------- 9. every setting checked up front
BAD_SETTINGS = [
    (["optim.lr=-1"], "optim.lr=-1: must be a positive number"),
    (["optim.lr=abc"], "optim.lr='abc': must be a positive number"),
    (["seed=abc"], "error: seed='abc': must be an integer >= 0"),
    (["trainer.val_check_interval=0.5"], "trainer.val_check_interval=0.5: training is step-based"),
    (["trainer.devices=100000"], "trainer.devices=100000: this machine has"),
    (["resume=maybe"], "resume='maybe': use true or false"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=1.5"),
    (["optim.eps=0"], "optim.eps=0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["scheduler.warmup_steps=-1"], "scheduler.warmup_steps=-1"),
    (["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio=2"),
    (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma=0"),
    (["trainer.precision=17"], "trainer.precision=17"),
    (["trainer.limit_val_batches=-1"], "trainer.limit_val_batches=-1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["data.cache_dir=/dev/null/cache"], "data.cache_dir='/dev/null/cache': cannot create a directory here"),
    (["model=v2"], "parameters need"),
]
if not torch.cuda.is_available():
    BAD_SETTINGS.append((["trainer.accelerator=gpu"], "trainer.accelerator='gpu': this machine has no CUDA GPU"))
    # Lightning's CPUAccelerator takes a count only: a traceback after data preparation, before
    BAD_SETTINGS.append((["trainer.devices=-1"], "trainer.devices=-1: on the CPU, a number of processes or auto"))
    BAD_SETTINGS.append((["trainer=cpu", "trainer.devices=[0,1]"], "trainer.devices=[0, 1]: on the CPU"))


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_bad_setting_is_one_line_before_data_prep(overrides, message, tmp_path, capsys, monkeypatch):
    cache, run = tmp_path / "cache", tmp_path / "r"
    code, out = run_inprocess("train.py", [f"paths.cache_dir={cache}", f"hydra.run.dir={run}", "logger=none",
                                           *overrides], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and message in lines[0], out
    assert not cache.exists() and not run.exists(), "checked before data preparation and before any write"


def test_unwritable_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    code, out = run_inprocess("train.py", ["hydra.run.dir=/dev/null/run", f"paths.cache_dir={tmp_path}/c"],
                              capsys, monkeypatch)
    assert code == 2 and error_lines(out) == [
        "error: hydra.run.dir='/dev/null/run': cannot create a directory here: /dev/null is a file, not a directory"], out


def test_model_too_large_for_memory_is_refused(monkeypatch):
    from deepseek_mini.config import ModelConfig

    small = ModelConfig.from_dict({"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                                   "num_attention_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                   "qk_rope_head_dim": 4, "v_head_dim": 8, "intermediate_size": 48,
                                   "moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2})
    monkeypatch.setattr(rc, "_available_memory", lambda: (1024, "available RAM"))
    with pytest.raises(ConfigError, match=r"GiB for fp32 weights, gradients and AdamW moments, more than the 0.0 GiB"):
        rc.check_fits_in_memory(small)
    monkeypatch.setattr(rc, "_available_memory", lambda: (2**40, "available RAM"))
    rc.check_fits_in_memory(small)
    assert math.isfinite(rc.OPTIMIZER_STATE_BYTES)


def test_preflight_checks_a_multirun_job_by_job(tmp_path):
    """A sweep (a=1,2) or an experiment that is a multirun (hydra.mode: MULTIRUN) is not composed as one run: each
    of its jobs is checked. A job with a bad setting is left to fail alone (an invalid corner of a grid), but a
    setting that fails every job (here the experiment's data, absent) refuses the sweep before it starts."""
    assert rel._preflight_resume(["-m", "seed=1,2"], CONFIGS, "train") == ["-m", "seed=1,2"]
    for argv in (["experiment=rank_x_experts", "model.n_routed_experts=4,1"], ["experiment=rank_x_experts"]):
        with pytest.raises(ConfigError, match=r"^every job of the sweep would fail; job 0 \(model.kv_lora_rank=16 "
                                              r"model.n_routed_experts=4\): data.train_files='/nonexistent/gutenberg"):
            rel._preflight_resume([*argv, "paths.data_dir=/nonexistent"], CONFIGS, "train")
    assert not any(tmp_path.iterdir())
