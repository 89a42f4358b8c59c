"""The sweep report on job dirs written by hand (results.json, .hydra/, csv/metrics.csv; no training): only completed
jobs ranked, interrupted / unknown ones listed with their step, the grid's jobs that never ran named (through
scripts/sweep_report.py and multirun.yaml), jobs of several sweeps kept apart, the CSV validation before training at
step 0, every plot not drawn named, --out created or refused in one line, an empty training panel explained, and
repeated seeds drawn as one point per value."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib
import pytest
import yaml

matplotlib.use("Agg")

from deepseek_mini.analysis.sweep_plots import plot_curves, plot_vs  # noqa: E402
from deepseek_mini.analysis.sweep_report import PLOT_FILES, Job, load_job, main, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
TPS = 512  # tokens per optimizer step of the fake jobs (data.batch_size 4 x seq_len 128)


def _job_dir(path: Path, overrides: list[str], status: str | None = "completed", val_loss: float = 3.5,
             step: int = 4, max_steps: int = 4, csv_rows: list[str] | None = None, val_before_fit: bool = True,
             log_every: int = 10, **extra) -> Path:
    """A job dir as train.py leaves it. status None: no results.json (killed); "absent": one without a status."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({
        "seed": 1234, "val_before_fit": val_before_fit, "data": {"batch_size": 4, "seq_len": 128},
        "trainer": {"max_steps": max_steps, "log_every_n_steps": log_every}}))
    rank = next((int(o.split("=")[1]) for o in overrides if o.startswith("model.kv_lora_rank=")), 16)
    if status is not None:
        res = {"status": status, "val_loss": val_loss, "val_loss_start": 8.3, "global_step": step,
               "global_batch_tokens": TPS, "tokens_seen": step * TPS, "kv_cache_bytes_per_token": 8 * rank,
               "config": {"kv_lora_rank": rank}, "val_history": [[0, 8.3], [step, val_loss]], **extra}
        res = {k: v for k, v in res.items() if v is not None and v != "absent"}
        (path / "results.json").write_text(json.dumps(res))
    if csv_rows is not None:
        (path / "csv").mkdir()
        (path / "csv" / "metrics.csv").write_text("\n".join(["epoch,step,train/loss,val/loss", *csv_rows]) + "\n")
    return path


def _sweep(root: Path, jobs: list[tuple[list[str], dict]]) -> Path:
    for i, (overrides, kw) in enumerate(jobs):
        _job_dir(root / str(i), overrides, **kw)
    return root


def _section(report: str, title: str) -> str:
    part = report.split(f"## {title}")[1]
    return part.split("\n## ")[0]


def _ranked(report: str) -> list[str]:
    """The job names of the results table, best first."""
    table = _section(report, "Results")
    return [ln.split(" | ")[1] for ln in table.splitlines() if ln.startswith("| ") and ln[2].isdigit()]


# ---------------------------------------------------------------------- 1. only completed jobs are ranked
def test_only_completed_jobs_are_ranked_unfinished_ones_listed_with_their_step(tmp_path):
    sweep = _sweep(tmp_path / "sw", [
        (["model.kv_lora_rank=16"], {"val_loss": 3.5}),
        # interrupted at step 2 of 4: its val loss is the validation before training (a stale, lower number here)
        (["model.kv_lora_rank=32"], {"status": "interrupted", "val_loss": 3.0, "step": 2, "signal": "SIGINT",
                                     "checkpoint": "/x/1/checkpoints/last.ckpt"}),
        (["model.kv_lora_rank=64"], {"status": "running", "val_loss": 2.9, "step": 1}),  # a status we don't know
        (["model.kv_lora_rank=128"], {"status": "absent", "val_loss": 2.8}),  # a results.json without a status
    ])
    report = write_report([sweep]).read_text()
    assert _ranked(report) == ["0"], report
    assert "Jobs: 4 (1 ok, 0 failed, 3 unfinished)." in report
    rows = {ln.split(" | ")[0][2:]: ln for ln in _section(report, "Unfinished jobs (3)").splitlines()
            if ln.startswith("| ") and ln[2].isdigit()}
    assert set(rows) == {"1", "2", "3"}
    assert "| interrupted | 2 of 4 |" in rows["1"] and "SIGINT" in rows["1"] and "last.ckpt" in rows["1"]
    assert "at step 2" in rows["1"]  # its last validation, named with its step
    assert "| running | 1 of 4 |" in rows["2"] and "no status" in rows["3"]
    # the val-loss plots show completed jobs only: one rank left, so no rank plot, and the report says why
    assert not (sweep / PLOT_FILES["rank"]).exists()


