"""eval.py / generate.py arguments: one set of sampling rules, prompt_file, stdout kept for the text."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_script_inprocess
from omegaconf import OmegaConf

from deepseek_mini.config import ConfigError
from deepseek_mini.generation_args import check_length, check_sampling, read_prompt

OK = {"temperature": 0.8, "top_k": 50, "top_p": None, "max_new_tokens": 64}


@pytest.mark.parametrize("key, value, rule", [
    ("temperature", -0.5, "must be >= 0"),
    ("top_k", -1, "must be an integer >= 1"),
    ("top_k", 2.5, "must be an integer >= 1"),
    ("top_p", 1.5, r"must be in \(0, 1\]"),
    ("top_p", 0, r"must be in \(0, 1\]"),
    ("max_new_tokens", 0, "must be an integer >= 1"),
    ("temperature", "hot", "must be a number"),
])
def test_bad_sampling_settings_are_one_line_errors(key, value, rule):
    with pytest.raises(ConfigError, match=rf"^{key}={value}: {rule}") as err:
        check_sampling(OmegaConf.create({**OK, key: value}))
    assert "\n" not in str(err.value)


def test_good_sampling_settings_pass():
    check_sampling(OmegaConf.create({**OK, "top_k": None, "top_p": 1.0, "temperature": 0}))
    check_sampling(OmegaConf.create({**OK, "top_k": 0, "top_p": 0.9}))


def test_length_beyond_the_models_positions_is_refused_not_clamped():
    check_length(10, 54, 64)
    with pytest.raises(ConfigError, match=r"^max_new_tokens=5000: .* exceeds the model's max_position_embeddings=64"):
        check_length(3, 5000, 64)


def test_prompt_file_and_stdin(tmp_path, monkeypatch):
    import io

    path = tmp_path / "p.txt"
    path.write_text('def main(a, b="x"):\n')
    assert read_prompt(OmegaConf.create({"prompt": "ignored", "prompt_file": str(path)})) == 'def main(a, b="x"):\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin ("))
    assert read_prompt(OmegaConf.create({"prompt": "ignored", "prompt_file": "-"})) == "from stdin ("
    assert read_prompt(OmegaConf.create({"prompt": "plain", "prompt_file": None})) == "plain"
    with pytest.raises(ConfigError, match=r"^prompt_file=.*nope.txt: no such file"):
        read_prompt(OmegaConf.create({"prompt": "", "prompt_file": str(tmp_path / "nope.txt")}))
    for not_a_file in (tmp_path, "/dev/zero"):  # a directory; a device read forever (it said "no such file")
        with pytest.raises(ConfigError, match=r"^prompt_file=.*: not a regular file"):
            read_prompt(OmegaConf.create({"prompt": "", "prompt_file": str(not_a_file)}))


def test_export_hf_files_share_one_mode(tmp_path):
    from test_hf import cfg_of, make_model, train_tokenizer

    from deepseek_mini.interop.hf import save_pretrained

    tok = train_tokenizer(tmp_path / "tokenizer.json")
    out = tmp_path / "hf"
    old = os.umask(0o022)
    try:
        save_pretrained(make_model(cfg_of(vocab_size=tok.get_vocab_size())), out, tokenizer=tok)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o644, modes


@pytest.mark.parametrize("script", ["eval.py", "scripts/generate.py"])
def test_cli_sampling_errors_before_loading(script, tmp_path, capsys, monkeypatch):
    """One rule for both entry points: top_p=1.5 is refused in one line, rc 2, before the checkpoint is read."""
    code, _, err = run_script_inprocess(script, [f"ckpt_path={tmp_path / 'missing.ckpt'}", "top_p=1.5",
                                                 f"hydra.run.dir={tmp_path}"], capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines() == ["error: top_p=1.5: must be in (0, 1] (null = off)"]


@pytest.mark.slow
def test_generate_reads_the_prompt_from_stdin_and_keeps_stdout_for_text(tmp_path, capsys, monkeypatch):
    from test_hf import cfg_of, make_model, train_tokenizer

    from deepseek_mini.interop.hf import save_pretrained

    tok = train_tokenizer(tmp_path / "tokenizer.json")
    out = tmp_path / "hf"
    save_pretrained(make_model(cfg_of(vocab_size=tok.get_vocab_size())), out, tokenizer=tok)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), f"ckpt_path={out}", "prompt_file=-",
                           "max_new_tokens=4", "temperature=0", "stop_at_eos=false"],
                          input="def main(", capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def main(") and "tokens/s" not in proc.stdout
    assert "new tokens in" in proc.stderr and "KV cache" in proc.stderr
    # as a user runs them (no HYDRA_FULL_ERROR), in this process: both end before any model work
    code, _, err = run_script_inprocess("scripts/generate.py", [f"ckpt_path={out}", "prompt=def main("], capsys,
                                        monkeypatch)
    assert code == 2 and "prompt_file=" in err and len(err.strip().splitlines()) == 1, err
    code, helped, _ = run_script_inprocess("scripts/generate.py", ["--help"], capsys, monkeypatch)
    assert code == 0 and "ckpt_path" in helped and "optim" not in helped and "trainer" not in helped
