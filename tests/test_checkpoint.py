"""Issue 19 items 3 and 10: one verified checkpoint loader for every entry point; checkpoint retention that stores
no bytes twice (last.ckpt a hard link of the best when they are the same state) and a weights-only best."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT
from model_helpers import SMALL_MODEL
from test_reliability import error_lines, run_inprocess

from deepseek_mini.checkpoint import CheckpointError, check_checkpoint_file, load_checkpoint
from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2
from deepseek_mini.training.checkpoint_io import AtomicCheckpointIO
from deepseek_mini.training.checkpointing import RunCheckpoint
from deepseek_mini.training.module import LitDeepSeek

sys.path.insert(0, str(ROOT / "scripts"))
import export_hf  # noqa: E402
import kv_cache_report  # noqa: E402


# ---------------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def ckpts(tmp_path) -> dict[str, Path]:
    """A small real checkpoint of ours, and the ways a file given as one can be wrong."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL_MODEL)
    model = DeepSeekV2(cfg)
    good = tmp_path / "run" / "checkpoints" / "last.ckpt"
    good.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": cfg.to_dict()}, "global_step": 3}, good)
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # one bit inside the tensor data: torch.load alone reads it without a word
    out = {"good": good, "flipped": tmp_path / "flipped.ckpt", "truncated": tmp_path / "truncated.ckpt",
           "results_json": tmp_path / "results.json", "empty": tmp_path / "empty.ckpt",
           "directory": tmp_path / "run" / "checkpoints", "missing": tmp_path / "nope.ckpt"}
    out["flipped"].write_bytes(bytes(flipped))
    out["truncated"].write_bytes(data[: len(data) * 2 // 3])
    out["results_json"].write_text(json.dumps({"val_loss": 4.4}))
    out["empty"].write_bytes(b"")
    # sound files whose contents are not what they claim: each a copy of the good one with one thing changed
    ckpt = torch.load(good, weights_only=True)
    emb = "model.model.embed_tokens.weight"
    changes = {
        "other_config": lambda c: c["hyper_parameters"]["model_config"].update(hidden_size=64),
        "wrong_shape": lambda c: c["state_dict"].update({emb: c["state_dict"][emb][:-1]}),
        "int_weight": lambda c: c["state_dict"].update({emb: c["state_dict"][emb].long()}),
        "nan_weight": lambda c: c["state_dict"][emb].view(-1)[7:9].fill_(float("nan")),
        "config_not_mapping": lambda c: c["hyper_parameters"].update(model_config="tiny"),
        "config_bad_value": lambda c: c["hyper_parameters"]["model_config"].update(rms_norm_eps="abc"),
        "no_state_dict": lambda c: c.pop("state_dict"),
    }
    for kind, change in changes.items():
        copy = {k: (json.loads(json.dumps(v)) if k == "hyper_parameters" else v) for k, v in ckpt.items()}
        copy["state_dict"] = {k: v.clone() for k, v in ckpt["state_dict"].items()}
        change(copy)
        out[kind] = tmp_path / f"{kind}.ckpt"
        torch.save(copy, out[kind])
    return out


CAUSES = {  # the damage -> what the one-line message must say
    "flipped": "corrupt member",
    "truncated": "truncated",
    "results_json": "not a PyTorch checkpoint",
    "empty": "empty file",
    "directory": "is a directory",
    "missing": "not found",
    "other_config": "does not match its model config: model.embed_tokens.weight has shape",
    "wrong_shape": "does not match its model config: model.embed_tokens.weight has shape",
    "int_weight": "torch.int64, not a floating-point weight",
    "nan_weight": "model.embed_tokens.weight holds nan or inf values",
    "config_not_mapping": "a str, not a mapping of ModelConfig fields",
    "config_bad_value": "ModelConfig.rms_norm_eps='abc'",
    "no_state_dict": "no state_dict of tensors",
}


@pytest.mark.parametrize("kind", list(CAUSES))
def test_the_loader_refuses_each_damage_in_one_line(kind, ckpts):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpts[kind])
    msg = str(e.value)
    assert "\n" not in msg and str(ckpts[kind]) in msg and CAUSES[kind] in msg, msg
    if kind == "directory":
        assert str(ckpts["good"]) in msg, "names the file to give instead"


@pytest.mark.parametrize("tool", ["eval", "generate", "export", "kv_cache_report"])
@pytest.mark.parametrize("kind", ["other_config", "nan_weight"])
def test_every_reader_refuses_weights_its_config_does_not_describe(tool, kind, ckpts, tmp_path, capsys, monkeypatch):
    """A sound file whose weights are not the model its config describes: one line, rc 2, in every tool (the
    loaders used to end in load_state_dict's traceback, or to read the wrong numbers with rc 0)."""
    bad = ckpts[kind]
    if tool in ("eval", "generate"):
        script = "eval.py" if tool == "eval" else "scripts/generate.py"
        code, out = run_inprocess(script, [f"ckpt_path={bad}", f"paths.cache_dir={tmp_path / 'cache'}",
                                           f"hydra.run.dir={tmp_path / 'out'}"], capsys, monkeypatch)
    else:
        module = export_hf if tool == "export" else kv_cache_report
        args = [str(bad), str(tmp_path / "hf"), "--no-verify"] if tool == "export" else \
            ["--ckpt", str(bad), "--out-dir", str(tmp_path / "kv")]
        code, out = module.main(args), capsys.readouterr().err
    assert code == 2 and "Traceback" not in out, out[-3000:]
    lines = error_lines(out)
    assert len(lines) == 1 and str(bad) in lines[0] and CAUSES[kind] in lines[0], out[-3000:]
    assert not (tmp_path / "hf").exists()


def test_the_files_beside_a_checkpoint_are_checked(ckpts, tmp_path):
    """tokenizer.json must parse and be the one the run trained with (the sha256 its data module recorded);
    model_config.json, read when the checkpoint holds no config, must parse."""
    from tokenizers import Tokenizer, models

    good = ckpts["good"]
    ckpt = torch.load(good, weights_only=True)
    mine = Tokenizer(models.BPE())
    mine.save(str(good.parent / "tokenizer.json"))
    sha = __import__("hashlib").sha256((good.parent / "tokenizer.json").read_bytes()).hexdigest()
    torch.save({**ckpt, "TextDataModule": {"tokenizer_sha": sha}}, good)
    assert load_checkpoint(good).tokenizer is not None  # the recorded one: accepted
    other = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    other.save(str(good.parent / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="is not the one the checkpoint was trained with"):
        load_checkpoint(good)
    (good.parent / "tokenizer.json").write_text("garbage{")
    with pytest.raises(CheckpointError, match=r"cannot read tokenizer .*tokenizer.json"):
        load_checkpoint(good)
    (good.parent / "tokenizer.json").unlink()
    torch.save({"state_dict": ckpt["state_dict"]}, good)  # no config inside: model_config.json beside it is read
    (good.parent / "model_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*model_config.json: JSONDecodeError"):
        load_checkpoint(good)
    (good.parent / "model_config.json").write_text(json.dumps(ModelConfig(**SMALL_MODEL).to_dict()))
    assert load_checkpoint(good).config == ModelConfig(**SMALL_MODEL)


def test_the_good_checkpoint_loads(ckpts):
    assert check_checkpoint_file(ckpts["good"]) == ckpts["good"]
    loaded = load_checkpoint(ckpts["good"])
    assert loaded.config == ModelConfig(**SMALL_MODEL) and loaded.checkpoint["global_step"] == 3


def test_training_resume_uses_the_same_check():
    from deepseek_mini.training import resume

    assert resume.check_checkpoint_file is check_checkpoint_file  # resolve_ckpt_path (train.py's resume) calls it


def test_eval_refuses_a_flipped_byte_before_data_prep(ckpts, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    code, out = run_inprocess("eval.py", [f"ckpt_path={ckpts['flipped']}", f"paths.cache_dir={cache}",
                                          f"hydra.run.dir={tmp_path / 'eval'}"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out, out
    lines = error_lines(out)
    assert len(lines) == 1 and str(ckpts["flipped"]) in lines[0] and "corrupt member" in lines[0], out
    assert not cache.exists() and not (tmp_path / "eval" / "eval.json").exists()


def test_export_refuses_a_flipped_byte(ckpts, tmp_path, capsys):
    assert export_hf.main([str(ckpts["flipped"]), str(tmp_path / "out"), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "corrupt member" in err and not (tmp_path / "out").exists()


def test_kv_cache_report_refuses_a_flipped_byte(ckpts, tmp_path, capsys):
    assert kv_cache_report.main(["--ckpt", str(ckpts["flipped"]), "--out-dir", str(tmp_path / "kv")]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "corrupt member" in err, err


@pytest.mark.slow
def test_generate_refuses_a_flipped_byte(ckpts, tmp_path, capsys, monkeypatch):
    from conftest import run_script_inprocess

    code, _, err = run_script_inprocess("scripts/generate.py", [f"ckpt_path={ckpts['flipped']}",
                                                                f"hydra.run.dir={tmp_path}"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err, err
    assert len(error_lines(err)) == 1 and "corrupt member" in err, err


def test_from_pretrained_refuses_a_truncated_safetensors_file(tmp_path):
    from deepseek_mini.interop.hf import HFImportError, from_pretrained
    from deepseek_mini.interop.hf import export_hf as write_hf

    cfg = ModelConfig(**{**SMALL_MODEL, "bias_update_speed": 0.0})
    write_hf(DeepSeekV2(cfg), tmp_path / "hf")
    assert from_pretrained(tmp_path / "hf").config.hidden_size == cfg.hidden_size
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(HFImportError, match="truncated") as e:
        from_pretrained(tmp_path / "hf")
    assert str(weights) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"cannot read weights .*model.safetensors: truncated"):
        load_checkpoint(tmp_path / "hf")  # eval.py / generate.py's way in


@pytest.mark.parametrize(("text", "says"), [("{oops", "JSONDecodeError"), ('{"num_attention_heads": 4}', "KeyError"),
                                            (None, "could not convert string to float")])
def test_a_damaged_config_json_is_refused_naming_it(text, says, tmp_path):
    """A config.json that does not parse, lacks a field or holds a word where a number belongs: one HFImportError
    naming the file (eval.py / generate.py / export_hf.py print it as their one line), not a raw traceback."""
    cfg = ModelConfig(**{**SMALL_MODEL, "bias_update_speed": 0.0})
    from deepseek_mini.interop.hf import HFImportError, load_hf_directory
    from deepseek_mini.interop.hf import export_hf as write_hf

    write_hf(DeepSeekV2(cfg), tmp_path / "hf")
    config_json = tmp_path / "hf" / "config.json"
    if text is None:
        text = json.dumps({**json.loads(config_json.read_text()), "rms_norm_eps": "abc"})
    config_json.write_text(text)
    with pytest.raises(HFImportError, match=says) as e:
        load_hf_directory(tmp_path / "hf")
    assert str(config_json) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------- retention
class _Batches(L.LightningDataModule):
    """The same few token windows for training and validation: the loss falls at every validation."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, SMALL_MODEL["vocab_size"], (4, 17), generator=g)
        self.data = torch.utils.data.TensorDataset(x[:, :-1], x[:, 1:])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=4)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=4)


def _fit(ckpt_dir: Path, steps: int = 4, **checkpoint_kwargs) -> None:
    torch.manual_seed(0)
    module = LitDeepSeek(SMALL_MODEL, optim={"lr": 1e-2, "fused": False}, max_steps=steps)
    kwargs = dict(dirpath=ckpt_dir, filename="best-step{step}", auto_insert_metric_name=False, monitor="val/loss",
                  mode="min", save_top_k=1, save_last=True, enable_version_counter=False)
    ckpt = RunCheckpoint(**{**kwargs, **checkpoint_kwargs})
    trainer = L.Trainer(max_steps=steps, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                        callbacks=[ckpt], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", plugins=[AtomicCheckpointIO()], max_epochs=-1,
                        check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=_Batches())


def _inodes(ckpt_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in sorted(ckpt_dir.iterdir())}


def test_best_that_is_also_last_is_stored_once(tmp_path):
    _fit(tmp_path / "ck")
    files = _inodes(tmp_path / "ck")
    assert sorted(files) == ["best-step4.ckpt", "last.ckpt"], files
    assert len(set(files.values())) == 1, "last.ckpt is the best file under a second name, not a copy"
    assert (tmp_path / "ck" / "last.ckpt").stat().st_nlink == 2
    last = load_checkpoint(tmp_path / "ck" / "last.ckpt").checkpoint
    assert last["global_step"] == 4 and last["optimizer_states"], "last.ckpt keeps everything a resume needs"


def test_keep_every_best_links_only_the_newest(tmp_path):
    _fit(tmp_path / "ck", save_top_k=-1)
    files = _inodes(tmp_path / "ck")
    assert sorted(files) == ["best-step2.ckpt", "best-step4.ckpt", "last.ckpt"], files
    assert files["last.ckpt"] == files["best-step4.ckpt"] != files["best-step2.ckpt"]


def test_older_best_and_last_are_separate_files(tmp_path):
    _fit(tmp_path / "ck", mode="max")  # "best" = the highest loss: step 2's, while last is step 4
    files = _inodes(tmp_path / "ck")
    assert sorted(files) == ["best-step2.ckpt", "last.ckpt"] and len(set(files.values())) == 2, files
    assert torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_weights_only_best(tmp_path):
    _fit(tmp_path / "ck", best_weights_only=True)
    files = _inodes(tmp_path / "ck")
    assert sorted(files) == ["best-step4.ckpt", "last.ckpt"] and len(set(files.values())) == 2, files
    best = torch.load(tmp_path / "ck" / "best-step4.ckpt", weights_only=True)
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in best and last["optimizer_states"]
    assert (tmp_path / "ck" / "best-step4.ckpt").stat().st_size < 0.6 * (tmp_path / "ck" / "last.ckpt").stat().st_size
    assert load_checkpoint(tmp_path / "ck" / "best-step4.ckpt").config == ModelConfig(**SMALL_MODEL)  # eval reads it


def test_a_tokenizer_larger_than_the_model_is_refused(ckpts):
    """ids the model has no embedding for: generate.py ended in an IndexError inside the embedding (a Hugging Face
    directory records no tokenizer sha, so only the size can tell)."""
    from tokenizers import Tokenizer, models

    good = ckpts["good"]
    vocab = {f"t{i}": i for i in range(ModelConfig(**SMALL_MODEL).vocab_size + 5)} | {"<unk>": 999}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(good.parent / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer .*tokenizer.json has \d+ tokens but the model beside it only"):
        load_checkpoint(good)


def test_kv_cache_report_reads_past_a_results_json_that_is_not_ours(ckpts, tmp_path, capsys):
    """A results.json beside the run that is a list (or not UTF-8) is not a val loss: skipped, not a traceback; and
    a chart name without an image extension is refused before anything is written."""
    run = ckpts["good"].parent.parent
    (run / "results.json").write_text("[1, 2]")
    assert kv_cache_report.main(["--ckpt", str(ckpts["good"]), "--out-dir", str(tmp_path / "kv")]) == 0
    (run / "results.json").write_bytes(b"\xff\xfe{")
    assert kv_cache_report.main(["--ckpt", str(ckpts["good"]), "--out-dir", str(tmp_path / "kv2")]) == 0
    capsys.readouterr()
    assert kv_cache_report.main(["--out-dir", str(tmp_path / "kv3"), "--png", str(tmp_path / "chart")]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "--png" in err and not (tmp_path / "kv3").exists()
