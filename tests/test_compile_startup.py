"""Cold start: time to the first optimizer step counts from the process launch (training/startup.py), and the
end-of-run summary prints it with its fit and compile parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deepseek_mini.training import startup
from deepseek_mini.training.callbacks import ThroughputMonitor
from deepseek_mini.training.summary import format_summary

STARTUP = Path(__file__).resolve().parents[1] / "deepseek_mini" / "training" / "startup.py"


def test_process_age_counts_from_the_launch():
    """A process that sleeps 1.5 s before asking is at least 1.5 s old (startup.py loaded alone: no torch import)."""
    code = ("import time, importlib.util as u; time.sleep(1.5); "
            f"spec = u.spec_from_file_location('startup', {str(STARTUP)!r}); m = u.module_from_spec(spec); "
            "spec.loader.exec_module(m); print(m.process_age())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 1.5 <= age < 30


@pytest.fixture
def fresh_clock(monkeypatch):
    monkeypatch.setattr(startup, "_jobs", 0)
    monkeypatch.setattr(startup, "_job_start", None)
    monkeypatch.setattr(startup, "_marks", {})
    monkeypatch.setattr(startup, "_graphs_base", {})
    return monkeypatch


def _first_step(monitor: ThroughputMonitor) -> None:
    trainer = SimpleNamespace(accumulate_grad_batches=1, global_step=1, world_size=1, loggers=[])
    module = SimpleNamespace(device=torch.device("cpu"))
    monitor.on_fit_start(trainer, module)
    monitor.on_train_batch_end(trainer, module, None, (torch.zeros(2, 4, dtype=torch.long),), 0)


def test_time_to_first_step_is_from_launch_not_from_fit(fresh_clock):
    fresh_clock.setattr(startup, "process_age", lambda: 100.0)  # launched 100 s before train() started
    startup.start_job()
    monitor = ThroughputMonitor()
    _first_step(monitor)
    assert monitor.time_to_first_step >= 100.0
    assert monitor.fit_to_first_step < 5.0 and monitor.compile_time is not None


def test_a_later_job_in_the_same_process_counts_from_its_own_start(fresh_clock):
    """A multirun's second job (same process) must not count the first job's time."""
    fresh_clock.setattr(startup, "process_age", lambda: 100.0)
    startup.start_job()
    startup.start_job()
    assert startup.seconds_since_start() < 5.0


def test_stage_seconds_are_each_stage_own_time_and_add_up(fresh_clock):
    """Each stage's seconds run from the end of the one before: with fit's part they sum to the first step's time."""
    fresh_clock.setattr(startup, "process_age", lambda: 10.0)
    origin = startup.start_job()
    clock = iter([origin + 12.0, origin + 12.5, origin + 15.0])
    fresh_clock.setattr(startup.time, "perf_counter", lambda: next(clock))
    for stage in ("data", "model", "validation"):
        startup.mark(stage)
    stages = startup.stage_seconds()
    assert list(stages) == ["launch", "data", "model", "validation"]
    assert stages["launch"] == pytest.approx(10.0, abs=0.05)  # the process's age when train() started
    assert (stages["data"], stages["model"], stages["validation"]) == (2.0, 0.5, 2.5)
    assert sum(stages.values()) == pytest.approx(15.0, abs=0.05)


def test_summary_prints_first_step_from_launch_with_its_parts():
    res = {"run_dir": "/runs/r1", "time_to_first_step_sec": 24.13, "fit_to_first_step_sec": 19.0,
           "compile_time_sec": 12.34, "wall_time_sec": 61.04}
    text = format_summary(res)
    assert "first step after 24.1 s from launch (fit 19.0 s, compiling 12.3 s), wall 1 min 1.0 s" in text
    eager = format_summary({**res, "compile_time_sec": 0.0})
    assert "(fit 19.0 s), wall" in eager  # nothing compiled: no compile part
    staged = format_summary({**res, "startup_sec": {"launch": 3.21, "data": 1.0, "model": 0.44, "validation": 0.5}})
    assert ("first step after 24.1 s from launch (start-up 3.2 s, data 1.0 s, model 0.4 s, validation 0.5 s, "
            "fit 19.0 s, compiling 12.3 s)") in staged


