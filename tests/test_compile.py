"""Regional compilation (training/compile.py): equal to eager, one graph per block kind, the compile key's values.

Dynamo + AOTAutograd with eager kernels (backend="aot_eager") keep these fast on a 2-core CPU: Inductor's C++
compilation would take minutes and adds nothing to what is checked here (which graphs exist, what they compute).
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from conftest import needs_trusted_cpu_compile
from model_helpers import SMALL_MODEL
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from deepseek_mini.config import ModelConfig
from deepseek_mini.model.moe import MoE
from deepseek_mini.model.transformer import Block, DeepSeekV2
from deepseek_mini.training.compile import CompileSpec, GraphedRegional, compile_model, compile_regions, parse_compile
from deepseek_mini.training.module import LitDeepSeek
from deepseek_mini.training.run_config import check_compile

# one dense layer and three MoE layers: two block kinds, the MoE kind repeated
FOUR_LAYERS = {**SMALL_MODEL, "num_hidden_layers": 4}


def _step(fwd, model, x):
    model.zero_grad(set_to_none=True)
    out = fwd(x, labels=x, return_logits=False)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@needs_trusted_cpu_compile
def test_regional_forward_backward_equals_eager_with_one_graph_per_block_kind(fresh_dynamo):
    torch.manual_seed(0)
    model = DeepSeekV2(ModelConfig.from_dict(FOUR_LAYERS))
    x = torch.randint(0, FOUR_LAYERS["vocab_size"], (2, 16))
    loss_e, grads_e = _step(model, model, x)

    regional = compile_regions(model, backend="aot_eager", dynamic=False)
    assert [name for m, name in regional.regions if isinstance(m, Block)] == ["attention", "feed_forward"] * 4
    loss_c, grads_c = _step(regional, model, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and any("experts" in n for n in grads_c)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)

    # four blocks' halves + the embedding + the final norm + the head's loss, six graphs: the attention (shared by
    # the dense and the MoE layers), the dense feed-forward, the MoE feed-forward (shared by its three layers),
    # the embedding, the norm and the loss (its autograd.Function traced whole: no graph break). Whole blocks as
    # regions would show 7 (the attention inside each kind), a per-layer specialisation 11.
    assert counters["stats"]["unique_graphs"] == 6, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(_debug_get_cache_entry_list(Block.attention.__code__)) == 1  # one attention graph for both kinds
    assert len(_debug_get_cache_entry_list(Block.feed_forward.__code__)) == 2  # dense and MoE
    _step(regional, model, x)  # a second step reuses them: no recompilation
    assert counters["stats"]["unique_graphs"] == 6, dict(counters["stats"])


def test_regional_compile_is_off_outside_the_call(fresh_dynamo):
    """Only the training/validation forward is compiled: generation (the sample callback) runs the eager model."""
    model = DeepSeekV2(ModelConfig.from_dict(SMALL_MODEL))
    regional = compile_regions(model, backend="eager")
    seen = []

    def spy(m, args):
        seen.append([name in m.__dict__ for owner, name in regional.regions if owner is m])

    block, norm = regional.regions[0][0], model.model.norm
    handles = [m.register_forward_pre_hook(spy) for m in (block, norm)]
    x = torch.randint(0, SMALL_MODEL["vocab_size"], (1, 8))
    model(x)
    assert seen == [[False, False], [False]]  # a Block's two halves and the norm's forward: the classes' own
    model.generate(x, 2)
    assert counters["stats"]["unique_graphs"] == 0
    seen.clear()
    regional(x, labels=x, return_logits=False)
    assert seen == [[True, True], [True]]  # inside the compiled call, the compiled ones
    assert counters["stats"]["unique_graphs"] > 0
    assert not any(name in m.__dict__ for m, name in regional.regions)  # and after it, the classes' again
    for h in handles:
        h.remove()


@pytest.mark.parametrize(("value", "canonical"), [
    (False, None), ("false", None), (None, None),
    (True, "regional"), ("true", "regional"), ("regional", "regional"), ("full", "full"),
    ("reduce-overhead", "full:reduce-overhead"),  # a bare mode keeps its old meaning (the whole model)
    ("default", "full"), ("regional:reduce-overhead", "regional:reduce-overhead"),
    ("full:reduce-overhead", "full:reduce-overhead"), ("regional:max-autotune-no-cudagraphs",
                                                      "regional:max-autotune-no-cudagraphs"),
])
def test_compile_values(value, canonical):
    assert check_compile(value) == canonical
    spec = parse_compile(value)
    assert (str(spec) if spec else None) == canonical


@pytest.mark.parametrize("value", ["fast", "full:fast", "partial", "regional:", ":default", "reduce-overhead:full"])
def test_compile_rejects_unknown_values(value):
    with pytest.raises(ValueError, match=f"compile={value!r}: use false, true, regional or full"):
        parse_compile(value)


def test_lit_module_compiles_the_configured_scope():
    regional = LitDeepSeek(SMALL_MODEL, compile="regional:reduce-overhead")
    regional.configure_model()
    assert regional.compile == CompileSpec("regional", "reduce-overhead") and regional._cudagraphs
    assert regional._forward.model is regional.model  # RegionalCompile around the same model
    full = LitDeepSeek(SMALL_MODEL, compile="full")
    full.configure_model()
    assert full._forward is not full.model and not hasattr(full._forward, "regions") and not full._cudagraphs
    for module in (regional, full):
        assert all(k.startswith("model.") and "_orig_mod" not in k for k in module.state_dict())


def test_regional_cuda_graphs_compile_the_regions_without_cudagraph_trees(monkeypatch):
    """compile=regional:reduce-overhead graphs the whole training step itself (GraphedRegional): its regions are
    compiled without torch.compile's own CUDA graphs, which would record one graph per block inside it."""
    from deepseek_mini.training import compile as compile_mod

    modes = []
    monkeypatch.setattr(compile_mod.torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or fn)
    model = DeepSeekV2(ModelConfig.from_dict(SMALL_MODEL))
    for value, mode in (("regional:reduce-overhead", None), ("regional:max-autotune", "max-autotune-no-cudagraphs")):
        modes.clear()
        graphed = compile_model(model, parse_compile(value))
        assert isinstance(graphed, GraphedRegional) and graphed.regional.regions
        assert set(modes) == {mode}, (value, modes)
    # off CUDA (and outside training) it is the regionally compiled model
    x = torch.randint(0, SMALL_MODEL["vocab_size"], (2, 8))
    out = graphed(x, labels=x, return_logits=False)
    assert graphed.graphed is None and torch.isfinite(out.loss)


