"""Issue 19 items 1, 2 and the eval side of 9: eval.py measures what training measured (the mean over target
tokens, a short last batch included), needs no training files, defaults to the data the checkpoint was trained
on and says which data it uses, and refuses bad settings in one line before loading anything."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from model_helpers import SMALL_MODEL
from test_reliability import TINY, error_lines, run_inprocess

from deepseek_mini import cli as cli_mod
from deepseek_mini.checkpoint import CheckpointError
from deepseek_mini.config import ModelConfig
from deepseek_mini.data import DataError, train_tokenizer
from deepseek_mini.model import DeepSeekV2
from deepseek_mini.training import evaluate as steps
from deepseek_mini.training.module import LitDeepSeek


# ---------------------------------------------------------------------- the loss: a mean over target tokens
def _windows(n: int = 9, seq: int = 16, ignored: bool = True):
    """n windows (batches of 4 leave a short last batch of 1); some labels -100, unevenly over the windows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SMALL_MODEL["vocab_size"], (n, seq + 1), generator=g)
    inputs, labels = x[:, :-1].clone(), x[:, 1:].clone()
    if ignored:
        labels[0, : seq // 2] = -100
        labels[-1, 3:] = -100  # the short last batch holds only 3 target tokens
    return torch.utils.data.TensorDataset(inputs, labels)


def _per_token_mean(model, ds) -> tuple[float, int]:
    """Ground truth: one cross-entropy over every target token of the data set at once."""
    x, y = ds.tensors
    with torch.no_grad():
        logits = model(x).logits
    loss = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    return float(loss), int((y != -100).sum())


def test_training_validation_is_the_mean_over_target_tokens():
    torch.manual_seed(0)
    module = LitDeepSeek(SMALL_MODEL, optim={"fused": False})
    ds = _windows()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logged = trainer.validate(module, torch.utils.data.DataLoader(ds, batch_size=4), verbose=False)[0]["val/loss"]
    truth, tokens = _per_token_mean(module.model.eval(), ds)
    assert module.val_history[-1][1] == pytest.approx(truth, abs=1e-6)
    assert logged == pytest.approx(truth, abs=1e-5)  # Lightning keeps logged values in float32
    assert module.val_tokens == tokens


def test_eval_loss_step_is_the_mean_over_target_tokens():
    torch.manual_seed(0)
    model = DeepSeekV2(ModelConfig(**SMALL_MODEL)).eval()
    ds = _windows()
    val = steps.val_loss(model, torch.utils.data.DataLoader(ds, batch_size=4), torch.device("cpu"))
    truth, tokens = _per_token_mean(model, ds)
    assert val.loss == pytest.approx(truth, abs=1e-6) and val.tokens == tokens and val.batches == 3
    head = steps.val_loss(model, torch.utils.data.DataLoader(ds, batch_size=4), torch.device("cpu"), limit_batches=2)
    assert head.batches == 2 and head.tokens == tokens - 3


@pytest.mark.parametrize(("n", "limit", "batch", "world", "want"), [
    (90, 8, 4, 1, 32), (90, None, 4, 1, 90), (90, 1.0, 4, 1, 90), (90, 0.5, 4, 1, 44),  # 23 batches -> 11
    (20, 8, 4, 1, 20),  # fewer windows than the limit: all of them
    (90, 8, 4, 2, 64),  # each of 2 ranks its first 8 batches of 4: the first 64 windows together
    (65, 2, 4, 2, 16), (65, None, 4, 2, 65), (65, 1.0, 4, 3, 65),  # all: the padded shards cover every window once
    (65, 0.5, 4, 2, 2 * 4 * 4),  # per rank ceil(65/2) = 33 windows, 9 batches, half -> 4 batches
])
def test_validated_windows(n, limit, batch, world, want):
    assert steps.validated_windows(n, limit, batch, world) == want


def test_validated_windows_are_the_windows_the_ranks_validate_on():
    """Against the data module's own rank shards (padding windows have no target): what eval.py counts is what
    the ranks of a DDP validation read, each its first `limit` batches."""
    from types import SimpleNamespace

    from deepseek_mini.data import TextDataModule

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return 65

        def __getitem__(self, i):
            return torch.tensor([i]), torch.tensor([i])

    for world, limit, batch in ((2, 2, 4), (2, None, 4), (3, 5, 2), (4, 0.5, 3), (1, 3, 8)):
        seen = []
        for rank in range(world):
            dm = TextDataModule.__new__(TextDataModule)
            dm.val_dataset, dm.val_batch_size, dm.setup = Windows(), batch, lambda stage=None: None
            dm.num_workers, dm.pin_memory, dm.persistent_workers = 0, False, False
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
            batches = list(dm.val_dataloader())
            n = len(batches) if limit is None else (
                max(1, int(len(batches) * limit)) if isinstance(limit, float) else limit)
            seen += [int(t) for _, y in batches[:n] for t in y.flatten() if t >= 0]
        assert sorted(seen) == list(range(len(seen))), "each window once, the leading ones"
        assert len(seen) == steps.validated_windows(65, limit, batch, world), (world, limit, batch)


# ---------------------------------------------------------------------- which data
def test_data_overrides_and_the_recorded_data(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    recorded = {"source": "text", "train_files": ["/a/train.txt"], "val_files": ["/a/val.txt"], "seq_len": 32,
                "batch_size": 4, "val_batch_size": 7, "val_fraction": 0.1}
    (ck / "data.json").write_text(json.dumps({"description": "text:/a/train.txt", "datamodule": recorded,
                                              "limit_val_batches": 8}))
    cfg_data = {"source": "stdlib", "train_files": None, "val_files": None, "seq_len": 128, "batch_size": 16,
                "val_batch_size": None, "val_fraction": 0.05, "cache_dir": "/c"}
    data, why, limit = steps.eval_data(cfg_data, ck / "last.ckpt", [])
    assert {k: data[k] for k in recorded} == recorded and data["cache_dir"] == "/c"
    assert limit == steps.RunValidation(8, 1, 7, None, None), "a record from before world_size: one process"
    assert "trained on" in why
    data, why, limit = steps.eval_data({**cfg_data, "val_batch_size": 2}, ck / "last.ckpt", ["data.val_batch_size=2"])
    assert data["val_batch_size"] == 2 and data["source"] == "text" and "data.val_batch_size" in why
    assert limit == steps.RunValidation(8, 1, 7, None, None), "batched otherwise, the run's windows all the same"
    data, why, limit = steps.eval_data({**cfg_data, "source": "text", "val_files": "/b/v.txt"}, ck / "last.ckpt",
                                       ["data=text", "data.val_files=/b/v.txt"])
    assert data["val_files"] == "/b/v.txt" and data["train_files"] is None and data["seq_len"] == 32, \
        "other text, cut into windows as in training"
    assert "command line" in why and limit is None
    data, why, limit = steps.eval_data(cfg_data, tmp_path / "elsewhere" / "last.ckpt", [])
    assert data == cfg_data and "records no training data" in why
    data, why, limit = steps.eval_data(cfg_data, tmp_path / "elsewhere" / "last.ckpt", ["data.seq_len=64"])
    assert "records no training data, with data.seq_len from the command line" in why


@pytest.mark.parametrize(("record", "says"), [
    ([1, 2], "a list, not the mapping a run records"),
    ({"datamodule": "x"}, "its datamodule is a str, not a mapping"),
    ({"datamodule": {"seq_len": 32, "batch_size": 4, "max_chars": "abc"}}, "data.max_chars='abc'"),
    ({"datamodule": {"seq_len": 32, "batch_size": 4}, "limit_val_batches": "abc"}, "limit_val_batches='abc'"),
])
def test_a_damaged_data_record_is_one_line(record, says, tmp_path):
    """checkpoints/data.json that parses but is not what a run records: refused naming it (each was a traceback in
    eval.py: an AttributeError, or a DataLoader / int() failing on the recorded value)."""
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "data.json").write_text(json.dumps(record))
    cfg_data = {"source": "stdlib", "seq_len": 128, "batch_size": 16, "cache_dir": str(tmp_path / "c")}
    with pytest.raises(CheckpointError, match=r"cannot read .*data.json: ") as e:
        steps.eval_data(cfg_data, ck / "last.ckpt", [])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_validation_set_without_a_window_is_one_line(tmp_path):
    tok = train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, vocab_size=300, show_progress=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "val.txt").write_text("x = 1\n")
    data = {"source": "text", "val_files": str(tmp_path / "val.txt"), "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataError, match=r"fewer than data.seq_len \+ 1 = 65: no window to evaluate"):
        steps.val_windows(data, tmp_path / "tokenizer.json", 64, announce=lambda d: None)


# ---------------------------------------------------------------------- bad settings: one line, nothing loaded
BAD = [
    (["limit_batches=0"], "limit_batches=0: must be a positive integer"),
    (["limit_batches=-2"], "limit_batches=-2: must be a positive integer"),
    (["limit_batches=abc"], "limit_batches=abc: must be a positive integer"),
    (["device=tpu"], "device=tpu: use auto, cpu or cuda"),
    (["ckpt_path=null"], "give the checkpoint to evaluate"),
]
if not torch.cuda.is_available():
    BAD += [(["device=cuda"], "device=cuda: CUDA is not available"), (["device=gpu"], "device=gpu: CUDA is not")]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_eval_settings_fail_before_loading(args, message, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    code, out = run_inprocess("eval.py", [f"ckpt_path={tmp_path / 'never_read.ckpt'}", *args,
                                          f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'e'}"],
                              capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out, out
    lines = error_lines(out)
    assert len(lines) == 1 and message in lines[0], out
    assert not cache.exists()


def test_unwritable_eval_output_dir_fails_before_loading(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, out = run_inprocess("eval.py", [f"ckpt_path={tmp_path / 'never_read.ckpt'}", f"paths.output_dir={blocker}/out",
                                          f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'e'}"],
                              capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out, out
    lines = error_lines(out)
    assert len(lines) == 1 and f"paths.output_dir={blocker}/out: cannot write there" in lines[0], out


# ---------------------------------------------------------------------- end to end: eval on a tiny run
def _main(script: str, args: list[str]) -> int:
    """`python <script> <args>` in this process (the console-script entry point); its exit status."""
    argv, full = sys.argv, os.environ.pop("HYDRA_FULL_ERROR", None)
    sys.argv = [script, *args]
    try:
        (cli_mod.train_main if script == "train.py" else cli_mod.eval_main)()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        if full is not None:
            os.environ["HYDRA_FULL_ERROR"] = full
    return 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir) -> Path:
    """2 steps of the tiny model; validation on every window, 7 per batch: the last batch is short."""
    run = tmp_path_factory.mktemp("eval") / "run"
    train = [o for o in TINY if not o.startswith(("trainer.max_steps", "trainer.val_check_interval",
                                                  "trainer.limit_val_batches"))]
    assert _main("train.py", [*train, "trainer.max_steps=2", "trainer.val_check_interval=2",
                              "trainer.limit_val_batches=null", "data.val_batch_size=7", "logger=none",
                              f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]) == 0
    return run


@pytest.mark.slow
def test_eval_prints_the_runs_val_loss(run_dir, cache_dir, tmp_path, capsys):
    windows = json.loads((run_dir / "checkpoints" / "data.json").read_text())["val_windows"]
    assert windows % 7, "the test needs a short last batch"
    capsys.readouterr()
    assert _main("eval.py", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"paths.cache_dir={cache_dir}",
                             "max_new_tokens=4", f"hydra.run.dir={tmp_path / 'eval'}", "device=cpu"]) == 0  # as trained
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    train = json.loads((run_dir / "results.json").read_text())
    assert res["loss"] == pytest.approx(train["val_loss"], abs=1e-6)
    assert res["val_batches"] == math.ceil(windows / 7) and res["val_tokens"] == windows * 32 == train["val_tokens"]
    assert "trained on" in res["data_from"] and res["data"] in out
    assert [line for line in out.splitlines() if line.startswith("evaluating on ")] == \
        [f"evaluating on {res['data']} ({res['data_from']})"]
    record = json.loads((run_dir / "checkpoints" / "data.json").read_text())
    assert len(record["val_hash"]) == 64 and "changed" not in res["data_from"], "the same text: no warning"


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["windows", "text"])
def test_eval_says_when_the_runs_validation_text_has_changed(run_dir, cache_dir, tmp_path, capsys, edit):
    """data.json records how many validation windows the run had and its documents' hash: when its files have
    changed since (here the record says one window more, or another hash with the same counts: an edit that keeps
    the length), eval still evaluates them but says its loss is not the run's val_loss."""
    import shutil

    ck = shutil.copytree(run_dir / "checkpoints", tmp_path / "run" / "checkpoints")
    record = json.loads((ck / "data.json").read_text())
    now = record["val_hash"]
    if edit == "windows":
        record["val_windows"] += 1
    else:
        record["val_hash"] = "0" * 64
    (ck / "data.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert _main("eval.py", [f"ckpt_path={ck / 'last.ckpt'}", f"paths.cache_dir={cache_dir}", "max_new_tokens=2",
                             f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    err = capsys.readouterr().err
    how = (f"{record['val_windows'] - 1} windows of {record['val_tokens']} tokens, the run had "
           f"{record['val_windows']} of {record['val_tokens']}" if edit == "windows"
           else f"its documents hash to {now[:12]}, the run's to {'0' * 12}")
    changed = f"the validation text has changed since training: {how}"
    assert f"warning: {changed}; the loss is not comparable with the run's val_loss" in err
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["data_from"].endswith(changed)


@pytest.mark.slow
def test_eval_on_val_files_needs_no_training_files(run_dir, cache_dir, tmp_path, capsys):
    val = tmp_path / "val.txt"
    val.write_text(Path(json.__file__).read_text())
    capsys.readouterr()
    assert _main("eval.py", [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "data=text",
                             f"data.val_files={val}", f"paths.cache_dir={cache_dir}", "max_new_tokens=4",
                             "limit_batches=3", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["data"] == f"text val:{val}" and "command line" in res["data_from"]
    assert res["val_batches"] == 3 and res["val_tokens"] == 3 * 7 * 32, "windows as in training: 7 x 32 tokens"
    assert f"evaluating on text val:{val}" in capsys.readouterr().out
    assert math.isfinite(res["loss"])



def test_missing_val_files_are_named_as_val_files(tmp_path):
    """eval reads data.val_files as the stand-in training files of its corpus: a missing one is named by the key the
    user typed, not as train_files."""
    from deepseek_mini.data import DataError
    from deepseek_mini.training.evaluate import val_windows

    with pytest.raises(DataError, match=r"file not found: .*nope.txt \(val_files\)"):
        val_windows({"source": "text", "val_files": str(tmp_path / "nope.txt"), "cache_dir": str(tmp_path)},
                    tmp_path / "tokenizer.json", 16, announce=lambda _: None)
