"""scripts/bench/bench_train.py's own parts on CPU (the timings need a GPU): the real-text data is built before any
variant is timed, so a fresh machine's tokenizer and token cache do not count against a variant's --timeout."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from conftest import load_script


@pytest.fixture
def bench(monkeypatch):
    return load_script("scripts/bench/bench_train.py", monkeypatch)


def fake_runs(monkeypatch, bench) -> list[dict]:
    """subprocess.run of the benchmark recorded: each child "prints" a RESULT line."""
    calls = []

    def run(cmd, capture_output, text, env, timeout=None):
        name = cmd[cmd.index("--child") + 1]
        calls.append({"child": name, "timeout": timeout})
        if name == bench.DATA_CHILD:
            res = {"data_prep_s": 1.0}
        else:
            res = {"variant": name, "tokens_per_sec": 1000.0, "flops_per_token": 1e9, "peak_gib": 1.0}
        return subprocess.CompletedProcess(cmd, 0, stdout="RESULT " + json.dumps(res) + "\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", run)
    return calls


def test_the_data_is_built_first_without_the_variants_timeout(bench, monkeypatch, capsys):
    calls = fake_runs(monkeypatch, bench)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--variants", "hf_eager_fp32,ours@regional", "--timeout", "5"])
    bench.main()
    assert calls == [{"child": bench.DATA_CHILD, "timeout": None}, {"child": "hf_eager_fp32", "timeout": 5.0},
                     {"child": "ours@regional", "timeout": 5.0}]
    assert "tokenizer and tokens of .data/gutenberg_classics_train.txt.gz ready" in capsys.readouterr().out


def test_without_ours_no_data_is_built(bench, monkeypatch):
    calls = fake_runs(monkeypatch, bench)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--variants", "ours_raw,hf_eager_fp32"])  # random tokens
    bench.main()
    assert [c["child"] for c in calls] == ["ours_raw", "hf_eager_fp32"]


def test_prepare_data_builds_the_cache_ours_reads(bench, tmp_path):
    text = " ".join(f"word{i % 97} and more words" for i in range(3000))
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text[:5000])
    args = argparse.Namespace(data=str(tmp_path / "train.txt"), val_data=str(tmp_path / "valid.txt"), batch_size=2,
                              seq_len=32, cache_dir=str(tmp_path / "cache"))
    assert bench.prepare_data(args)["data_prep_s"] > 0
    assert any((tmp_path / "cache" / "tokenizers").iterdir()) and any((tmp_path / "cache" / "tokens").iterdir())


def test_a_failed_data_build_stops_before_any_variant(bench, monkeypatch, capsys):
    calls = []

    def run(cmd, capture_output, text, env, timeout=None):
        calls.append(cmd[cmd.index("--child") + 1])
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="FileNotFoundError: no such corpus")

    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--variants", "ours,hf_eager_fp32"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 1 and calls == [bench.DATA_CHILD]
    out = capsys.readouterr().out
    assert "[data] FAILED (rc 1)" in out and "no such corpus" in out
