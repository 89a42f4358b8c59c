"""A multirun into a given sweep dir, and a resumed sweep (`-m ... hydra.sweep.dir=<old> ckpt_path=last`): every
job is checked before the first one runs, against what its own dir recorded, and a refused command writes
nothing into the sweep; on resume, jobs with a checkpoint continue, jobs without one start. Also which windows a
resumed run validates on (resume.validation_overrides), and SIGTERM / Ctrl-C before the first step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from test_reliability import CONFIGS, TINY, cli, error_lines, run_inprocess
from test_run_integrity import snapshot

from deepseek_mini.config import ConfigError
from deepseek_mini.training import reliability as rel
from deepseek_mini.training.resume import resume_overrides
from deepseek_mini.training.sweep import sweep_jobs

SWEEP = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))] + [
    "trainer.max_steps=4", "trainer.val_check_interval=2", "logger=csv"]


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


@pytest.fixture(scope="module")
def sweep2(tmp_path_factory, cache_dir) -> Path:
    """A finished two-job sweep over model.kv_lora_rank, 4 steps each."""
    sweep = tmp_path_factory.mktemp("sweep") / "sw"
    proc = cli("train.py", "-m", *SWEEP, f"paths.cache_dir={cache_dir}", "model.kv_lora_rank=16,32",
               f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0 and [results(sweep / j)["status"] for j in "01"] == ["completed"] * 2, \
        proc.stderr[-3000:]
    return sweep


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_sweep_jobs_are_the_jobs_hydra_ran(sweep2, cache_dir):
    """training/sweep.py predicts each job's number, dir and overrides exactly as Hydra's basic sweeper ran them."""
    jobs, _ = sweep_jobs(CONFIGS, "train", [*SWEEP, f"paths.cache_dir={cache_dir}", "model.kv_lora_rank=16,32"],
                      [f"hydra.sweep.dir={sweep2}"])
    assert [j.num for j in jobs] == [0, 1] and [j.dir for j in jobs] == [sweep2 / "0", sweep2 / "1"]
    for job in jobs:
        assert job.overrides == yaml.safe_load((job.dir / ".hydra" / "overrides.yaml").read_text())
        assert job.swept == [f"model.kv_lora_rank={16 * 2 ** job.num}"]
        assert job.cfg.model.kv_lora_rank == results(job.dir)["config"]["kv_lora_rank"]


REFUSED = [
    ([], "job 0 (model.kv_lora_rank=16): its dir {sweep}/0 holds a run (its checkpoints or results.json); continue "
         "the sweep with ckpt_path=last, or give a new hydra.sweep.dir"),  # a fresh sweep over it
    (["ckpt_path=last", "model.kv_lora_rank=32,16"],
     "job 0 (model.kv_lora_rank=32): its run had model.kv_lora_rank=16 and this command gives the job "
     "model.kv_lora_rank=32 (the grid changed or its values were reordered)"),  # job 0 is another grid point
    (["ckpt_path=last", "model.kv_lora_rank=16,32", "optim.lr=1e-3,3e-3"],  # a value a single resume may change
     "job 0 (model.kv_lora_rank=16 optim.lr=0.001): its run had optim.lr=0.003"),  # (the run: SWEEP's 3e-3)
    (["ckpt_path=last", "model.kv_lora_rank=64,128"], "its run had model.kv_lora_rank=16"),  # another grid
    (["ckpt_path=last", "model.kv_lora_rank=16,32", "hydra.sweep.subdir=x${hydra.job.num}"],
     "no job of this sweep holds a run to resume (a new sweep: drop ckpt_path=last)"),  # a mistyped dir
    (["ckpt_path=last", "model.kv_lora_rank=16,32", "data.seq_len=16"], "data.seq_len=16 (the run: 32)"),
    (["ckpt_path=last", "model.kv_lora_rank=16,32", "trainer.limit_val_batches=3"],
     "trainer.limit_val_batches=3: the run's validations measured val/loss on the first 8 validation windows"),
    (["ckpt_path=last", "model.kv_lora_rank=16,32", "trainer.max_steps=2"], "trainer.max_steps=2: below the step"),
    (["ckpt_path=last", "model.kv_lora_rank=16,32", "hydra.sweeper._target_=some.OtherSweeper"],
     "ckpt_path=last with -m and a sweeper other than Hydra's basic one"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "message"), REFUSED, ids=[" ".join(e) or "fresh" for e, _ in REFUSED])
def test_a_sweep_over_a_sweep_it_cannot_continue_is_refused_and_touches_nothing(extra, message, sweep2, cache_dir,
                                                                              capsys, monkeypatch):
    before = snapshot(sweep2)
    swept = [] if extra else ["model.kv_lora_rank=16,32"]
    code, out = run_inprocess("train.py", ["-m", *SWEEP, f"paths.cache_dir={cache_dir}", *swept, *extra,
                                           f"hydra.sweep.dir={sweep2}"], capsys, monkeypatch)
    assert code == 2 and len(error_lines(out)) == 1, out[-3000:]
    assert message.format(sweep=sweep2) in error_lines(out)[0]
    assert snapshot(sweep2) == before, "a refused sweep writes nothing into its jobs"


@pytest.mark.slow
def test_jobs_that_recorded_different_settings_are_not_resumed_with_one_command(sweep2, cache_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """One command line serves every job: if job 1 recorded another value of a setting the command does not set,
    no single adoption continues both, and the resume is refused, naming both jobs."""
    sweep = _copy(sweep2, tmp_path / "sw")
    for f in (sweep / "1" / "checkpoints" / "config.yaml",):
        rec = yaml.safe_load(f.read_text())
        rec["data"]["max_chars"] = 100000
        f.write_text(yaml.safe_dump(rec))
    sweep_args = [a for a in SWEEP if not a.startswith("data.max_chars")]
    code, out = run_inprocess("train.py", ["-m", *sweep_args, f"paths.cache_dir={cache_dir}", "ckpt_path=last",
                                           "model.kv_lora_rank=16,32", f"hydra.sweep.dir={sweep}"], capsys,
                              monkeypatch)
    assert code == 2, out[-3000:]
    line = error_lines(out)[0]
    assert "the jobs recorded different values" in line and "job 0: ++data.max_chars=200000" in line
    assert "job 1: ++data.max_chars=100000" in line


@pytest.mark.slow
def test_a_resumed_sweep_continues_its_jobs_and_starts_the_missing_ones(sweep2, cache_dir, tmp_path):
    """The grid grows by one point and max_steps 4 -> 6: jobs 0 and 1 continue from step 4 with their whole
    history, job 2 (a dir holding only a failed attempt's results.json) starts from step 0."""
    sweep = _copy(sweep2, tmp_path / "sw")
    (sweep / "2").mkdir()
    (sweep / "2" / "results.json").write_text(json.dumps({"status": "failed", "error": "earlier attempt"}))
    first = {j: results(sweep / j) for j in "01"}
    args = [a for a in SWEEP if not a.startswith("trainer.max_steps")]
    proc = cli("train.py", "-m", *args, f"paths.cache_dir={cache_dir}", "trainer.max_steps=6",
               "model.kv_lora_rank=16,32,64", f"hydra.sweep.dir={sweep}", "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for j in "01":
        res = results(sweep / j)
        assert res["status"] == "completed" and res["resumed_at_step"] == 4 and res["global_step"] == 6
        earlier = first[j]["val_history"]
        assert res["val_history"][:len(earlier)] == earlier and [s for s, _ in res["val_history"]] == [2, 4, 6]
        assert res["config"]["kv_lora_rank"] == first[j]["config"]["kv_lora_rank"]
    fresh = results(sweep / "2")
    assert fresh["status"] == "completed" and fresh["resumed_from"] is None and fresh["global_step"] == 6
    assert fresh["config"]["kv_lora_rank"] == 64


# ---------------------------------------------------------------------- which windows a resume validates on
def _recorded_run(tmp_path: Path, limit, batch: int = 4, val_batch=None, devices: int = 1) -> Path:
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    torch.save({"global_step": 4, "callbacks": {"RunHistory": {"world_size": devices}}}, ckpt_dir / "last.ckpt")
    (ckpt_dir / "config.yaml").write_text(yaml.safe_dump({
        "trainer": {"limit_val_batches": limit, "devices": devices},
        "data": {"batch_size": batch, "val_batch_size": val_batch}}))
    return ckpt_dir / "last.ckpt"


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="train", overrides=["trainer=cpu", *overrides])


VALIDATION = [
    # (recorded limit, batch, val_batch, devices), command, adopted
    ((8, 4, None, 1), ["data.batch_size=2"], ["++trainer.limit_val_batches=16"]),  # the smaller batch kept
    ((8, 4, None, 1), ["data.batch_size=2", "trainer.limit_val_batches=8"], ["++data.val_batch_size=4"]),
    ((8, 4, None, 1), ["data.batch_size=2", "data.val_batch_size=8"], ["++trainer.limit_val_batches=4"]),
    ((8, 4, None, 1), ["data.batch_size=8", "trainer.limit_val_batches=4"], []),  # 4 x 8 = 8 x 4 windows
    ((8, 4, 2, 1), ["data.batch_size=4"], ["++trainer.limit_val_batches=4"]),
    ((2, 4, None, 1), ["data.batch_size=3"], ["++trainer.limit_val_batches=2", "++data.val_batch_size=4"]),
    ((2, 4, None, 1), ["data.batch_size=4"], ["++trainer.limit_val_batches=2"]),  # trainer.default has 8
    ((8, 4, None, 1), ["data.batch_size=4", "trainer.devices=2"], ["++trainer.limit_val_batches=4"]),
    ((1, 4, None, 2), ["data.batch_size=4", "trainer.devices=1"], ["++trainer.limit_val_batches=2"]),
    ((3, 4, None, 1), ["data.batch_size=4", "trainer.devices=5"], None),  # 12 windows over 5 ranks
    ((None, 4, None, 1), ["data.batch_size=2"], ["++trainer.limit_val_batches=null"]),  # every window (not 8 x 2)
    ((0, 4, None, 1), ["trainer.limit_val_batches=8"], []),  # the run never validated: nothing to compare with
    ((1.0, 4, None, 1), ["data.batch_size=2", "trainer.limit_val_batches=null"], []),
    ((0.5, 4, None, 1), ["data.batch_size=2"], ["++trainer.limit_val_batches=0.5", "++data.val_batch_size=4"]),
]


@pytest.mark.parametrize(("rec", "now", "adopted"), VALIDATION, ids=[" ".join(n) for _, n, _ in VALIDATION])
def test_a_resume_validates_on_the_windows_the_run_validated_on(rec, now, adopted, tmp_path, capsys):
    """The run's windows are kept by adopting trainer.limit_val_batches / data.val_batch_size, keeping the one the
    command sets; where nothing can reproduce them (a count of batches over ranks it does not divide), the
    resume goes on with a warning naming both."""
    ckpt = _recorded_run(tmp_path, *rec)
    got = resume_overrides(_compose(now), ckpt, now)
    val = [o for o in got if "limit_val_batches" in o or "val_batch_size" in o]
    if adopted is None:
        assert val == [] and "the first 12 validation windows" in capsys.readouterr().err
    else:
        assert sorted(val) == sorted(adopted)


@pytest.mark.parametrize("asked", [["trainer.limit_val_batches=5"], ["data.val_batch_size=3"],
                                   ["trainer.limit_val_batches=3", "data.batch_size=16"],
                                   ["trainer.limit_val_batches=2", "data.val_batch_size=8"]])
def test_a_resume_that_asks_for_other_validation_windows_is_refused(asked, tmp_path):
    """The command's own values cannot cover the run's 8 x 4 windows (with the other setting free to adopt)."""
    ckpt = _recorded_run(tmp_path, 8)
    given = [a.split("=")[0] for a in asked if not a.startswith("data.batch_size")]
    now = _compose(["data.batch_size=4", *asked])
    with pytest.raises(ConfigError, match=rf"^{given[0]}=.*: the run's validations measured val/loss on the first 32 "
                                          r"validation windows, this resume would measure it on the first \d+ "):
        resume_overrides(now, ckpt, asked)


# ---------------------------------------------------------------------- a signal before the first step
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("stage", ["data", "validation"])
def test_a_signal_before_the_first_step_is_one_line(sig, code, stage, tmp_path, cache_dir, capsys, monkeypatch):
    """SIGTERM (a scheduler's stop) or Ctrl-C while the data is prepared or the model validated before fit: one
    line and the signal's exit status, no traceback, nothing trained."""
    from deepseek_mini.training import module as module_mod
    from deepseek_mini.training import train as train_mod

    if stage == "data":
        real = train_mod.prepare_data

        def prepare(*args, **kwargs):
            os.kill(os.getpid(), sig)
            return real(*args, **kwargs)

        monkeypatch.setattr(train_mod, "prepare_data", prepare)
    else:
        def step(self, batch, batch_idx):
            os.kill(os.getpid(), sig)

        monkeypatch.setattr(module_mod.LitDeepSeek, "validation_step", step)
    run, sigint = tmp_path / "run", signal.getsignal(signal.SIGINT)
    try:
        got, out = run_inprocess("train.py", [*TINY, "val_before_fit=true", f"paths.cache_dir={cache_dir}",
                                              f"hydra.run.dir={run}"], capsys, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-Cs once it has caught one
    name = signal.Signals(sig).name
    assert got == code and "Traceback" not in out, out[-3000:]
    assert f"interrupted ({name}) before training started: nothing was trained or saved" in out
    assert not (run / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "the handler is gone once the run is"


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_sigterm_while_the_entry_point_starts_is_one_line(script, tmp_path, capsys, monkeypatch):
    """SIGTERM during the imports (seconds of them; here one second after launch) or the checks before Hydra: one
    line, rc 143, nothing written, where the default action killed the process without a word. Once the checks
    are over SIGTERM is the default again, for train()'s own handling to take over."""
    import subprocess
    import sys
    import time

    from conftest import ROOT

    said = ("training started: nothing was trained or saved" if script == "train.py"
            else "evaluating: nothing was evaluated or written")
    proc = subprocess.Popen([sys.executable, script, f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == f"interrupted (SIGTERM) before {said}", err
    assert "Traceback" not in err and not (tmp_path / "run").exists()

    def checks(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rel, "_preflight_resume" if script == "train.py" else "_preflight_eval", checks)
    got, out = run_inprocess(script, [f"hydra.run.dir={tmp_path / 'run'}", "ckpt_path=x.ckpt"], capsys, monkeypatch)
    assert got == 143 and f"interrupted (SIGTERM) before {said}" in out and "Traceback" not in out, out[-2000:]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, "handed back"


def test_the_preflight_checks_a_multirun_only_where_it_has_a_sweep_dir(tmp_path):
    """A sweep into a new timestamped dir composes nothing up front: its jobs check their own settings (a grid may
    have invalid corners, which fail alone)."""
    argv = ["-m", "seed=1,2", f"paths.log_dir={tmp_path}"]
    assert rel._preflight_resume(argv, CONFIGS, "train") == argv
    assert not any(tmp_path.iterdir())


def test_the_first_validation_after_a_resume_says_when_it_counted_other_tokens(caplog):
    """Whatever made it (settings nothing could reproduce), a resumed run's first validation over another number of
    target tokens than the checkpoint's last one is named in the log; the same count, or later validations, not."""
    from types import SimpleNamespace

    from deepseek_mini.training.resume import RunHistory

    trainer = SimpleNamespace(global_step=6, sanity_checking=False)
    for now, warned in ((1024, False), (512, True)):
        history, module = RunHistory(), SimpleNamespace(val_tokens=now)
        history.load_state_dict({"val_history": [[4, 5.0]], "val_tokens": 1024})
        caplog.clear()
        history.on_validation_end(trainer, module)
        history.on_validation_end(trainer, module)
        lines = [r.getMessage() for r in caplog.records if "target tokens" in r.getMessage()]
        assert lines == ([
            "validation at step 6 measured val/loss on 512 target tokens, the run's validations before the resume on "
            "1024: the two parts of val_history do not compare"] if warned else [])


# ---------------------------------------------------------------------- the fourth probe's cases
@pytest.mark.slow
@pytest.mark.parametrize("deleted", [False, True], ids=["checkpoints", "checkpoints-deleted"])
def test_a_resumed_sweep_keeps_the_records_of_its_finished_jobs(sweep2, cache_dir, tmp_path, deleted):
    """Jobs already at max_steps have nothing to train: their results.json (val_tokens, train_loss, best) stays as
    it was, byte for byte, instead of a re-report that lost what fit() had measured. Also when a job's checkpoints
    were deleted since (disk freed after the sweep): no checkpoint is needed to train nothing."""
    import shutil

    sweep = _copy(sweep2, tmp_path / "sw")
    if deleted:
        shutil.rmtree(sweep / "0" / "checkpoints")
    before = {j: (sweep / j / "results.json").read_bytes() for j in "01"}
    proc = cli("train.py", "-m", *SWEEP, f"paths.cache_dir={cache_dir}", "model.kv_lora_rank=16,32",
               f"hydra.sweep.dir={sweep}", "ckpt_path=last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {j: (sweep / j / "results.json").read_bytes() for j in "01"} == before
    assert "the run completed at step 4; nothing to train, its records are kept" in proc.stderr
    assert ("the run completed at step 4 (its checkpoints are gone); nothing to train" in proc.stderr) == deleted
    if deleted:  # training further needs the checkpoint: refused up front, in the sweep's own terms
        before = snapshot(sweep)
        proc = cli("train.py", "-m", *SWEEP, f"paths.cache_dir={cache_dir}", "model.kv_lora_rank=16,32",
                   f"hydra.sweep.dir={sweep}", "ckpt_path=last", "trainer.max_steps=6")
        assert proc.returncode == 2 and error_lines(proc.stderr) == [
            f"error: hydra.sweep.dir={sweep}: job 0 (model.kv_lora_rank=16): ckpt_path=last: no checkpoint "
            f"{sweep / '0' / 'checkpoints' / 'last.ckpt'}, so its run cannot train on (its results.json is kept while "
            "trainer.max_steps is the step it completed); train further in a new hydra.sweep.dir"], proc.stderr[-2000:]
        assert snapshot(sweep) == before


@pytest.mark.slow
def test_a_sweep_into_a_job_dir_another_training_holds_is_refused_up_front(sweep2, cache_dir, tmp_path, capsys,
                                                                         monkeypatch):
    from test_run_integrity import _holder

    sweep = _copy(sweep2, tmp_path / "sw")
    holder = _holder(sweep / "1")
    try:
        before = snapshot(sweep)
        code, out = run_inprocess("train.py", ["-m", *SWEEP, f"paths.cache_dir={cache_dir}", "ckpt_path=last",
                                               "model.kv_lora_rank=16,32", f"hydra.sweep.dir={sweep}"], capsys,
                                  monkeypatch)
        assert code == 2 and "job 1 (model.kv_lora_rank=32): another training is running in" in out, out[-2000:]
        assert snapshot(sweep) == before
    finally:
        holder.kill()


def test_a_checkpoint_from_elsewhere_into_a_dir_holding_a_run_is_refused(tmp_path):
    """ckpt_path=<another run's file> into a run dir (or sweep job dir) holding a run would replace its records; its
    own checkpoints may continue it."""
    from model_helpers import write_training_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_training_checkpoint(run / "checkpoints" / "last.ckpt", step=4)
    other = tmp_path / "other.ckpt"
    write_training_checkpoint(other, step=2)
    cfg = _compose(["trainer.max_steps=8", f"ckpt_path={other}"])
    with pytest.raises(ConfigError, match=rf"^hydra.run.dir={run} holds a run .*continue it with ckpt_path=last"):
        rel._check_run(cfg, run, run, [])
    cfg = _compose(["trainer.max_steps=8", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert rel._check_run(cfg, run, run, []) is not None  # its own file: a resume


def test_a_run_stopped_before_its_first_checkpoint_may_start_again(tmp_path):
    from deepseek_mini.training.resume import holds_a_run

    for status, holds in (("interrupted", False), ("failed", False), ("completed", True), ("weird", True)):
        (tmp_path / "results.json").write_text(json.dumps({"status": status}))
        assert holds_a_run(tmp_path) is holds, status
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert holds_a_run(tmp_path), "interrupted with a checkpoint: continue it"


def test_devices_auto_on_the_cpu_is_one_process():
    from deepseek_mini.training.resume import requested_world_size

    assert requested_world_size({"devices": "auto", "accelerator": "cpu"}) == 1
    assert requested_world_size({"devices": 2, "accelerator": "cpu", "num_nodes": 2}) == 4


def test_an_interrupted_sweep_job_prints_the_sweeps_resume_command(monkeypatch):
    """Its own single-run resume was refused when the sweep came from an experiment that is a multirun: the printed
    command resumes the sweep, whose finished jobs are kept."""
    from deepseek_mini.training import train as train_mod

    monkeypatch.setattr(train_mod, "hydra_info", lambda: {"sweep_dir": "/s/sw", "job_num": 1, "overrides": ["x=2"]})
    monkeypatch.setattr("sys.argv", ["train.py", "experiment=rank_x_experts", "hydra.sweep.dir=/s/sw", "seed=3"])
    assert train_mod.resume_command(Path("/s/sw/1")) == \
        "python train.py experiment=rank_x_experts seed=3 hydra.sweep.dir=/s/sw ckpt_path=last"


def test_a_count_of_windows_past_all_there_are_is_all_of_them(tmp_path):
    """The run's 8 batches of 16 asked for more windows than its 65: null (every window) validates the same ones."""
    ckpt = _recorded_run(tmp_path, 8, batch=16)
    (tmp_path / "checkpoints" / "data.json").write_text(json.dumps({"val_windows": 65}))
    for now in (["data.batch_size=16", "trainer.limit_val_batches=null"], ["data.batch_size=4"]):
        assert [o for o in resume_overrides(_compose(now), ckpt, now) if "val" in o] == \
            ([] if "trainer.limit_val_batches=null" in now else ["++trainer.limit_val_batches=null"])


def test_a_completed_run_without_its_checkpoints_has_nothing_to_train(tmp_path):
    """ckpt_path=last / resume=true at the step a run completed needs no checkpoint: its results.json says so. Any
    other step, another status, a checkpoint present (train() compares its step), or a fresh run: not this case."""
    from deepseek_mini.training.resume import finished_without_checkpoint

    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "global_step": 4}))
    for ckpt, resume, steps, found in (("last", False, 4, True), (None, True, 4, True), ("last", False, 6, False),
                                       (None, False, 4, False), (str(tmp_path / "x.ckpt"), False, 4, False)):
        assert (finished_without_checkpoint(tmp_path, ckpt, resume, steps) is not None) == found, (ckpt, resume, steps)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert finished_without_checkpoint(tmp_path, "last", False, 4) is None
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    (tmp_path / "results.json").write_text(json.dumps({"status": "interrupted", "global_step": 4}))
    assert finished_without_checkpoint(tmp_path, "last", False, 4) is None