def test_graphed_regional_wraps_the_recording_right(fresh_dynamo, monkeypatch):
    """GraphedRegional's own logic on CPU, with a stand-in for torch.cuda.make_graphed_callables that does what it
    does around the graphs: runs the module's forward and backward three times (the warm-up), then returns the
    module. The outputs come back as the same ModelOutput (MTP losses, aux losses, router statistics), the warm-up's
    expert counts are undone (one training call counts its tokens once), a batch of another shape and the eval
    forward bypass the recording, and reset() drops it."""
    calls = []

    kept = []  # what make_graphed_callables keeps: the recorded forward's outputs (its output buffers)

    def stand_in(module, sample_args, num_warmup_iters=3, allow_unused_input=False):
        params = [p for p in module.parameters() if p.requires_grad]
        for _ in range(num_warmup_iters + 1):  # the warm-up asked for, then the "recording"
            outs = [o for o in torch.utils._pytree.tree_leaves(module(*sample_args)) if o.requires_grad]
            torch.autograd.grad(outs, params, [torch.ones_like(o) for o in outs], allow_unused=allow_unused_input)
        calls.append((tuple(a.shape for a in sample_args), num_warmup_iters))
        kept[:] = outs
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", stand_in)
    cfg = {**FOUR_LAYERS, "bias_update_speed": 0.01, "aux_loss_alpha": 0.01, "num_nextn_predict_layers": 1}
    torch.manual_seed(0)
    model = DeepSeekV2(ModelConfig.from_dict(cfg))
    ref = copy.deepcopy(model)
    graphed = GraphedRegional(model, compile_regions(model, backend="eager", dynamic=False))
    graphed.device_type = "cpu"
    x = torch.randint(0, cfg["vocab_size"], (2, 16))
    out, want = graphed(x, labels=x, return_logits=False), ref(x, labels=x, return_logits=False)
    # GraphedRegional warms up itself (WARMUP_STEPS forwards + backwards, each graph freed before the next)
    assert calls == [(((2, 16), (2, 16)), 0)] and graphed.shapes == ((2, 16), (2, 16))
    # the recording's autograd graph (and its gradient accumulators, made on the recording's stream) is let go
    assert kept and all(o.grad_fn is None for o in kept)
    assert out.logits is None and len(out.mtp_losses) == 1 and out.aux_losses.keys() == want.aux_losses.keys()
    for a, b in ((out.loss, want.loss), (out.aux_loss, want.aux_loss), (out.mtp_loss, want.mtp_loss)):
        torch.testing.assert_close(a, b)
    for a, b in zip(out.router_stats, want.router_stats, strict=True):
        torch.testing.assert_close(a["tokens_per_expert"], b["tokens_per_expert"])
    counts = [(m.gate.tokens_per_expert, r.gate.tokens_per_expert) for m, r in zip(model.modules(), ref.modules())
              if isinstance(m, MoE)]
    assert counts and all(torch.equal(a, b) and a.sum() > 0 for a, b in counts)  # one call's tokens, not five
    graphed(x[:, :8], labels=x[:, :8], return_logits=False)  # another shape: not recorded again
    with torch.no_grad():
        graphed(x, labels=x, return_logits=False)  # no gradients (validation): the regional model
    assert len(calls) == 1
    graphed.reset()
    graphed(x, labels=x, return_logits=False)
    assert len(calls) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_regional_training_equals_the_ungraphed_steps_cuda(fresh_dynamo):
    """Three AdamW steps through the recorded whole-model graphs against the same regional kernels called
    directly: each step's new batch reaches the graph, the losses, aux losses, router counts and every gradient
    match, the warm-up before recording leaves the router's expert counts (the bias update's input) as they
    were, a batch of another shape runs ungraphed, and no gradient is handed from one stream to another (torch's
    "AccumulateGrad node's stream does not match" warning, in the recording or the steps)."""
    cfg = {**FOUR_LAYERS, "bias_update_speed": 0.01, "aux_loss_alpha": 0.01}
    torch.manual_seed(0)
    model = DeepSeekV2(ModelConfig.from_dict(cfg)).cuda()
    ref = copy.deepcopy(model)
    graphed = GraphedRegional(model, compile_regions(model, dynamic=False))
    regional = compile_regions(ref, dynamic=False)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref)]
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (once per code location otherwise)
        _train_side_by_side(graphed, regional, model, ref, opts, cfg, losses)
    # no gradient handed across streams, in the recording or the steps after it (GraphedRegional._warm_up,
    # _TrainingForward.release_autograd_graph)
    assert not [w for w in caught if "AccumulateGrad node's stream" in str(w.message)]
    assert len(set(losses)) == 4  # each batch reached the graph (not the recorded one replayed)