def test_summary_counts_the_graphs_compiled_for_the_first_step():
    res = {"run_dir": "/r", "time_to_first_step_sec": 24.13, "fit_to_first_step_sec": 19.0, "compile_time_sec": 4.0,
           "wall_time_sec": 61.04, "first_step_graphs": {"from_cache": 8, "compiled": 2}}
    assert "(fit 19.0 s, compiling 4.0 s for 10 graphs, 8 from the cache), wall" in format_summary(res)
    eager = {**res, "compile_time_sec": 0.0, "first_step_graphs": {"from_cache": 0, "compiled": 0}}
    assert "(fit 19.0 s), wall" in format_summary(eager)


def test_graph_counts_are_those_of_this_job(fresh_clock, monkeypatch):
    """results.json's first_step_graphs: Inductor's cache hits, and its misses plus the graphs it cannot cache, counted
    from this job's start (a multirun's earlier jobs in the same process are not in them)."""
    from torch._dynamo.utils import counters

    monkeypatch.setitem(counters, "inductor", counters["inductor"].copy())
    counters["inductor"]["fxgraph_cache_miss"] += 5  # an earlier job's
    startup.start_job()
    counters["inductor"]["fxgraph_cache_hit"] += 8
    counters["inductor"]["fxgraph_cache_miss"] += 1
    counters["inductor"]["fxgraph_cache_bypass"] += 1
    assert startup.graph_counts() == {"from_cache": 8, "compiled": 2}


