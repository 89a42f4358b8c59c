"""Bad settings, by class: each is refused in one line (`error: <key>=<value>: <rule>`, exit status 2), before any
data preparation, model loading or write, never as a traceback, and never taken silently.

1. train.yaml's top-level keys (cpu_threads, tags) are checked by the pre-Hydra check, so a refused command, a resume
   included, leaves the run dir as it was;
2. the options of the nodes Hydra instantiates (callbacks, loggers, trainer nodes): their values against the target's
   annotations, then the value rules this package's classes declare (check_config_options);
3. eval.py / scripts/generate.py: seed, device, flags and data settings (eval.py's before Hydra creates its run dir);
4. scripts/export_hf.py's output dir, scripts/kv_cache_report.py's flags.

All in-process and before any model work, so the file takes seconds.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from conftest import CONFIGS, TINY_OVERRIDES, load_script, run_script_inprocess
from test_reliability import error_lines

from deepseek_mini.config import ConfigError


def assert_one_line_refusal(code: int, out: str, err: str, expected: str) -> None:
    text = out + err
    assert code == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = error_lines(text)
    assert len(lines) == 1 and expected in lines[0], text[-3000:]


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and dir under root with its size and mtime (ns): what "left as it was" compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def train(args: list[str], tmp_path: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    return run_script_inprocess("train.py", [*TINY_OVERRIDES, "logger=csv", f"paths.cache_dir={tmp_path / 'cache'}",
                                             *args], capsys, monkeypatch)


# ---------------------------------------------------------------------- 1. train.yaml's top-level keys
TOP_LEVEL = [
    (["cpu_threads=abc"], "cpu_threads=abc: must be auto or a positive integer"),
    (["cpu_threads=0"], "cpu_threads=0: must be auto or a positive integer"),
    (["cpu_threads=1.5"], "cpu_threads=1.5"),
    (["cpu_threads=100000"], "cpu_threads=100000: must be at most this machine's"),  # was a segfault
    (["seed=4294967296"], "seed=4294967296: must be an integer >= 0 and <= 4294967295"),  # seed_everything's range
    (["tags=[dev,1]"], "tags=['dev', 1]: a word or a list of words"),  # wandb's pydantic traceback, after data prep
]


def test_a_refused_resume_leaves_the_run_dir_as_it_was(tmp_path, capsys, monkeypatch):
    """cpu_threads was checked inside train(), after Hydra had rewritten the run's .hydra/*.yaml and train.log and
    taken .run.lock. The settings check comes before the checkpoint is read, so a stand-in file does here."""
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    for name, text in ((".hydra/config.yaml", "seed: 1234\n"), (".hydra/overrides.yaml", "[]\n"),
                       ("train.log", "the first run's log\n"), ("checkpoints/last.ckpt", "stand-in")):
        (run_dir / name).write_text(text)
    before = tree_state(run_dir)
    code, out, err = train([f"hydra.run.dir={run_dir}", "ckpt_path=last", "cpu_threads=abc"], tmp_path, capsys,
                           monkeypatch)
    assert_one_line_refusal(code, out, err, "cpu_threads=abc")
    assert tree_state(run_dir) == before


# ---------------------------------------------------------------------- 2. options of instantiated nodes
NODE_OPTIONS = [
    # a word where a number belongs: was Hydra's two-line "Error in call to target" after data preparation
    (["callbacks.model_checkpoint.save_top_k=abc"], "callbacks.model_checkpoint.save_top_k='abc': must be an integer"),
    (["callbacks.samples.n_prompts=abc"], "callbacks.samples.n_prompts='abc': must be an integer"),
    (["callbacks.throughput.peak_flops=fast"], "callbacks.throughput.peak_flops='fast': must be a finite number or null"),
    (["+logger.csv.flush_logs_every_n_steps=often"], "logger.csv.flush_logs_every_n_steps='often': must be an integer"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc': must be an integer or null"),
    (["callbacks.lr_monitor.logging_interval=steps"], "logging_interval='steps': must be step, epoch or null"),
    (["callbacks.model_checkpoint.filename=123"], "filename=123: must be text or null"),
    # out of range, by the classes' own rules: was a traceback after training had run (samples) or after data prep
    (["callbacks.samples.temperature=-1"], "callbacks.samples.temperature=-1: must be >= 0"),
    (["callbacks.samples.top_k=-3"], "callbacks.samples.top_k=-3: must be an integer >= 1"),
    (["callbacks.samples.n_prompts=-1"], "callbacks.samples.n_prompts=-1: must be an integer >= 0"),
    (["callbacks.samples.max_new_tokens=64"], "callbacks.samples.max_new_tokens=64: must be < model.max_position_"),
    (["callbacks.samples.prompts=abc"], "callbacks.samples.prompts='abc': a list of prompts"),  # list("abc")
    (["callbacks.model_checkpoint.save_top_k=-2"], "callbacks.model_checkpoint.save_top_k=-2: must be an integer >= -1"),
    (["callbacks.model_checkpoint.mode=lowest"], "callbacks.model_checkpoint.mode='lowest': use min or max"),
    (["callbacks.model_checkpoint.every_n_train_steps=-1"], "every_n_train_steps=-1: must be an integer >= 0"),
    (["callbacks.throughput.peak_flops=0"], "callbacks.throughput.peak_flops=0: must be a positive number"),
    (["+callbacks.model_summary.max_depth=-5"], "callbacks.model_summary.max_depth=-5: must be an integer >= -1"),
]


def test_option_values_follow_the_annotation():
    """int, float, str, bool, Literal and their Optional/Union; any other type in an annotation leaves the value to
    the target (refusing what it would take is worse); no annotation: a bool default still wants true/false."""
    from deepseek_mini.training.run_config import _check_option

    def f(a: int, b: float | None, c: str, d: bool, e: int | bool, g: str | Path, h=False, i=3, j: int = 0):
        pass

    params = inspect.signature(f, eval_str=True).parameters
    good = {"a": [3, -1], "b": [1, 2.5, None], "c": ["x"], "d": [True], "e": [2, False], "g": [5, "p", [1]],
            "h": [True], "i": ["anything"], "j": ["${trainer.max_steps}"]}  # interpolations: checked where they point
    for name, values in good.items():
        for v in values:
            _check_option(name, v, params[name])
    bad = {"a": ["3", 2.0, True, None], "b": ["x", True], "c": [1, None, ["x"]], "d": ["yes", 1], "e": ["x"],
           "h": ["maybe"]}
    for name, values in bad.items():
        for v in values:
            with pytest.raises(ConfigError, match=rf"^{name}=.*: must be"):
                _check_option(name, v, params[name])


@pytest.mark.parametrize("option", [f"{g}={p.stem}" for g in ("callbacks", "logger", "trainer", "debug", "experiment")
                                    for p in sorted((CONFIGS / g).glob("*.yaml"))])
def test_every_shipped_config_passes_the_option_checks(option, tmp_path):
    """The value rules refuse nothing the repository ships (every callbacks/logger/trainer node of every option)."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from deepseek_mini.training.run_config import (
        TrainerSettings,
        check_instantiated_options,
        check_trainer_options,
        model_config_from,
    )

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[option], return_hydra_config=True)
    cfg.paths.output_dir = str(tmp_path)
    check_instantiated_options(cfg, model_config_from(cfg))
    typed = {f.name for f in dataclasses.fields(TrainerSettings)} | {"_target_"}  # TrainerSettings' own checks
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_trainer_options({k: v for k, v in trainer.items() if k not in typed})


