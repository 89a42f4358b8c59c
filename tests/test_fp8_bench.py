"""scripts/bench/fp8_grouped_mm.py's own parts on CPU (the timings need a GPU with FP8 tensor cores)."""

from __future__ import annotations

import pytest
import torch

from deepseek_mini.config import PRESETS, ModelConfig


@pytest.fixture
def bench(monkeypatch):
    from conftest import load_script

    return load_script("scripts/bench/fp8_grouped_mm.py", monkeypatch)


def test_rowwise_fp8_quantization_round_trips_within_e4m3_precision(bench):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.tensor([1e-3, 1.0, 300.0]).view(3, 1, 1)  # rows of very different sizes
    x[0, 0] = 0  # a row of zeros keeps scale 1
    q, scale = bench.quantize_rowwise(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (3, 5)
    assert scale[0, 0] == 1 and (q[0, 0].float() == 0).all()
    back = q.float() * scale[..., None]
    assert (q.float().abs().amax(-1)[x.abs().amax(-1) > 0] == bench.FP8_MAX).all()  # each row's max uses the range
    rel = (back - x).abs().amax(-1) / x.abs().amax(-1).clamp_min(1e-30)
    assert rel.max() <= 2**-4  # e4m3: 3 mantissa bits, half an ulp of the largest value at most


def test_the_gemms_are_one_moe_layers_at_the_model_shape(bench):
    cfg = ModelConfig(**PRESETS["small"])
    gemms = bench.expert_gemms(cfg, 16 * 1024)
    assert [(g["rows"], g["K"], g["out"]) for g in gemms] == [(98304, 768, 768), (98304, 384, 768),
                                                             (98304, 768, 384), (98304, 768, 768)]
    offs, _ = bench.expert_rows(6 * 512, 64, 6, "cpu")
    assert offs.dtype == torch.int32 and offs.shape == (64,) and int(offs[-1]) == 6 * 512
    assert (offs.diff() >= 0).all()


def test_without_a_gpu_it_says_so(bench, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert bench.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err