def test_compile_workers_start_early_only_where_triton_compiles_for_a_gpu(monkeypatch):
    """train() starts Inductor's compile workers before data preparation (training/compile.start_compile_workers):
    only with a CUDA GPU (on CPU Inductor compiles C++ without that pool), and a failing start never ends a run."""
    import torch._inductor.async_compile as async_compile

    from deepseek_mini.training.compile import start_compile_workers

    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append("warm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert start_compile_workers() is False and calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert start_compile_workers() is True and calls == ["warm"]

    def broken():
        raise RuntimeError("no pool in a daemonic process")

    monkeypatch.setattr(async_compile, "maybe_warm_pool", broken)
    assert start_compile_workers() is False


# ---------------------------------------------------------------- Triton kernels compiled ahead of their first launch
def _variant(kernel, args: tuple, kwargs: dict) -> tuple:
    """What Triton compiles a kernel variant for, from a launch's or a warm-up's arguments: a tensor by its dtype
    (a warm-up passes the dtype itself), an int by its value unless the kernel does not specialize on it, a float
    as a float; the keyword arguments (constexprs, num_warps) by value."""
    out = []
    for param, arg in zip(kernel.params, args):
        if isinstance(arg, torch.Tensor):
            arg = arg.dtype
        elif isinstance(arg, int) and not isinstance(arg, bool):
            arg = "int" if param.do_not_specialize else arg
        elif isinstance(arg, float):
            arg = "float"
        out.append((param.name, arg))
    assert len(args) + len(set(kwargs) & {p.name for p in kernel.params}) == len(kernel.params)  # every argument
    return kernel.fn.__name__, tuple(out), tuple(sorted(kwargs.items()))


@pytest.fixture
def recorded_launches(monkeypatch):
    """runtime.launch recorded instead of run (CPU tensors take the kernels' paths: INTERPRET on): {"launch":
    variants launched, "warmup": variants a compile_ahead job compiles}. Launches whose outputs the test goes on
    to use get the reference results written in (the router's top-k, the SwiGLU backward, the norm's partial sums)."""
    from deepseek_mini.kernels import routing, runtime, swiglu

    if runtime.triton is None:
        pytest.skip("Triton is not installed (CPU-only torch)")
    monkeypatch.setattr(runtime, "INTERPRET", True)
    seen = {"launch": set(), "warmup": set()}

    def launch(kernel, grid, *args, warmup=False, **kwargs):
        seen["warmup" if warmup else "launch"].add(_variant(kernel, args, kwargs))
        if warmup:
            return
        if kernel is routing._top_k_rows:
            select, ids, k = args[0], args[1], kwargs["K"]
            ids.copy_(select.sort(dim=-1, descending=True, stable=True).indices[:, :k])
        elif kernel is swiglu._swiglu_backward:
            h, grad_a, w, grad_h, grad_w = (t.float() for t in args[:5])
            g, u = h.chunk(2, dim=-1)
            sig = torch.sigmoid(g)
            args[4].copy_((grad_a * g * sig * u).sum(-1))
            grad_a = grad_a * w[:, None]
            args[3].copy_(torch.cat([grad_a * u * sig * (1 + g * (1 - sig)), grad_a * g * sig], dim=-1))
        elif kernel.fn.__name__ == "_sum_squares_kernel":
            args[3].zero_()

    monkeypatch.setattr(runtime, "launch", launch)
    monkeypatch.setattr(runtime, "compiles", lambda: True)
    # compile_ahead's jobs run at once, in this thread (their threads and CUDA devices are tested below)
    monkeypatch.setattr(runtime, "compile_ahead", lambda jobs, device=None: [job() for _, job in jobs.values()])
    return seen


def test_model_kernels_compiled_ahead_are_the_variants_a_training_step_launches(recorded_launches):
    """training_kernels(cfg, bf16) must compile exactly what the model's forward and backward launch with 16-bit
    activations (the router's top-k on fp32 scores, the SwiGLU backward with fp32 gates), or the first step
    compiles again what was compiled ahead. Checked at two shapes: E, K and I are compiled in, the number of
    tokens is not."""
    from deepseek_mini.config import ModelConfig
    from deepseek_mini.kernels import runtime
    from deepseek_mini.model import DeepSeekV2
    from deepseek_mini.model.moe import training_kernels
    from tests.model_helpers import SMALL_MODEL

    def tiny_config(**fields):
        return ModelConfig(**{**SMALL_MODEL, **fields})

    for fields, tokens in (({}, (2, 16)), ({"n_routed_experts": 16, "num_experts_per_tok": 3,
                                            "moe_intermediate_size": 48}, (3, 7))):
        recorded_launches["launch"].clear(), recorded_launches["warmup"].clear()
        cfg = tiny_config(**fields)
        model = DeepSeekV2(cfg).to(torch.bfloat16)  # bf16 activations on the CPU, as autocast gives on a GPU
        x = torch.randint(0, cfg.vocab_size, tokens)
        model(x, x).loss.backward()
        runtime.compile_ahead(training_kernels(cfg, torch.bfloat16))
        names = {v[0] for v in recorded_launches["launch"]}
        assert names == {"_top_k_rows", "_swiglu_backward"}, names
        assert recorded_launches["warmup"] == recorded_launches["launch"]
    assert training_kernels(tiny_config(n_routed_experts=None), torch.bfloat16) == {}
    assert set(training_kernels(tiny_config(), torch.float32)) == {f"route_top_k E={tiny_config().n_routed_experts} "
                                                                  f"K={tiny_config().num_experts_per_tok}"}


@pytest.mark.parametrize("scaled", [True, False])
def test_optimizer_kernels_compiled_ahead_are_the_variants_its_steps_launch(recorded_launches, scaled):
    """TritonAdamW.compile_ahead must compile the step for each kind of tensor it updates (fp32 parameters, bf16 ones
    with fp32 masters, bf16 moments) and the gradient norm per gradient dtype, with or without a grad_scale."""
    from deepseek_mini.optim.adamw import TritonAdamW
    from deepseek_mini.optim.clip import clip_in_fused_step, grad_norm

    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 5000, 64, 4100)]
    opt = TritonAdamW(params, betas=(0.9, 0.95), moments_dtype=torch.bfloat16)
    opt.keep_fp32_masters(params[2:])
    opt.compile_ahead(scaled=scaled)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype)
    if scaled:
        clip_in_fused_step(opt, params, 1.0)
    else:
        grad_norm(opt, [p.grad for p in params])
    opt.step()
    names = {v[0] for v in recorded_launches["launch"]}
    assert names == {"_adamw_kernel", "_sum_squares_kernel"}, names
    assert recorded_launches["warmup"] == recorded_launches["launch"]


