"""scripts/bench/triton_grouped_mm.py's kernels under Triton's CPU interpreter (the timings need a GPU).

The grouped GEMMs that read their rows through an index are compared with the fp32 PyTorch products expert by
expert, in both load paths (pointer loads, and TMA tiles for the weights and ungathered rows), with an expert that
owns no rows, experts whose rows are not a multiple of the tile, and widths that are not a multiple of it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import max_diff_under_interpreter, requires_triton, worst_of

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench" / "triton_grouped_mm.py"


def _bench():
    if str(SCRIPT.parent) not in sys.path:  # its own folder, as when it runs (gpu_timing.py)
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("triton_grouped_mm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_kernels_with_reference() -> float:
    """Largest absolute difference of every product against its reference (fp32 inputs of unit scale)."""
    b = _bench()
    torch.manual_seed(0)
    E, k, T, d, i = 5, 2, 37, 40, 24  # 74 rows: not a multiple of 16; d = 40: a partial column tile of 16
    n = T * k
    offs, src = b.expert_rows(n, E, k, "cpu")
    counts = torch.diff(offs, prepend=torch.zeros(1, dtype=offs.dtype))
    counts[2] += counts[1]
    counts[1] = 0  # expert 1 owns no rows
    offs = counts.cumsum(0).to(torch.int32)
    x, a, g = torch.randn(T, d), torch.randn(n, i), torch.randn(n, d)
    w_gu, w_d, grad_h = torch.randn(E, 2 * i, d), torch.randn(E, d, i), torch.randn(n, 2 * i)
    dst = torch.randperm(n)
    worst = 0.0
    for config in ((16, 16, 16, 4, 1), (16, 16, 16, 4, 1, "tma"), (32, 16, 16, 4, 1)):
        pairs = [
            (b.rows_mm(x, src, w_gu, offs, True, n, config), b.reference_rows_mm(x, src, w_gu, offs, True)),
            (b.rows_mm(a, None, w_d, offs, True, n, config), b.reference_rows_mm(a, None, w_d, offs, True)),
            (b.rows_mm(g, dst, w_d, offs, False, n, config), b.reference_rows_mm(g, dst, w_d, offs, False)),
            (b.rows_mm(grad_h, None, w_gu, offs, False, n, config), b.reference_rows_mm(grad_h, None, w_gu, offs, False)),
            (b.wgrad(grad_h, x, src, offs, config), b.reference_wgrad(grad_h, x, src, offs)),
            (b.wgrad_gathered_g(g, dst, a, offs, config), b.reference_wgrad(g[dst], a, None, offs)),
        ]
        for got, ref in pairs:
            assert got.shape == ref.shape
            worst = worst_of(worst, float((got - ref).abs().max()))
    # an expert with no rows gets a zero weight gradient, not uninitialised memory
    assert (b.wgrad(grad_h, x, src, offs, (16, 16, 16, 4, 1))[1] == 0).all()
    return worst


@requires_triton
def test_gathering_grouped_gemms_match_the_expert_by_expert_products():
    assert max_diff_under_interpreter("test_triton_grouped_mm_bench", "compare_kernels_with_reference") < 1e-4


def test_routing_gives_sorted_rows_and_offsets():
    b = _bench()
    offs, src = b.expert_rows(6 * 50, 8, 6, "cpu")
    assert offs.dtype == torch.int32 and int(offs[-1]) == 300 and (offs.diff() >= 0).all()
    assert src.shape == (300,) and int(src.max()) < 50
    assert torch.equal(torch.bincount(src, minlength=50), torch.full((50,), 6))  # every token's K copies


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert _bench().main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err
