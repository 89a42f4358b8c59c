"""torch.compile for training: what is compiled (scope) and how (mode), from the config's one `compile` key.

    compile=false                    eager
    compile=true | regional          each transformer block compiled once per block kind (the default scope)
    compile=full                     the whole model as one graph
    compile=<mode>                   the whole model with a torch.compile mode (reduce-overhead = + CUDA graphs),
                                     what a bare mode has always meant here (configs/experiment/small_gpu.yaml)
    compile=<scope>:<mode>           both, e.g. full:reduce-overhead, regional:max-autotune-no-cudagraphs

Regional compilation (PyTorch's recipe "Reducing torch.compile cold start compilation time with regional
compilation", and torchtitan's apply_compile) compiles the repeated Block instead of the whole model. Dynamo
treats a module's parameters and buffers as graph inputs (`inline_inbuilt_nn_modules`, always on since torch
2.5), so the 12 blocks of `small` run two graphs, one per block kind: the dense first layer and the MoE
layers differ in `Block.is_moe` and their submodules, which dynamo guards on. A full compile traces and
optimises all 12 blocks unrolled, which is why a cold `small_gpu` run paid about two minutes before its first
step. Outside the blocks the embedding lookup and the fused LM-head loss (model/loss.py, an autograd Function)
stay eager; the final RMSNorm is compiled as a third region.

The blocks are compiled only while LitDeepSeek's own forward runs (`RegionalCompile.__call__` sets each
region's `_compiled_call_impl`, which nn.Module.__call__ dispatches to, and clears it again): everything else
that calls the model in the training process (the sample-generation callback, decoding with a KV cache) runs
eager, as it does next to a fully compiled forward. Compiling `forward` itself rather than `_call_impl` keeps
each region kind's cache entries on its own code object (Block.forward, RMSNorm.forward), so training, eval
mode and a short last validation batch stay within dynamo's recompile limit per code object.

Not used: torch.compiler.nested_compile_region on Block.forward (a whole-model graph that compiles the
repeated block once, keeping whole-model CUDA graphs). On torch 2.13 (CPU, 2026-11-30), a cold full compile of a
12-layer `small`-structured model (narrow dims): 194 s plain, 92 s with it, same loss, but the last block's
parameter gradients ~100% wrong. The trigger, reduced: blocks in the region followed by a norm and a linear head;
correct under backend="aot_eager", and correct with torch._inductor.config.allow_buffer_reuse = False (an Inductor
buffer-reuse bug around the region). With that setting: 101 s, gradients equal to eager. On the GPU image's torch
2.11 (H200, 2026-11-30) the same code does not compile: dynamo raises "KeyError: example_value" in
are_same_graph_modules while deduplicating the region's subgraphs. Worth retrying on a newer torch.

CUDA graphs with regional compilation (regional:reduce-overhead) parse here but the run config refuses them
(training/run_config.check_cuda_graphs_placement): on two H200s under DDP (torch 2.11) they ran 1.4x faster than
plain regional compilation and trained nothing, the gradient norm inf from step 19 on, with torch warning that
the AccumulateGrad node's stream did not match that of the graph that produced the gradient. On one H200 they
trained right and cut the cold start (57.6 s to the first step against 95 s) but ran 14% slower than the
whole-model graph (run_config.check_cuda_graphs_placement). A bare CUDA-graph mode keeps its old meaning
(full). The whole model with CUDA graphs trained right on one GPU and, compiled as one graph (OneGraphUnderDDP
below), under DDP on two H200s (1.47x one GPU, the all-reduce not overlapped;
docs/benchmarks.md), and under expert parallelism with the padded dispatch, whose all-to-alls run inside the
graphs (0.93x DDP there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("regional", "full")
DEFAULT_SCOPE = "regional"  # what compile=true means
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_OFF = ("false", "none", "off", "")


@dataclass(frozen=True)
class CompileSpec:
    scope: str  # regional | full
    mode: str  # a torch.compile mode name; "default" = torch.compile(mode=None)

    @property
    def cudagraphs(self) -> bool:
        return self.mode in CUDA_GRAPH_MODES

    def __str__(self) -> str:  # the canonical spelling: what the run records and the console line shows
        return self.scope if self.mode == "default" else f"{self.scope}:{self.mode}"


def parse_compile(value: bool | str | None) -> CompileSpec | None:
    """`compile` as the config gives it -> CompileSpec, or None for off. ValueError names the accepted values."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in _OFF):
        return None
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return CompileSpec(DEFAULT_SCOPE, "default")
    if isinstance(value, str):
        if ":" in value:
            scope, _, mode = value.partition(":")
        elif value in COMPILE_SCOPES:
            scope, mode = value, "default"
        else:  # a bare mode, as `compile: reduce-overhead` has always been written: the whole model, as before
            scope, mode = "full", value
        if scope in COMPILE_SCOPES and mode in COMPILE_MODES:
            return CompileSpec(scope, mode)
    raise ValueError(f"compile={value!r}: use false, true, {' or '.join(COMPILE_SCOPES)}, a torch.compile mode "
                     f"({', '.join(COMPILE_MODES)}) or <scope>:<mode>")