def test_compile_ahead_runs_each_job_once_in_the_background_and_a_launch_waits_for_it(monkeypatch):
    """A job runs in another thread; a name started before is not started again; a failing job ends quietly (the
    launch compiles and raises for itself); a launch of a kernel still compiling ahead waits for that compilation."""
    import contextlib
    import threading
    import time

    from deepseek_mini.kernels import runtime

    monkeypatch.setattr(runtime, "compiles", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(runtime, "_started", {})
    monkeypatch.setattr(runtime, "_pending", {})
    threads, order = [], []

    def job():
        threads.append(threading.current_thread())
        time.sleep(0.3)
        order.append("compiled")

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: order.append("launched")

    kernel = Kernel()
    assert len(runtime.compile_ahead({"k variant": (kernel, job)}, device=0)) == 1
    assert runtime.compile_ahead({"k variant": (kernel, job)}, device=0) == []  # started already
    runtime.launch(kernel, (1,))
    assert order == ["compiled", "launched"]
    assert threads and threads[0] is not threading.main_thread()

    def broken():
        raise RuntimeError("no ptxas")

    [future] = runtime.compile_ahead({"broken": (kernel, broken)}, device=0)
    assert future.result(timeout=10) is None
    runtime.launch(kernel, (1,))  # nothing left to wait for
    assert order == ["compiled", "launched", "launched"]
    monkeypatch.setattr(runtime, "compiles", lambda: False)  # CPU, interpreter: nothing is compiled ahead
    assert runtime.compile_ahead({"other": (kernel, job)}, device=0) == []
    assert runtime.compile_ahead({"other": (kernel, job)}, device=torch.device("cpu")) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles for a GPU only")
def test_on_a_gpu_the_first_launches_use_the_kernels_compiled_ahead(monkeypatch):
    """The real thing: after the ahead-of-time compilations finish, a bf16-autocast forward, backward and clipped
    AdamW step with fp32 masters compile no kernel variant of their own (Triton's per-kernel caches do not grow)."""
    from deepseek_mini.config import ModelConfig
    from deepseek_mini.kernels import adamw as adamw_kernels
    from deepseek_mini.kernels import routing, runtime, swiglu
    from deepseek_mini.model import DeepSeekV2
    from deepseek_mini.model.moe import training_kernels
    from deepseek_mini.optim.adamw import TritonAdamW
    from deepseek_mini.optim.clip import clip_in_fused_step
    from deepseek_mini.optim.precision import bf16_weight_parameters
    from tests.model_helpers import SMALL_MODEL

    if runtime.triton is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(runtime, "_started", {})
    monkeypatch.setattr(runtime, "_pending", {})
    kernels = [routing._top_k_rows, swiglu._swiglu_backward, adamw_kernels._adamw_kernel,
               adamw_kernels._sum_squares_kernel]
    for k in kernels:  # compiled by an earlier test: start from empty in-memory caches (Triton's disk cache stays)
        k.device_caches.clear()
    device = torch.cuda.current_device()
    cfg = ModelConfig(**{**SMALL_MODEL, "n_routed_experts": 24, "num_experts_per_tok": 3, "moe_intermediate_size": 40})
    model = DeepSeekV2(cfg).cuda()
    opt = TritonAdamW(model.parameters(), betas=(0.9, 0.95), moments_dtype=torch.bfloat16)
    opt.keep_fp32_masters(bf16_weight_parameters(model))
    runtime.compile_ahead(training_kernels(cfg, torch.bfloat16), device)
    opt.compile_ahead(scaled=True)
    for future in runtime._started.values():
        future.result(timeout=300)
    compiled = {k.fn.__name__: len(k.device_caches[device][0]) for k in kernels}
    assert all(n >= 1 for n in compiled.values()), compiled
    x = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, x).loss
    loss.backward()
    clip_in_fused_step(opt, list(model.parameters()), 1.0)
    opt.step()
    torch.cuda.synchronize()
    assert {k.fn.__name__: len(k.device_caches[device][0]) for k in kernels} == compiled