# ---------------------------------------------------------------------- 2. jobs that never ran
def _script_main():
    spec = importlib.util.spec_from_file_location("sweep_report_script", ROOT / "scripts" / "sweep_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _multirun_yaml(sweep: Path, task: list[str], params: dict | None, target: str = BASIC) -> None:
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
        "sweeper": {"_target_": target, "max_batch_size": None, "params": params},
        "overrides": {"hydra": [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"], "task": task}}}))


def test_jobs_the_sweep_never_started_are_named_from_multirun_yaml(tmp_path, capsys):
    """A sweep interrupted in job 1 of 4: jobs 2 and 3 have no dir. The grid of multirun.yaml (the sweeper's params
    first, then the command line's, as Hydra orders them) names them; under Optuna there is no grid to name."""
    script = _script_main()
    sweep = _sweep(tmp_path / "sw", [
        (["experiment=tiny_cpu", "seed=1", "model.kv_lora_rank=16"], {}),
        (["experiment=tiny_cpu", "seed=1", "model.kv_lora_rank=32"], {"status": "interrupted", "step": 2}),
    ])
    _multirun_yaml(sweep, ["experiment=tiny_cpu", "model.kv_lora_rank=16,32"], {"seed": "1,2"})
    assert script.main([str(sweep)], planned=script.planned_jobs) == 0
    assert "4 jobs (1 ok, 0 failed, 1 unfinished, 2 not run)" in capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    not_run = _section(report, "Not run (2)")
    assert "| 2 | `seed=2 model.kv_lora_rank=16` |" in not_run and "| 3 | `seed=2 model.kv_lora_rank=32` |" in not_run
    assert "Jobs: 4 (1 ok, 0 failed, 1 unfinished, 2 not run)." in report

    _multirun_yaml(sweep, ["experiment=tiny_cpu", "+hparams_search=optuna"], {"seed": "range(1, 9)"},
                   target="hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    assert script.main([str(sweep)], planned=script.planned_jobs) == 0
    assert "Not run" not in (sweep / "report.md").read_text()


# ---------------------------------------------------------------------- 3. several sweeps
@pytest.mark.parametrize("names", [("a", "b"), ("x/sweep", "y/sweep")])
def test_several_sweeps_with_the_same_overrides_are_told_apart(names, tmp_path, captured):
    dirs = []
    for n, name in enumerate(names):
        dirs.append(_sweep(tmp_path / name, [
            ([f"model.kv_lora_rank={r}"], {"val_loss": 3.5 - 0.1 * i - 0.01 * n, "csv_rows": []})
            for i, r in enumerate((16, 32))]))
    report = write_report(dirs, tmp_path / "out").read_text()
    assert "Jobs: 4 (4 ok, 0 failed)." in report
    tags = [Path(name).parent.name + "/" + Path(name).name if "/" in name else name for name in names]
    figs = {fig.axes[0].get_title(): fig for fig in captured}
    val_ax = figs["Training loss over tokens"].axes[1]
    labels = [ln.get_label() for ln in val_ax.get_lines()]
    assert len(labels) == 4 and len(set(labels)) == 4, labels  # no job drawn over another, none dropped
    assert all(any(lab.startswith(f"{t}: ") for t in tags) for lab in labels), labels
    bars = [t.get_text() for t in figs["Validation loss per job (best first)"].axes[0].get_yticklabels()]
    assert len(bars) == 4 and len(set(bars)) == 4, bars


@pytest.mark.parametrize("b_steps", [4, 8])
def test_several_sweeps_compare_what_their_jobs_ran_not_what_their_commands_set(b_steps, tmp_path):
    """Sweep a set trainer.max_steps, logger and ckpt_path (a resumed sweep) on its command line, sweep b none of
    them: a key one command did not set is the value its jobs ran with (their recorded config), not a blank
    (`null`) column; where and how a job ran (logger, ckpt_path) is no column at all."""
    set_a = ["trainer.max_steps=4", "logger=csv", "ckpt_path=last"]
    a = _sweep(tmp_path / "a", [([*set_a, f"model.kv_lora_rank={r}"], {}) for r in (16, 32)])
    b = _sweep(tmp_path / "b", [([f"model.kv_lora_rank={r}"], {"max_steps": b_steps}) for r in (16, 32)])
    jobs = [load_job(d) for d in (a / "0", a / "1", b / "0", b / "1")]
    from deepseek_mini.analysis.sweep_report import varying_keys

    keys = varying_keys(jobs)
    assert keys == (["kv_lora_rank"] if b_steps == 4 else ["trainer.max_steps", "kv_lora_rank"])
    assert [j.value("trainer.max_steps") for j in jobs] == [4, 4, b_steps, b_steps]
    report = write_report([a, b], tmp_path / "out").read_text()
    header = next(ln for ln in report.splitlines() if ln.startswith("| # |"))
    assert "ckpt_path" not in header and "logger" not in header and "null" not in report.split("## Failed")[0]


def test_jobs_that_read_the_same_are_all_drawn(tmp_path, captured):
    """Two jobs whose labels are the same (the values that tell them apart are not among the keys): both lines."""
    jobs = []
    for name in ("0", "1"):
        j = Job(name=name, path=tmp_path, swept={"kv_lora_rank": 16}, results={"val_loss": 3.0})
        j.val_curve = [(0.0, 8.0), (100.0, 3.0 + int(name))]
        jobs.append(j)
    assert plot_curves(jobs, ["kv_lora_rank"], tmp_path / "c.png")
    assert len(captured[0].axes[1].get_lines()) == 2


# ---------------------------------------------------------------------- 4. the CSV's validation before training
# rows as Lightning's CSVLogger writes them (deepseek_mini/training/module.py logs inside fit() at `step` = steps
# done - 1; train.py's validate_before_fit runs trainer.validate() at step 0 before any step)
CSV_EVERY_STEP = ["0,0,,8.30", "0,0,8.29,", "0,0,,8.20", "0,1,8.19,", "0,1,,8.10"]  # val_check_interval=1
CSV_EVERY_2 = ["0,0,,8.30", "0,1,,8.20", "0,3,,8.10"]  # val_check_interval=2, train loss every 10 steps


@pytest.mark.parametrize("rows,val_before_fit,steps,train", [
    (CSV_EVERY_STEP, True, [0, 1, 2], [1, 2]),
    (CSV_EVERY_2, True, [0, 2, 4], []),
    (CSV_EVERY_STEP[2:], False, [1, 2], [2]),  # no validation before training: the step-0 row is that of step 1
    (CSV_EVERY_2[:1], True, [0], []),  # killed during the first steps: only the validation before training
    # val_check_interval=3 of max_steps=4: the final weights validated after fit(), logged at step 4 (epoch 1)
    (["0,0,,8.30", "0,2,,8.20", "1,4,,8.10"], True, [0, 3, 4], []),
])
def test_curve_from_metrics_csv_puts_the_validation_before_training_at_step_0(rows, val_before_fit, steps, train,
                                                                               tmp_path):
    job = load_job(_job_dir(tmp_path / "0", ["model.kv_lora_rank=16"], status=None, csv_rows=rows,
                            val_before_fit=val_before_fit))
    assert job.status == "failed"
    assert [x / TPS for x, _ in job.val_curve] == steps
    assert [x / TPS for x, _ in job.train_curve] == train  # train rows: logged at steps done - 1
    assert job.steps_text() == f">= {max(steps + train)} of 4"


def test_killed_job_error_is_an_error_line_not_a_sample_naming_one(tmp_path):
    d = _job_dir(tmp_path / "0", ["model.kv_lora_rank=16"], status=None)
    info = "[2026-01-01 00:00:00,000][deepseek_mini.training.callbacks][INFO] - sample @ step 2: 'x' -> 'BlockingIOError'"
    (d / "train.log").write_text(info + "\n")
    assert load_job(d).error.startswith("no results.json")
    (d / "train.log").write_text("[2026-01-01 00:00:00,000][x][ERROR] - RuntimeError: CUDA out of memory\n" + info)
    assert load_job(d).error == "RuntimeError: CUDA out of memory"


# ---------------------------------------------------------------------- 5. every plot not drawn is named
def test_every_plot_not_drawn_is_named_with_the_reason(tmp_path):
    sweep = _sweep(tmp_path / "sw", [(["model.kv_lora_rank=16"], {}),
                                     (["model.kv_lora_rank=32"], {"status": "failed", "error": "OOM"})])
    report = write_report([sweep]).read_text()
    skipped = report.split("Skipped: ")[1].split("\n")[0]
    assert "val loss vs kv_lora_rank: fewer than two kv_lora_rank values among the completed jobs" in skipped
    assert "val loss vs n_routed_experts: n_routed_experts is not swept" in skipped
    assert "val loss vs KV bytes/token: every completed job has the same KV-cache size" in skipped

    none = _sweep(tmp_path / "none", [([f"model.kv_lora_rank={r}"], {"status": None}) for r in (16, 32)])
    report = write_report([none]).read_text()
    skipped = report.split("Skipped: ")[1].split("\n")[0]
    drawn = [f for f in PLOT_FILES.values() if (none / f).exists()]
    assert drawn == [] and skipped.count(": ") >= len(PLOT_FILES), skipped
    for what in ("kv_lora_rank", "n_routed_experts", "KV bytes/token", "loss curves", "val loss per job"):
        assert what in skipped, what


# ---------------------------------------------------------------------- 6. --out
def test_out_dir_is_created_or_refused_in_one_line(tmp_path, capsys):
    sweep = _sweep(tmp_path / "sw", [(["model.kv_lora_rank=16"], {}), (["model.kv_lora_rank=32"], {})])
    out = tmp_path / "new" / "deeper"
    assert main([str(sweep), "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and not (sweep / "report.md").exists()
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main([str(sweep), "--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out={bad}: "), err


# ---------------------------------------------------------------------- 7. an empty training panel says why
def test_training_panel_without_a_logged_train_loss_says_why(tmp_path, captured):
    job = load_job(_job_dir(tmp_path / "0", ["model.kv_lora_rank=16"], csv_rows=CSV_EVERY_2))
    assert job.train_curve == [] and job.val_curve
    assert plot_curves([job], ["kv_lora_rank"], tmp_path / "c.png")
    train_ax = captured[0].axes[0]
    assert not train_ax.get_lines()
    note = " ".join(t.get_text() for t in train_ax.texts).replace("\n", " ")
    assert "No training loss was logged" in note and "every 10 optimizer steps" in note and "at most 4" in note


# ---------------------------------------------------------------------- 8. repeated seeds along the x axis
def test_val_loss_vs_rank_with_repeated_seeds_draws_one_point_per_rank(tmp_path, captured):
    jobs = []
    for seed in (1, 2):
        for rank, loss in ((16, 3.6), (32, 3.4)):
            j = Job(name=f"{seed}-{rank}", path=tmp_path, swept={"seed": seed, "kv_lora_rank": rank},
                    results={"val_loss": loss + 0.05 * seed, "config": {"kv_lora_rank": rank}})
            jobs.append(j)
    assert plot_vs(jobs, "kv_lora_rank", None, tmp_path / "v.png", "t")
    ax = captured[0].axes[0]
    for line in ax.get_lines():  # the mean line and the error-bar caps: one point per rank, no zigzag
        xs = list(line.get_xdata())
        assert len(xs) == len(set(xs)) == 2, xs
    main_line = next(ln for ln in ax.get_lines() if ln.get_linestyle() == "-")
    assert list(main_line.get_ydata()) == pytest.approx([3.675, 3.475])
    assert sorted(t.get_text() for t in ax.texts) == ["n=2", "n=2"]
    assert "seed" in ax.get_title()