# ---------------------------------------------------------------------- 3. eval.py and scripts/generate.py
GENERATE = [
    (["seed=abc"], "seed=abc: must be an integer >= 0"),  # was a ValueError traceback
    (["seed=18446744073709551616"], "must be an integer >= 0 and < 2**64"),  # torch.manual_seed's range
    (["device=foo"], "device=foo: use auto, cpu or cuda"),  # was a RuntimeError traceback
    (["stop_at_eos=maybe"], "stop_at_eos=maybe: use true or false"),  # was taken as true
    (["print_prompt=maybe"], "print_prompt=maybe: use true or false"),
    (["max_new_tokens=abc"], "max_new_tokens=abc: must be a number"),
]


@pytest.mark.parametrize(("overrides", "expected"), GENERATE, ids=[" ".join(o) for o, _ in GENERATE])
def test_generate_settings_are_one_line_errors(overrides, expected, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"never read: the settings are refused before the checkpoint is loaded")
    code, out, err = run_script_inprocess("scripts/generate.py", [f"ckpt_path={ckpt}", *overrides], capsys,
                                          monkeypatch)
    assert_one_line_refusal(code, out, err, expected)


EVAL = [
    (["seed=abc"], "seed=abc: must be an integer >= 0"),  # was a ValueError traceback
    (["seed=18446744073709551616"], "must be an integer >= 0 and < 2**64"),  # torch.manual_seed's range
    (["device=foo"], "device=foo: use auto, cpu or cuda"),
    (["data.batch_size=0"], "data.batch_size=0: must be a positive integer"),  # was silently replaced
    (["data.val_batch_size=-1"], "data.val_batch_size=-1: must be a positive integer"),  # DataLoader traceback
    (["data.val_fraction=abc"], "data.val_fraction='abc': must be a number"),  # float() traceback
    (["data.num_proc=abc"], "data.num_proc='abc': must be a positive integer"),
    (["data.seq_len=abc"], "data.seq_len='abc': must be a positive integer"),
    (["data.max_chars=0"], "data.max_chars=0: must be a positive integer"),
    (["top_p=2"], "top_p=2: must be in (0, 1]"),
]