def _train_side_by_side(graphed, regional, model, ref, opts, cfg, losses):
    for step in range(4):
        x = torch.randint(0, cfg["vocab_size"], (2, 16 if step < 3 else 8), device="cuda")
        outs = []
        for fwd, m, opt in zip((graphed, regional), (model, ref), opts):
            with torch.autocast("cuda", torch.bfloat16):
                out = fwd(x, labels=x, return_logits=False)
            (out.loss + out.aux_loss).backward()
            outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
                         [b.clone() for b in m.buffers()]))
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.update_expert_bias()
        (g, g_grads, g_bufs), (r, r_grads, r_bufs) = outs
        assert (graphed.graphed is not None) and graphed.shapes == ((2, 16), (2, 16))
        torch.testing.assert_close(g.loss, r.loss, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(g.aux_loss, r.aux_loss, rtol=1e-4, atol=1e-6)
        for gs, rs in zip(g.router_stats, r.router_stats):
            torch.testing.assert_close(gs["tokens_per_expert"], rs["tokens_per_expert"])
        assert g_grads.keys() == r_grads.keys() and len(g_grads) == len(list(model.parameters()))
        for name in r_grads:
            torch.testing.assert_close(g_grads[name], r_grads[name], rtol=2e-2, atol=1e-4, msg=name)
        for gb, rb in zip(g_bufs, r_bufs):
            torch.testing.assert_close(gb, rb)
        losses.append(float(g.loss))


def test_whole_model_cuda_graphs_compile_as_one_graph_under_ddp(monkeypatch):
    """Under DDP, dynamo cuts a compiled model at the gradient buckets unless optimize_ddp is off; with CUDA
    graphs that would make one graph per bucket (the per-block shape that trained nothing on two H200s). The
    compiled call of `full:reduce-overhead` runs with optimize_ddp=False; `full` without graphs keeps the
    bucket split (its all-reduces overlap the backward)."""
    import torch._dynamo.config as dynamo_config

    from deepseek_mini.training import compile as compile_mod

    seen = []

    def fake_compile(model, **kwargs):
        return lambda *a, **k: seen.append((kwargs.get("mode"), dynamo_config.optimize_ddp))

    monkeypatch.setattr(compile_mod.torch, "compile", fake_compile)
    model = torch.nn.Linear(2, 2)
    compile_mod.compile_model(model, parse_compile("full:reduce-overhead"))()
    compile_mod.compile_model(model, parse_compile("full"))()
    assert seen == [("reduce-overhead", False), (None, True)]
    assert dynamo_config.optimize_ddp is True  # patched for the call only


@pytest.mark.parametrize("value", ["regional:fast", "partial"])
def test_bad_compile_value_is_one_line_error_before_data_prep(value, tmp_path, capsys, monkeypatch):
    """`python train.py compile=<bad>` (in process, the console-script entry): one line, exit status 2."""
    import sys

    from deepseek_mini import cli

    cache = tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", ["train.py", f"compile={value}", f"paths.cache_dir={cache}",
                                      f"hydra.run.dir={tmp_path / 'r'}", "logger=none"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.train_main()
    out = capsys.readouterr()
    text = out.out + out.err
    assert exit_.value.code == 2 and "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: compile='{value}': use false, true, regional or full")
    assert not cache.exists()