def compile_regions_of(model: nn.Module) -> list[nn.Module]:
    """The modules regional compilation compiles: every transformer Block and the final norm."""
    from deepseek_mini.model.transformer import Block

    regions = [m for m in model.modules() if isinstance(m, Block)]
    norm = getattr(getattr(model, "model", None), "norm", None)
    return regions + ([norm] if isinstance(norm, nn.Module) else [])


class RegionalCompile:
    """Calls `model` with its blocks (and final norm) running through torch.compile'd forwards."""

    def __init__(self, model: nn.Module, **compile_kwargs):
        self.model = model
        self.regions = compile_regions_of(model)
        # one torch.compile per region object, but dynamo caches per code object: every Block shares
        # Block.forward's graphs (guarded on the block kind, train/eval and shapes), not one per layer
        self.compiled = [torch.compile(m.forward, **compile_kwargs) for m in self.regions]

    def __call__(self, *args, **kwargs):
        for m, fn in zip(self.regions, self.compiled):
            object.__setattr__(m, "_compiled_call_impl", fn)
        try:
            return self.model(*args, **kwargs)
        finally:
            for m in self.regions:
                object.__setattr__(m, "_compiled_call_impl", None)


def compile_regions(model: nn.Module, **compile_kwargs) -> RegionalCompile:
    """`model` with regional compilation; the keyword arguments go to each region's torch.compile."""
    return RegionalCompile(model, **compile_kwargs)


class OneGraphUnderDDP:
    """Calls a whole-model compiled module with dynamo's DDP graph splitting off (optimize_ddp=False).

    Under DDP, dynamo by default cuts a compiled model at the gradient-bucket boundaries ("DDPOptimizer") so
    that each bucket's all-reduce can start while the rest of the backward runs. With CUDA graphs that turns
    one whole-model graph into one graph per bucket, each handing its gradients to DDP's hooks from a graph:
    the shape that trained nothing per block (module docstring). Kept whole, the forward and the backward are
    one graph each and DDP all-reduces its buckets after the backward, without overlap. The flag is read when
    dynamo compiles, which happens inside a call, so every call runs under it (a cheap config patch)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        with torch._dynamo.config.patch(optimize_ddp=False):
            return self.compiled(*args, **kwargs)


def compile_model(model: nn.Module, spec: CompileSpec, **compile_kwargs):
    """The callable LitDeepSeek runs its steps through: the model, compiled as `spec` says."""
    mode = None if spec.mode == "default" else spec.mode
    if spec.scope == "full":
        compiled = torch.compile(model, mode=mode, **compile_kwargs)
        return OneGraphUnderDDP(compiled) if spec.cudagraphs else compiled
    return compile_regions(model, mode=mode, **compile_kwargs)