def test_eager_routing_takes_the_sort_while_its_kernel_compiles_ahead(monkeypatch):
    """The validation before fit runs eagerly while the top-k kernel may still be compiling in the background: the
    router then sorts (the same experts in the same order) instead of waiting; once compiled, the kernel."""
    from concurrent.futures import Future

    from deepseek_mini.kernels import routing, runtime

    if runtime.triton is None:
        pytest.skip("Triton is not installed (CPU-only torch)")
    monkeypatch.setattr(runtime, "INTERPRET", True)
    monkeypatch.setattr(runtime, "_pending", {})
    select = torch.rand(8, 16)
    assert routing.available(select, 4)
    running = Future()
    runtime._pending[routing._top_k_rows] = [running]
    assert not routing.available(select, 4)
    running.set_result(None)
    assert routing.available(select, 4)


def test_kernels_compile_from_the_start_only_for_a_run_on_one_gpu(monkeypatch):
    """train() starts the model's kernel compilations before the data for a one-GPU run, on that GPU; other runs
    (CPU, several GPUs or nodes) leave them to configure_optimizers, where each rank knows its device."""
    from deepseek_mini.training import run_config

    monkeypatch.setattr(run_config, "_visible_gpus", lambda: 4)

    def settings(**kw):
        return run_config.TrainerSettings(max_steps=10, val_check_interval=5, **kw)

    assert settings(accelerator="gpu", devices=1).single_gpu == 0
    assert settings(accelerator="gpu", devices=[2]).single_gpu == 2
    assert settings(accelerator="auto", devices=1).single_gpu == 0
    assert settings(accelerator="gpu", devices=2).single_gpu is None
    assert settings(accelerator="gpu", devices=[0, 1]).single_gpu is None
    assert settings(accelerator="gpu", devices="auto").single_gpu is None  # all four
    assert settings(accelerator="gpu", devices=1, num_nodes=2).single_gpu is None
    assert settings(accelerator="cpu", devices=1).single_gpu is None
    monkeypatch.setattr(run_config, "_visible_gpus", lambda: 1)
    assert settings(accelerator="gpu", devices=-1).single_gpu == 0


def test_startup_profile_says_where_each_stage_went(tmp_path, cache_dir):
    """scripts/bench/startup_profile.py on a tiny CPU run: a section per stage of results.json (start-up, data,
    model, validation, fit to the first step) whose samples cover the stage's wall time, naming our functions."""
    import gzip
    import json

    from tests.conftest import TINY_OVERRIDES, run_cli

    out, run = tmp_path / "prof", tmp_path / "run"
    proc = run_cli("scripts/bench/startup_profile.py", "--out", str(out), "--", *TINY_OVERRIDES, "trainer.max_steps=1",
                   "logger=none", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}")
    res = json.loads((run / "results.json").read_text())
    summary = (out / "summary.txt").read_text()
    assert summary.strip() in proc.stdout
    for stage, secs in [*res["startup_sec"].items(), ("fit, to the first step", res["fit_to_first_step_sec"])]:
        header = next(line for line in summary.splitlines() if line.startswith(f"== {stage} ("))
        sampled = float(header.rsplit(": ", 1)[1].split(" s sampled")[0])
        assert sampled >= 0.6 * secs - 0.05, (stage, secs, header)  # the sampler kept up with the wall clock
    assert "deepseek_mini/training/module.py:validation_step" in summary or "deepseek_mini/model/" in summary
    data = json.load(gzip.open(out / "samples.json.gz", "rt"))
    assert data["samples"] and all(0 <= i < len(data["stacks"]) for _, _, i in data["samples"])
