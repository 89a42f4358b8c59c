"""TritonAdamW == torch.optim.AdamW: the update (weight decay groups, grad_scale), the state, checkpoints.

The kernel itself runs under Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess: Triton reads it
at import) when Triton is installed; the GPU run is in docs/benchmarks.md. Without Triton the optimizer
falls back to torch's fused step, which the in-process test checks.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import max_diff_under_interpreter, requires_triton, worst_of

from deepseek_mini.kernels import runtime
from deepseek_mini.optim.adamw import TritonAdamW
from deepseek_mini.optim.policy import adamw_kind


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # the last one is not contiguous: the kernel leaves it to torch's step, so one step takes both paths
    return [torch.nn.Parameter(torch.randn(3, 1000, generator=g)), torch.nn.Parameter(torch.randn(777, generator=g)),
            torch.nn.Parameter(torch.randn(5, 7, generator=g)), torch.nn.Parameter(torch.randn(7, 5, generator=g).t())]


def _groups(ps, wd):
    return [{"params": ps[:2], "weight_decay": wd}, {"params": ps[2:], "weight_decay": 0.0}]


def compare_with_torch(steps: int = 4) -> float:
    """Largest difference to torch.optim.AdamW over `steps` steps, for each grad_scale / weight-decay case,
    after a checkpoint round trip half way (TritonAdamW's state loaded into torch's AdamW and back)."""
    worst = 0.0
    for scale in (None, 2.5):
        for wd in (0.0, 0.1):
            mine, ref = _params(), _params()
            opt = TritonAdamW(_groups(mine, wd), lr=1e-2, betas=(0.9, 0.95))
            ref_opt = torch.optim.AdamW(_groups(ref, wd), lr=1e-2, betas=(0.9, 0.95), foreach=False)
            g = torch.Generator().manual_seed(1)
            for step in range(steps):
                grads = [torch.randn(p.shape, generator=g) for p in mine]
                in_place = step % 2 == 1  # the gradients where they were: the kernel's tensor table is reused
                tables = dict(opt._tables)
                for p, gr in zip(mine, grads):  # laid out like the parameter, as autograd lays out gradients
                    if in_place:
                        p.grad.copy_(gr)
                    else:
                        p.grad = torch.empty_like(p).copy_(gr)
                for p, gr in zip(ref, grads):
                    p.grad = torch.empty_like(p).copy_(gr / (scale or 1.0))  # what the folded clip scale stands for
                opt.grad_scale = None if scale is None else torch.tensor(scale)
                opt.step()
                if in_place and tables:
                    assert all(opt._tables[k][1] is entry[1] for k, entry in tables.items())
                opt.grad_scale = None
                ref_opt.step()
                if step == steps // 2:  # checkpoint interchange: torch's AdamW reads it, and gives it back
                    other = torch.optim.AdamW(_groups(mine, wd), lr=1e-2, betas=(0.9, 0.95), fused=True)
                    other.load_state_dict(opt.state_dict())
                    opt = TritonAdamW(_groups(mine, wd), lr=1e-2, betas=(0.9, 0.95))
                    opt.load_state_dict(other.state_dict())
            assert all(float(opt.state[p]["step"]) == steps for p in mine)
            worst = worst_of(worst, *(float((a - b).detach().abs().max()) for a, b in zip(mine, ref)))
    return worst


def compare_masters_with_torch(steps: int = 4) -> float:
    """fp32 masters (keep_fp32_masters): the bf16 parameters' update is torch.optim.AdamW's fp32 update with
    the same (bf16) gradients, the bf16 parameter is the master rounded, and the moments stay fp32 through a
    checkpoint exchange with torch's AdamW. Returns the largest master difference to torch."""
    worst = 0.0
    for scale in (None, 2.5):
        mine, ref = _params()[:3], _params()[:3]
        opt = TritonAdamW(_groups(mine, 0.1), lr=1e-2, betas=(0.9, 0.95))
        opt.keep_fp32_masters(mine[:2])  # the third stays an fp32 parameter: one step takes both kinds
        assert mine[0].dtype == torch.bfloat16 and mine[2].dtype == torch.float32
        ref_opt = torch.optim.AdamW(_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=False)
        g = torch.Generator().manual_seed(1)
        for step in range(steps):
            grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in mine]  # autograd's: bf16 for bf16
            for p, gr in zip(mine, grads):
                p.grad = gr.clone()
            for p, gr in zip(ref, grads):
                p.grad = gr.float() / (scale or 1.0)
            opt.grad_scale = None if scale is None else torch.tensor(scale)
            opt.step()
            opt.grad_scale = None
            ref_opt.step()
            for p, master in opt.masters.items():
                assert torch.equal(p, master.to(torch.bfloat16))
            if step == steps // 2:  # torch's AdamW on the fp32 values reads the state, and gives it back
                fp32 = [opt.masters[p].clone() for p in mine[:2]] + [mine[2]]
                other = torch.optim.AdamW(_groups(fp32, 0.1), lr=1e-2, betas=(0.9, 0.95), fused=True)
                other.load_state_dict(opt.state_dict())
                new = TritonAdamW(_groups(mine, 0.1), lr=1e-2, betas=(0.9, 0.95))
                new.masters = opt.masters
                new.load_state_dict(other.state_dict())
                assert all(new.state[p]["exp_avg_sq"].dtype == torch.float32 for p in mine)
                assert all(torch.equal(new.state[p]["exp_avg"], opt.state[p]["exp_avg"]) for p in mine)
                opt = new
        masters = [opt.masters[p] for p in mine[:2]] + [mine[2]]
        worst = worst_of(worst, *(float((a - b).abs().max()) for a, b in zip(masters, ref)))
        opt.release_masters()
        assert all(p.dtype == torch.float32 for p in mine) and torch.equal(mine[0], masters[0])
    return worst