@pytest.mark.parametrize(("overrides", "expected"), EVAL, ids=[" ".join(o) for o, _ in EVAL])
def test_eval_settings_are_one_line_errors(overrides, expected, tmp_path, capsys, monkeypatch):
    code, out, err = run_script_inprocess("eval.py", [f"ckpt_path={tmp_path / 'missing.ckpt'}",
                                                      f"paths.cache_dir={tmp_path / 'cache'}",
                                                      f"hydra.run.dir={tmp_path / 'eval'}", *overrides],
                                          capsys, monkeypatch)
    assert_one_line_refusal(code, out, err, expected)  # before the (missing) checkpoint is even looked for
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "eval").exists(), "checked before Hydra creates the eval's run dir"


def test_eval_without_a_checkpoint_leaves_no_run_dir(tmp_path, capsys, monkeypatch):
    code, out, err = run_script_inprocess("eval.py", [f"hydra.run.dir={tmp_path / 'eval'}"], capsys, monkeypatch)
    assert_one_line_refusal(code, out, err, "give the checkpoint to evaluate")
    assert not (tmp_path / "eval").exists()


def test_eval_batch_size_from_the_command_line_means_what_it_says(tmp_path):
    """data.batch_size=N on eval's command line is the evaluation batch size: the checkpoint's recorded
    val_batch_size used to win over it silently."""
    import json

    from deepseek_mini.training.evaluate import eval_data

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    recorded = {"source": "stdlib", "seq_len": 32, "batch_size": 4, "val_batch_size": 4, "max_chars": 1000}
    (ckpt.parent / "data.json").write_text(json.dumps({"datamodule": recorded, "limit_val_batches": 2}))
    cfg_data = {"source": "stdlib", "seq_len": 128, "batch_size": 2, "val_batch_size": None, "max_chars": 5}
    data, _, _ = eval_data(cfg_data, ckpt, ["data.batch_size=2"])
    assert (data["batch_size"], data["val_batch_size"]) == (2, None)  # the loader takes val_batch_size or batch_size
    data, _, _ = eval_data(cfg_data, ckpt, [])
    assert (data["batch_size"], data["val_batch_size"], data["seq_len"]) == (4, 4, 32)  # as recorded
    data, _, _ = eval_data({**cfg_data, "val_batch_size": 3}, ckpt, ["data.batch_size=2", "data.val_batch_size=3"])
    assert (data["batch_size"], data["val_batch_size"]) == (2, 3)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.val_files=other.txt"], "data.val_files='other.txt': the stdlib source does not read it (only data=text"),
    (["data=text", "data.val_files=other.txt", "data.hub_name=x"], "data.hub_name='x': the text source does not"),
])
def test_eval_refuses_a_data_setting_its_source_would_ignore(overrides, expected, tmp_path, capsys, monkeypatch):
    """The run recorded the stdlib source: `data.val_files=x` alone evaluated on the stdlib split, printed 'with
    data.val_files from the command line' and recorded x in eval.json. Refused before the eval dir exists."""
    import json

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")  # never read: the data settings are refused first
    recorded = {"source": "stdlib", "seq_len": 32, "batch_size": 4, "val_batch_size": 4, "max_chars": 1000}
    (ckpt.parent / "data.json").write_text(json.dumps({"datamodule": recorded, "limit_val_batches": 2}))
    code, out, err = run_script_inprocess("eval.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}",
                                                      *overrides], capsys, monkeypatch)
    assert_one_line_refusal(code, out, err, expected)
    assert not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------- 4. export_hf.py and kv_cache_report.py
