"""Inference side: generate.py end to end, the KV-cache report, cache measurement, the decode benchmark's smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_script_inprocess

from deepseek_mini.analysis.kv_cache import (
    equivalent_gqa_groups,
    format_table,
    kv_cache_table,
    measure_kv_bytes,
    paper_comparison,
    paper_comparison_numbers,
    plot_kv_cache,
    shape_variants,
)
from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(script: str, *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A hand-made Lightning-style checkpoint of a tiny MLA model + a ByteLevel BPE tokenizer.json beside it."""
    from model_helpers import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints",
                                 ["The quick brown fox jumps over the lazy dog.", "Once upon a time there was a model.",
                                  "It decoded one token at a time."])


def test_generate_cli_greedy_matches_model_generate(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from conftest import run_script_inprocess

    path, model, tok = tiny_ckpt
    prompt = "Once upon a time"
    monkeypatch.chdir(tmp_path)  # in this process (the next test runs generate.py as its own process)
    code, stdout, stderr = run_script_inprocess("scripts/generate.py", [f"ckpt_path={path}", f"prompt={prompt}",
                                                "max_new_tokens=12", "temperature=0"], capsys, monkeypatch)
    assert code == 0, stderr[-3000:]
    ids = tok.encode(prompt).ids
    eos = tok.token_to_id("<|endoftext|>")
    out = model.generate(torch.tensor([ids]), 12, temperature=0, eos_token_id=eos)[0, len(ids):].tolist()
    if eos in out:
        out = out[:out.index(eos)]
    expected = prompt + tok.decode(out, skip_special_tokens=False)
    assert stdout == expected + "\n"  # only the text on stdout; the statistics line goes to stderr
    last = stderr.rstrip("\n").split("\n")[-1]
    assert "tokens/s" in last and "KV cache" in last and "MLA latent cache, absorb decode" in last
    assert list(tmp_path.iterdir()) == []  # no outputs/ or .hydra/ or log file left behind


def test_generate_cli_streams_sampled_text(tiny_ckpt, tmp_path):
    path, _, _ = tiny_ckpt
    proc = _run("generate.py", f"ckpt_path={path}", "prompt=The quick", "max_new_tokens=6", "temperature=0.9",
                "top_k=20", "top_p=0.9", "mla_decode=naive", "stop_at_eos=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The quick") and "6 new tokens" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["ckpt_path=does/not/exist.ckpt"], "checkpoint not found"),
    ([], "ckpt_path is required"),
    (["prompt=x", "max_new_tokens=100"], "exceeds the model's max_position_embeddings=64"),
])
def test_generate_cli_errors(tiny_ckpt, tmp_path, args, message, capsys, monkeypatch):
    if args and args[0] == "prompt=x":
        args = [f"ckpt_path={tiny_ckpt[0]}", *args]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_script_inprocess("scripts/generate.py", args, capsys, monkeypatch)
    assert code != 0
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_generate_cli_no_tokenizer(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from conftest import run_script_inprocess

    lone = tmp_path / "a" / "b" / "last.ckpt"
    lone.parent.mkdir(parents=True)
    lone.write_bytes(tiny_ckpt[0].read_bytes())
    code, _, err = run_script_inprocess("scripts/generate.py", [f"ckpt_path={lone}", f"hydra.run.dir={tmp_path}"],
                                        capsys, monkeypatch)
    assert code != 0 and "Traceback" not in err
    assert err.strip().startswith("error: no tokenizer.json"), err


def test_kv_cache_numbers():
    rows = {r["name"]: r for r in kv_cache_table(shape_variants(), context=131072)}
    assert rows["v2/mla"]["elements_per_token"] == 34_560
    assert rows["lite/mla"]["elements_per_token"] == 15_552
    assert rows["v2/mha"]["elements_per_token"] == 1_966_080
    assert rows["v2/gqa"]["elements_per_token"] == 122_880 and rows["lite/gqa"]["elements_per_token"] == 27_648
    assert rows["v2/mqa"]["elements_per_token"] == 15_360
    assert rows["v2/mla"]["bytes_per_token_bf16"] == 69_120
    assert rows["v2/mla"]["bytes_context_bf16"] == 69_120 * 131072
    assert equivalent_gqa_groups(ModelConfig.preset("v2")) == 2.25
    assert equivalent_gqa_groups(ModelConfig.preset("small")) == 2.25
    n = paper_comparison_numbers()
    assert n["ds67b_elements"] == 194_560
    assert abs(100 * n["reduction_quantized"] - 93.3) < 0.1
    assert abs(100 * n["reduction_bf16"] - 82.2) < 0.1
    assert "93.3%" in paper_comparison() and "82.2%" in paper_comparison()
    table = format_table(list(rows.values()))
    assert "34,560" in table and "| v2 | MLA |" in table


def test_kv_cache_report_cli_and_png(tiny_ckpt, tmp_path):
    path, _, _ = tiny_ckpt
    (path.parent.parent / "results.json").write_text('{"val_loss": 3.25}')
    proc = _run("kv_cache_report.py", "--out-dir", str(tmp_path / "rep"), "--ckpt", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "34,560" in proc.stdout and "15,552" in proc.stdout and "93.3%" in proc.stdout
    assert "3.2500" in proc.stdout
    png = tmp_path / "rep" / "kv_cache.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rep" / "kv_cache_report.md").is_file()


def test_kv_cache_report_takes_the_loss_of_each_checkpoints_own_weights(tmp_path, monkeypatch):
    """A best-step file is listed with the validation at its step, not the run's final val_loss; last.ckpt with its
    own history's; a step never validated is n/a, not another step's number."""
    from conftest import load_script

    report = load_script("scripts/kv_cache_report.py", monkeypatch)
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    history = [[0, 9.0], [2, 8.26], [4, 7.9], [6, 7.86]]
    (ck.parent / "results.json").write_text(json.dumps({"val_loss": 7.86, "val_history": history}))
    best = report.checkpoint_val_loss(ck / "best-step2.ckpt", {"global_step": 2})  # weights only: no history
    assert best == (8.26, f"{ck.parent / 'results.json'}: val_history at step 2")
    own = {"global_step": 4, "callbacks": {"RunHistory": {"val_history": [[0, 9.5], [4, 7.5]]}}}
    assert report.checkpoint_val_loss(ck / "last.ckpt", own) == (7.5, "last.ckpt: its validation at step 4")
    assert report.checkpoint_val_loss(ck / "last.ckpt", {"global_step": 5}) == (None, "n/a: no validation at step 5")
    hf = tmp_path / "run" / "hf"
    hf.mkdir()
    assert report.checkpoint_val_loss(hf, None) == (7.86, str(ck.parent / "results.json"))  # no step: the final


def test_plot_kv_cache(tmp_path):
    out = plot_kv_cache(kv_cache_table(shape_variants(["tiny"])), tmp_path / "x.png")
    assert out.stat().st_size > 5_000


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_measure_kv_bytes_cpu(attention):
    cfg = ModelConfig.preset("tiny" if attention == "mla" else "tiny_gqa", vocab_size=64, num_hidden_layers=2)
    model = DeepSeekV2(cfg)
    r = measure_kv_bytes(model, batch=3, max_len=40)
    assert r["measured_bytes"] == r["formula_bytes"] == cfg.kv_cache_bytes_per_token(4) * 3 * 40
    r16 = measure_kv_bytes(model, batch=2, max_len=8, dtype=torch.bfloat16)
    assert r16["measured_bytes"] == cfg.kv_cache_bytes_per_token(2) * 2 * 8


def test_bench_decode_cpu_smoke(tmp_path, capsys, monkeypatch):
    import json

    from conftest import load_script, worst_of

    rc = load_script("scripts/bench/bench_decode.py", monkeypatch).main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--check",
                     "--inductor", "max_autotune=True", "--out", str(tmp_path / "b.json")])
    proc = capsys.readouterr()
    assert rc == 0, proc.err[-3000:]
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["args"]["inductor"] == {"max_autotune": True}  # what the compiled step would be built with
    assert len(data["rows"]) == 3 * 2 * 2 and all(r["status"] == "ok" for r in data["rows"])
    diffs = [float(line.rsplit(" ", 1)[1]) for line in proc.out.splitlines() if "max abs diff" in line]
    assert len(diffs) == 3 and worst_of(*diffs) < 1e-4  # the graph-mode step computes what the model's decode does
    assert data["capacity"][0]["vs_mha"] == pytest.approx(4096 / 768)
    assert proc.out.rstrip().endswith("MLA fits 5.33x MHA's batch x context.")


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-8])
def test_a_tiny_temperature_samples_the_top_token(temperature):
    """Any temperature > 0 is a distribution: one of 1e-300 made every fp32 logit inf or nan and multinomial raised.
    As the temperature goes to 0 the distribution is the argmax (ties shared)."""
    from deepseek_mini.model.sampling import sample, sampling_probs

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = logits[2, 11] = logits[2].max() + 1  # a tie at the top
    probs = sampling_probs(logits, temperature, top_k=5, top_p=0.9)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    assert torch.equal(probs[:2].argmax(-1), logits[:2].argmax(-1)) and torch.allclose(probs[:2].amax(-1), torch.ones(2))
    assert probs[2, 7] == probs[2, 11] == 0.5
    assert torch.equal(sample(logits[:2], temperature), logits[:2].argmax(-1))