@pytest.mark.parametrize(("version", "refused"), [("2.11.0+cu130", True), ("2.12.1", True), ("2.13.0+cpu", False),
                                                  ("2.14.1", False)])
def test_a_compiled_cpu_step_is_refused_on_a_torch_that_gets_its_gradients_wrong(version, refused, tmp_path,
                                                                                  monkeypatch):
    """torch 2.11's compiled CPU step gave the routed experts wrong gradients (the loss exact): a run there would
    train silently wrong, so compile on the CPU is refused below the first torch verified right, in one line; on a
    GPU (the real grouped_mm) and uncompiled it goes on."""
    from conftest import run_config_of

    from deepseek_mini.config import ConfigError
    from deepseek_mini.training import compile as compile_mod

    real = compile_mod.cpu_compile_problem
    monkeypatch.setattr(compile_mod, "cpu_compile_problem", lambda: real(version))
    assert run_config_of(tmp_path, "trainer=cpu", "compile=null").compile is None
    if refused:
        with pytest.raises(ConfigError, match=rf"^compile='regional': torch {re.escape(version)} computes wrong "
                                              r"gradients for the routed experts in a compiled CPU step \(verified "
                                              r"right from torch 2.13\); use compile=null on the CPU"):
            run_config_of(tmp_path, "trainer=cpu", "compile=regional")
    else:
        assert run_config_of(tmp_path, "trainer=cpu", "compile=regional").compile == "regional"
    assert not (tmp_path / "run").exists()