def test_export_to_a_file_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    export = load_script("scripts/export_hf.py", monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    missing = tmp_path / "missing.ckpt"  # never read: the output dir is refused first
    for out_dir in (a_file, a_file / "sub"):
        assert export.main([str(missing), str(out_dir), "--no-verify"]) == 2
        err = capsys.readouterr().err
        assert error_lines(err) == [f"error: out_dir={out_dir}: {a_file} is a file, not a directory"], err


def test_export_into_an_older_export_or_an_empty_path_is_refused(tmp_path, capsys, monkeypatch):
    """An older export's shards or tokenizer would stay beside the new weights and be read with them; an empty path
    is the current directory."""
    export = load_script("scripts/export_hf.py", monkeypatch)
    older = tmp_path / "hf"
    older.mkdir()
    (older / "model-00001-of-00002.safetensors").write_bytes(b"old")
    missing = tmp_path / "missing.ckpt"  # never read: the output dir is refused first
    for out_dir, says in ((older, "is not empty; give a new or empty directory"), ("", "an empty path")):
        assert export.main([str(missing), str(out_dir), "--no-verify"]) == 2
        err = capsys.readouterr().err
        assert len(error_lines(err)) == 1 and says in err, err


RUN_DIRS = [  # train.py / eval.py and a run dir they must not write into
    ("train.py", ["hydra.run.dir="], "hydra.run.dir='': an empty path would be the current directory"),
    ("train.py", ["hydra.run.dir={run}"], "holds a run (its checkpoints or results.json); continue it"),
    ("train.py", ["resume=true", "ckpt_path={run}/checkpoints/last.ckpt"], "resume=true means ckpt_path=last"),
    ("eval.py", ["ckpt_path=x.ckpt", "hydra.run.dir={run}"], "is a training run's dir"),
    ("eval.py", ["ckpt_path=x.ckpt", "hydra.run.dir="], "hydra.run.dir='': an empty path"),
]


@pytest.mark.parametrize(("script", "args", "expected"), RUN_DIRS, ids=[f"{s} {' '.join(a)}" for s, a, _ in RUN_DIRS])
def test_a_command_that_would_write_over_a_run_is_refused(script, args, expected, tmp_path, capsys, monkeypatch):
    """A finished run's dir (a fresh run there would replace its checkpoints, results and metrics; an eval's .hydra/
    would replace its records), the current directory (an empty path), an ambiguous resume: one line, nothing
    written."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"stand-in")
    (run / "results.json").write_text('{"status": "completed"}')
    before = tree_state(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = [a.format(run=run) for a in args]
    if script == "train.py":
        code, out, err = train(argv, tmp_path, capsys, monkeypatch)
    else:
        code, out, err = run_script_inprocess(script, argv, capsys, monkeypatch)
    assert_one_line_refusal(code, out, err, expected)
    assert tree_state(tmp_path) == before


KV_REPORT = [
    (["--context", "-5"], "--context=-5: must be a positive integer"),  # was exit 0, negative bytes
    (["--context", "0"], "--context=0: must be a positive integer"),
    (["--measure", "--measure-len", "-3"], "--measure-len=-3: must be a positive integer"),  # was a traceback
    (["--measure", "--measure-batch", "0"], "--measure-batch=0: must be a positive integer"),  # was a nan table
    (["--gqa-groups", "tiny"], "--gqa-groups tiny: expected SHAPE=N"),  # was "not enough values to unpack"
    (["--gqa-groups", "tiny=abc"], "--gqa-groups tiny=abc: expected SHAPE=N"),
    (["--gqa-groups", "tiny=0"], "--gqa-groups tiny=0: expected SHAPE=N with N a positive integer"),
    (["--gqa-groups", "tiny=3"], "--gqa-groups tiny=3: N must divide tiny's 4 attention heads"),
    (["--gqa-groups", "foo=2"], "--gqa-groups foo=2: foo is not one of --shapes"),  # was silently unused
    (["--measure", "--measure-shapes", "foo"], "--measure-shapes: unknown preset 'foo'"),  # was a traceback
    (["--measure", "--device", "foo"], "--device=foo: use auto, cpu or cuda"),  # was a traceback
]


@pytest.mark.parametrize(("args", "expected"), KV_REPORT, ids=[" ".join(a) for a, _ in KV_REPORT])
def test_kv_cache_report_flags_are_one_line_errors(args, expected, capsys, monkeypatch):
    report = load_script("scripts/kv_cache_report.py", monkeypatch)
    assert report.main(["--no-files", "--shapes", "tiny", *args]) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err


def test_kv_cache_report_output_dir_that_is_a_file(tmp_path, capsys, monkeypatch):
    report = load_script("scripts/kv_cache_report.py", monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert report.main(["--shapes", "tiny", "--out-dir", str(a_file)]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: --out-dir: {a_file} is a file, not a directory"]


# ---------------------------------------------------------------------- 5. a second probe's cases
SECOND_PROBE = [
    (["+data.bogus=1"], "data.bogus=1: not an option of TextDataModule or CorpusSpec"),  # TypeError traceback, late
    (["data.pin_memory=maybe"], "data.pin_memory='maybe': must be true or false"),  # taken silently
    (["logger=wandb", "+logger.wandb.bogus=1"], "logger.wandb.bogus=1: not an option of WandbLogger or init"),  # wandb.init, late
    (["logger=wandb", "+logger.wandb.mode=bogus"], "logger.wandb.mode='bogus': must be online, offline, disabled, shared or null"),
    (["logger=wandb", "logger.wandb.tags=[dev,1]"], "logger.wandb.tags=['dev', 1]: a word or a list of words"),
    (["+trainer.profiler=bogus"], "trainer.profiler='bogus': use simple, advanced, pytorch or xla"),
    (["+trainer.strategy=bogus"], "trainer.strategy='bogus': not one of Lightning's strategies"),
    (["+trainer.max_time=abc"], "trainer.max_time='abc': use DD:HH:MM:SS"),
    (["+trainer.limit_train_batches=nan"], "trainer.limit_train_batches=nan: must be "),  # rule from the annotation
    (["trainer=ddp", "trainer.accelerator=cpu", "trainer.strategy.process_group_backend=bogus"],
     "trainer.strategy.process_group_backend='bogus': use nccl, gloo"),
    (["trainer=ddp", "trainer.accelerator=cpu", "+trainer.strategy.timeout=abc"], "trainer.strategy.timeout='abc'"),
    (["+callbacks.bar=5"], "callbacks.bar=5: not a callback: a node with a _target_"),  # TypeError traceback
    (["+callbacks.foo={a:1}"], "callbacks.foo={'a': 1}: not a callback"),  # skipped without a word
    (["+logger.foo={a:1}"], "logger.foo={'a': 1}: not a logger"),
    (["callbacks.model_checkpoint.monitor=bogus"], "monitor='bogus': a metric the run logs"),  # at the 1st validation
    # what the data step would have refused, after the run dir existed
    (["data.source=bogus"], "data.source='bogus': use stdlib, text or hub"),
    (["data=text"], "data.train_files=None: source=text needs"),
    (["data=text", "data.train_files=/nonexistent/corpus.txt"], "data.train_files='/nonexistent/corpus.txt': file not"),
    (["data.tokenizer_path=/nonexistent/tokenizer.json"], "data.tokenizer_path='/nonexistent/tokenizer.json': no such"),
    (["data=hub"], "data.hub_name=None: source=hub needs"),
    # a setting the source would ignore: validated on the stdlib split while naming the file (third probe)
    (["data.val_files=/nonexistent/val.txt"], "data.val_files='/nonexistent/val.txt': the stdlib source does not "
                                              "read it (only data=text does)"),
    (["data.train_files=a.txt"], "data.train_files='a.txt': the stdlib source does not read it"),
    (["data=hub", "data.hub_name=x", "data.val_files=v.txt"], "data.val_files='v.txt': the hub source does not"),
    (["data=text", "data.train_files=a.txt", "data.hub_val_split=test"], "data.hub_val_split='test': the text "
                                                                         "source does not read it (only data=hub"),
    (["data.text_field=body"], "data.text_field='body': the stdlib source does not read it (only data=text or "
                               "data=hub does)"),
]


TRAIN_REFUSALS = TOP_LEVEL + NODE_OPTIONS + SECOND_PROBE


@pytest.mark.parametrize(("overrides", "expected"), TRAIN_REFUSALS, ids=[" ".join(o) for o, _ in TRAIN_REFUSALS])
def test_train_refuses_before_hydra_writes_or_data_prep(overrides, expected, tmp_path, capsys, monkeypatch):
    """Every case of the three tables above: one line, rc 2; no .hydra/, train.log or .run.lock, no data cache."""
    run_dir = tmp_path / "run"
    code, out, err = train([*overrides, f"hydra.run.dir={run_dir}"], tmp_path, capsys, monkeypatch)
    assert_one_line_refusal(code, out, err, expected)
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------- 6. rules that need the data's size
def test_a_validation_fraction_that_leaves_no_batch_is_one_line(tmp_path, capsys, monkeypatch):
    """Lightning validates int(fraction x each rank's validation batches) and refused a fraction that left none in a
    MisconfigurationException traceback at the first validation (more ranks: fewer batches each, so 0.3 under DDP
    failed where one process passed). Checked once the data's windows are known, before the model is built."""
    from deepseek_mini.training.run_config import check_val_fraction

    code, out, err = train(["trainer.limit_val_batches=0.001", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, capsys,
                           monkeypatch)
    assert_one_line_refusal(code, out, err, "trainer.limit_val_batches=0.001: that fraction of the ")
    assert "validation batch(es) there are is none; give at least" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    check_val_fraction(0.3, 40, 4, 1)  # 10 batches: 3 of them
    check_val_fraction(0.3, 40, 4, 2)  # 5 each: 1 of them
    for limit in (0.0, 1.0, 5, None, True):  # nothing to validate, all, counts: not this rule
        check_val_fraction(limit, 8, 4, 4)
    with pytest.raises(ConfigError, match=r"^trainer.limit_val_batches=0.3: that fraction of the 3 validation "
                                          r"batch\(es\) each of the 2 processes has is none; give at least 0.333, or a "
                                          r"number of batches$"):
        check_val_fraction(0.3, 23, 4, 2)  # 12 windows each, 3 batches: int(0.9) = 0