def reference_bf16_moments(params, grads_per_step, lr, betas, eps, wd):
    """AdamW in fp32 whose moments are rounded to bf16 (nearest even) after every step: what the kernel stores."""
    beta1, beta2 = betas
    m = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    v = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            mi = beta1 * m[i].float() + (1 - beta1) * g
            vi = beta2 * v[i].float() + (1 - beta2) * g * g
            p.mul_(1 - lr * wd)
            denom = vi.sqrt() / math.sqrt(1 - beta2 ** step) + eps
            p.sub_(lr / (1 - beta1 ** step) * mi / denom)
            m[i], v[i] = mi.to(torch.bfloat16), vi.to(torch.bfloat16)
    return m, v


def compare_bf16_moments(steps: int = 6) -> float:
    """moments_dtype=bfloat16: the parameters follow the bf16-moment reference, the moments are stored bf16 and
    equal the reference's bit for bit, and a checkpoint round trip through torch's AdamW (fp32 moments) comes
    back as bf16 without changing the trajectory. Returns the largest parameter difference to the reference."""
    mine, ref = _params()[:3], [p.detach().clone() for p in _params()[:3]]
    opt = TritonAdamW([{"params": mine, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95),
                      moments_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    grads_per_step = [[torch.randn(p.shape, generator=g) for p in mine] for _ in range(steps)]
    for step, grads in enumerate(grads_per_step):
        for p, gr in zip(mine, grads):
            p.grad = gr.clone()
        opt.step()
        if step == steps // 2:
            other = torch.optim.AdamW(mine, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            other.load_state_dict(opt.state_dict())
            assert all(other.state[p]["exp_avg"].dtype == torch.float32 for p in mine)  # torch casts to fp32
            opt = TritonAdamW([{"params": mine, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95),
                              moments_dtype=torch.bfloat16)
            opt.load_state_dict(other.state_dict())
    m, v = reference_bf16_moments(ref, grads_per_step, 1e-2, (0.9, 0.95), 1e-8, 0.1)
    for p, mr, vr in zip(mine, m, v):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["exp_avg"], mr) and torch.equal(opt.state[p]["exp_avg_sq"], vr)
    return worst_of(*(float((a - b).detach().abs().max()) for a, b in zip(mine, ref)))


def compare_grad_norm() -> float:
    """TritonAdamW.grad_norm (the kernel for contiguous fp32 / bf16 gradients, torch's norm for the rest) against
    the fp64 norm of everything, twice: the second call reuses the cached tables. Returns the relative error."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 1000, generator=g), torch.randn(5000, generator=g).bfloat16() * 3,
             torch.randn(11, generator=g).bfloat16(), torch.randn(7, 5, generator=g).t(),  # not contiguous
             torch.randn(4096, generator=g) * 1e-3]  # exactly two blocks: no masked one
    opt = TritonAdamW([torch.nn.Parameter(torch.zeros(1))])
    expected = float(torch.cat([t.double().flatten() for t in grads]).norm())
    worst = 0.0
    for _ in range(2):
        norm = opt.grad_norm(grads)
        assert norm.dtype == torch.float32 and norm.shape == ()
        worst = worst_of(worst, abs(float(norm) - expected) / expected)
    assert len([k for k in opt._tables if k[0] == "norm"]) == 2  # one launch each for fp32 and bf16
    return worst


def test_fallback_step_matches_torch_adamw():
    """No kernel for these tensors (CPU, no interpreter): torch's fused step, same numbers, same state."""
    assert compare_with_torch() < 1e-6


@requires_triton
def test_triton_kernel_matches_torch_adamw_under_the_interpreter():
    """The kernel on fp32 parameters, on bf16 parameters with fp32 masters, and with bf16 moments, against
    torch's AdamW (or, for bf16 moments, the same update with its moments rounded every step); and the
    gradient-norm kernel against the fp64 norm. One interpreter for the four comparisons."""
    diffs = max_diff_under_interpreter("test_adamw", ["compare_with_torch", "compare_masters_with_torch",
                                                      "compare_bf16_moments", "compare_grad_norm"])
    assert all(d < 1e-6 for d in diffs.values()), diffs


def test_masters_refuse_what_they_cannot_keep(monkeypatch):
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = TritonAdamW([p])
    if runtime.triton is None:
        with pytest.raises(RuntimeError, match="Triton"):
            opt.keep_fp32_masters([p])
        return
    monkeypatch.setattr(runtime, "INTERPRET", False)
    with pytest.raises(ValueError, match="CUDA parameter"):  # CPU tensors have no kernel outside the interpreter
        opt.keep_fp32_masters([p])
    assert p.dtype == torch.float32 and not opt.masters


@pytest.mark.skipif(not torch.cuda.is_available() or runtime.triton is None, reason="needs a GPU and Triton")
def test_released_masters_go_where_the_parameter_is_now():
    """Lightning's teardown moves the module to the CPU before on_fit_end releases the masters: each master must go
    to its parameter's device then, not back to the GPU (a model split over two devices failed the save after fit)."""
    stays, moves = (torch.nn.Parameter(torch.randn(4, 4, device="cuda")) for _ in range(2))
    values = [stays.detach().clone(), moves.detach().cpu()]
    opt = TritonAdamW([stays, moves])
    opt.keep_fp32_masters([stays, moves])
    moves.data = moves.data.cpu()  # what teardown's module.cpu() does to a parameter
    opt.release_masters()
    assert stays.dtype == moves.dtype == torch.float32 and not opt.masters
    assert stays.is_cuda and moves.device.type == "cpu"
    assert torch.equal(stays, values[0]) and torch.equal(moves, values[1])


def test_kernel_takes_only_what_it_computes_exactly(monkeypatch):
    monkeypatch.setattr(runtime, "INTERPRET", True)
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    assert TritonAdamW._kernel_takes(p) == (runtime.triton is not None)
    q = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    q.grad = torch.randn(4, 4, dtype=torch.float64)
    r = torch.nn.Parameter(torch.randn(4, 4).t())  # not contiguous
    r.grad = torch.randn(4, 4).t()
    assert not TritonAdamW._kernel_takes(q) and not TritonAdamW._kernel_takes(r)


def test_adamw_kind():
    assert adamw_kind("auto", on_cuda=False) == "plain"
    assert adamw_kind("auto", on_cuda=True) in ("triton", "fused")
    assert adamw_kind(True, on_cuda=False) == "fused" and adamw_kind("triton", True) == "triton"
    assert adamw_kind(False, on_cuda=True) == "plain"
    with pytest.raises(ValueError, match="optim.fused='apex'"):
        adamw_kind("apex", on_cuda=True)


def test_moments_dtype_setting():
    from deepseek_mini.optim.policy import moments_dtype

    assert moments_dtype("auto", "triton", (0.9, 0.95)) == torch.bfloat16
    assert moments_dtype("auto", "triton", (0.9, 0.999)) == torch.float32  # auto: only where bf16 is safe
    assert moments_dtype("auto", "plain", (0.9, 0.95)) == torch.float32
    assert moments_dtype("float32", "triton", (0.9, 0.95)) == torch.float32
    with pytest.raises(ValueError, match=r"optim.moments_dtype=bfloat16 needs optim.betas of at most 0.99"):
        moments_dtype("bfloat16", "triton", (0.9, 0.999))
    with pytest.raises(ValueError, match=r"optim.moments_dtype=bfloat16 needs the Triton AdamW"):
        moments_dtype("bfloat16", "fused", (0.9, 0.95))
    with pytest.raises(ValueError, match=r"optim.moments_dtype='fp8'"):
        moments_dtype("fp8", "triton", (0.9, 0.95))
    with pytest.raises(ValueError, match=r"at most 0.99"):
        TritonAdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 0.999), moments_dtype=torch.bfloat16)


def test_bf16_moments_only_in_the_kernel():
    """Tensors the kernel does not take (here: all of them, no interpreter) keep fp32 moments in torch's step,
    even when a checkpoint brought bf16 ones."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = TritonAdamW([p], lr=1e-2, betas=(0.9, 0.95), moments_dtype=torch.bfloat16)
    p.grad = torch.randn(8, 8)
    opt.step()
    if not TritonAdamW._kernel_takes(p):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].bfloat16()
        opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg_sq"].bfloat16()
        opt.step()
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_grad_norm_without_the_kernel_is_torchs():
    """CPU gradients outside the interpreter: the same fp32 norm through torch's multi-tensor norm."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 7, generator=g), torch.randn(5000, generator=g).bfloat16() * 3]
    expected = float(torch.cat([t.double().flatten() for t in grads]).norm())
    norm = TritonAdamW([torch.nn.Parameter(torch.zeros(1))]).grad_norm(grads)
    assert norm.dtype == torch.float32 and abs(float(norm) - expected) < 1e-5 * expected
