"""torch.compile for training: what is compiled (scope) and how (mode), from the config's one `compile` key.

    compile=false                    eager
    compile=true | regional          each transformer block compiled once per block kind (the default scope)
    compile=full                     the whole model as one graph
    compile=<mode>                   the whole model with a torch.compile mode (reduce-overhead = + CUDA graphs),
                                     what a bare mode has always meant here
    compile=<scope>:<mode>           both, e.g. full:reduce-overhead, regional:max-autotune-no-cudagraphs
    compile=regional:reduce-overhead regional compilation under whole-model CUDA graphs (GraphedRegional below;
                                     configs/experiment/small_gpu.yaml; one GPU)

Regional compilation (PyTorch's recipe "Reducing torch.compile cold start compilation time with regional
compilation", and torchtitan's apply_compile) compiles the repeated Block instead of the whole model. Dynamo
treats a module's parameters and buffers as graph inputs (`inline_inbuilt_nn_modules`, always on since torch
2.5), so the 12 blocks of `small` share their graphs. Each block is compiled as its two halves (Block.attention,
Block.feed_forward), so that the attention, the same code in every layer, is one graph for all 12; the
feed-forward half is one graph per kind, the dense first layer's and the MoE layers' (they differ in
`Block.is_moe` and their submodules, which dynamo guards on). With whole blocks as regions the dense block's
attention was compiled a second time, and a cold `small_gpu` run reached its first step ~3 s later on one H200
(2026-12-02, docs/benchmarks.md). The halves are 12 more compiled calls per step for the host; without CUDA graphs
(where the step waits on the host) they stepped 3-15% faster than whole blocks in three comparisons and 18% slower
in one, on machines whose host speed alone moved the step by up to 1.9x. A full compile traces and optimises all
12 blocks unrolled, which is why a cold `small_gpu` run paid about two minutes before its first step. Outside the
blocks the embedding, the final RMSNorm and the training step's LM head + loss (model/loss.LinearCrossEntropy, an
autograd Function dynamo traces whole) are three more regions.

The regions are compiled only while LitDeepSeek's own forward runs (`RegionalCompile.__call__` sets each
region's compiled method on its module, which Python finds before the class's, and removes it again):
everything else that calls the model in the training process (the sample-generation callback, decoding with a
KV cache) runs eager, as it does next to a fully compiled forward. Compiling the methods themselves keeps each
region kind's cache entries on its own code object (Block.attention, Block.feed_forward, RMSNorm.forward), so
training, eval mode and a short last validation batch stay within dynamo's recompile limit per code object.

CUDA graphs. `full:reduce-overhead` is torch.compile's own: cudagraph trees over the whole-model graph (one
graph for the forward, one for the backward). It trained right on one GPU, under DDP compiled as one graph
(OneGraphUnderDDP below; 1.47x one GPU on two H200s, the all-reduce not overlapped) and under expert parallelism
with the padded dispatch, whose all-to-alls run inside the graphs (0.93x DDP there). `regional:reduce-overhead`
records the same two graphs over the regionally compiled model (GraphedRegional, torch.cuda.make_graphed_callables):
on one H200 (2026-12-01/02, docs/benchmarks.md) it stepped at 98.6-98.7% of the whole-model graph's speed with 2.8
GiB less memory and reached the first step 24-41 s after a cold launch (16-19 s warm); the whole-model graph's
first step came at 70 s (38 s warm) on another machine, and cold starts differed by up to ~15 s between machines.
Its earlier meaning, cudagraph trees per block, stepped 14% slower on one H200 and under DDP on two trained
nothing (gradient norm inf from step 19, torch warning that the AccumulateGrad node's stream did not match that
of the graph that produced the gradient); GraphedRegional has run on one GPU only, so the run config refuses it
for more (training/run_config.check_cuda_graphs_placement).

Not used: torch.compiler.nested_compile_region on Block.forward (a whole-model graph that compiles the
repeated block once). On torch 2.13 (CPU, 2026-11-30), a cold full compile of a 12-layer `small`-structured
model (narrow dims): 194 s plain, 92 s with it, same loss, but the last block's parameter gradients ~100% wrong.
The trigger, reduced: blocks in the region followed by a norm and a linear head; correct under
backend="aot_eager", and correct with torch._inductor.config.allow_buffer_reuse = False (an Inductor buffer-reuse
bug around the region). With that setting: 101 s, gradients equal to eager. On the GPU image's torch 2.11 (H200,
2026-11-30) the same code does not compile: dynamo raises "KeyError: example_value" in are_same_graph_modules
while deduplicating the region's subgraphs. Worth retrying on a newer torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from deepseek_mini.config import ModelConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("regional", "full")
DEFAULT_SCOPE = "regional"  # what compile=true means
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_OFF = ("false", "none", "off", "")
# On the CPU a compiled training step runs the routed experts' grouped GEMM as an opaque custom op (model/moe.py).
# Under torch 2.11's AOTAutograd its backward gave the experts' gate/up weights, and through them every weight
# below, wrong gradients (the GPU image, 2026-12-02: gate_up_proj's gradient off by its own size, the loss
# exact; backend aot_eager as well as inductor); under 2.13 they equal eager's to 1e-10. The GPU path (the real
# grouped_mm) was right under 2.11. Versions between are not verified.
CPU_COMPILE_MIN_TORCH = "2.13"


def cpu_compile_problem(version: str = torch.__version__) -> str | None:
    """Why a compiled training step on the CPU cannot be trusted with this torch (None: it can)."""
    if torch.torch_version.TorchVersion(version) >= CPU_COMPILE_MIN_TORCH:
        return None
    return (f"torch {version} computes wrong gradients for the routed experts in a compiled CPU step (verified "
            f"right from torch {CPU_COMPILE_MIN_TORCH}); use compile=null on the CPU, or torch>={CPU_COMPILE_MIN_TORCH}")


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


def compile_regions_of(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The methods regional compilation compiles, as (module, method name): each transformer Block's two halves
    (`attention`, `feed_forward`: the attention's graphs serve the dense and the MoE layers alike), and the
    `forward` of the embedding, the final norm and the training step's head + loss
    (model/loss.LinearCrossEntropy). Outside the blocks these are one graph each; eager, the loss's elementwise
    steps passed over the [T, V] logits one by one and the embedding's backward sorted the token ids (together
    ~10% of the step on an H200, docs/benchmarks.md). Left eager (2026-12-02, H200), the embedding and the final
    norm did not bring a cold start's first step sooner (the first graph compiled pays the compiler's own start,
    ~2 s, whichever region it is), and the step was 1.5% slower with both eager, 0.1% with the embedding alone."""
    from deepseek_mini.model.loss import LinearCrossEntropy
    from deepseek_mini.model.transformer import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    backbone = getattr(model, "model", None)
    extra = [getattr(backbone, "embed_tokens", None), getattr(backbone, "norm", None)]
    extra = [m for m in extra if isinstance(m, nn.Module)] + [m for m in model.modules()
                                                              if isinstance(m, LinearCrossEntropy)]
    return [(b, half) for b in blocks for half in ("attention", "feed_forward")] + [(m, "forward") for m in extra]


class RegionalCompile:
    """Calls `model` with its regions (compile_regions_of) running through torch.compile'd methods.

    For the call's duration each region's compiled method is set on its module as an instance attribute, which
    Python finds before the class's method (nn.Module.__call__ calls `self.forward`, Block.forward calls
    `self.attention`); afterwards they are removed again."""

    def __init__(self, model: nn.Module, **compile_kwargs):
        self.model = model
        self.regions = compile_regions_of(model)
        # one torch.compile per region, but dynamo caches per code object: every Block shares Block.attention's
        # graphs (guarded on train/eval and shapes), every MoE layer Block.feed_forward's MoE kind
        self.compiled = [torch.compile(getattr(m, name), **compile_kwargs) for m, name in self.regions]

    def __call__(self, *args, **kwargs):
        for (m, name), fn in zip(self.regions, self.compiled):
            object.__setattr__(m, name, fn)
        try:
            return self.model(*args, **kwargs)
        finally:
            for m, name in self.regions:
                m.__dict__.pop(name, None)


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


class _TrainingForward(nn.Module):
    """The training forward as torch.cuda.make_graphed_callables takes it: a module called with positional
    tensors that returns only tensors (ModelOutput's fields as a dict, its empty ones left out)."""

    def __init__(self, model: nn.Module, call):
        super().__init__()
        self.model = model  # registered: the graphs' backward computes the gradients of its parameters
        self.call = call  # the regionally compiled model (not a module)
        self.last_outputs: dict | None = None  # what the last call returned (the recording's, in the end)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        out = self.call(input_ids, labels=labels, return_logits=False)
        self.last_outputs = {f.name: getattr(out, f.name) for f in fields(out) if getattr(out, f.name) is not None}
        return self.last_outputs

    def release_autograd_graph(self) -> None:
        """Detach, in place, the tensors the last call returned. make_graphed_callables keeps the recorded
        forward's outputs as the graph's output buffers, and with them that forward's autograd graph, whose
        gradient accumulators were made on the recording's stream: the replayed steps would then hand them
        their gradients from the training stream (torch warns "The AccumulateGrad node's stream does not
        match ..." and orders the two streams). Released, each training forward makes its own on its stream."""
        for t in torch.utils._pytree.tree_leaves(self.last_outputs or {}):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                t.detach_()
        self.last_outputs = None


class GraphedRegional:
    """compile=regional:<CUDA-graph mode>: regional compilation, with the training forward and backward each
    replayed as one CUDA graph of the whole model.

    The whole model compiled as one graph (compile=full:reduce-overhead) is the fast step, but Inductor then
    generates code for every block unrolled: ~40-60 s before a cold run's first step on an H200. Regional
    compilation generates one block of each kind, but cudagraph trees then record one graph per block and
    stepped 14% slower (docs/benchmarks.md). Here the regions compile without graphs, and PyTorch's
    torch.cuda.make_graphed_callables records the training forward (embedding, blocks, loss) and its backward
    once each at the first training step: the compiled kernels of the regions, launched from two graphs.

    Only the training forward (train mode, gradients on, labels, on CUDA) runs through the graphs; validation,
    evaluation and generation call the regionally compiled model. A batch of another shape than the recorded
    one runs ungraphed. The graphs read the parameters' storage as it was recorded: `reset()` drops them when
    that changes (LitDeepSeek calls it at the start and end of each fit, where bf16 weights come and go).
    The forward and backward run a few times before recording (the compile happens there, _warm_up): the
    buffers the forward updates (the router's expert counts) are put back as they were after it.
    Its gradients are the graph's own buffers, which the next backward overwrites, so gradient accumulation is
    refused with CUDA graphs (run_config.check_cuda_graphs_accumulation); one process only
    (run_config.check_cuda_graphs_placement).

    The recording's own autograd graph is released once recorded (_TrainingForward.release_autograd_graph), so
    the parameters' gradient accumulators of each step are made on the training stream, not the recording's."""

    device_type = "cuda"  # where CUDA graphs exist (a CPU test swaps in a stand-in recorder and "cpu")

    def __init__(self, model: nn.Module, regional: RegionalCompile):
        self.model = model
        self.regional = regional
        self.graphed = None  # the recorded training forward, from the first training call on
        self.shapes = None

    def reset(self) -> None:
        self.graphed = self.shapes = None

    def __call__(self, input_ids, labels=None, return_logits: bool = True, **kwargs):
        if (return_logits or labels is None or kwargs or not self.model.training or not torch.is_grad_enabled()
                or input_ids.device.type != self.device_type):
            return self.regional(input_ids, labels=labels, return_logits=return_logits, **kwargs)
        shapes = (tuple(input_ids.shape), tuple(labels.shape))
        if self.graphed is None:
            self.graphed, self.shapes = self._record(input_ids, labels), shapes
        elif shapes != self.shapes:
            return self.regional(input_ids, labels=labels, return_logits=False)
        from deepseek_mini.model.transformer import ModelOutput

        return ModelOutput(logits=None, **self.graphed(input_ids, labels))

    WARMUP_STEPS = 3  # forward + backward before recording (torch.compile compiles in the first), as torch's default

    def _warm_up(self, forward: _TrainingForward, args: tuple) -> None:
        """The forward and backward run before recording, here rather than in make_graphed_callables: its
        warm-up keeps the last one's autograd graph alive while the graphs are recorded on another stream, and
        the recorded backward then hands gradients across streams (torch warns "The AccumulateGrad node's stream
        does not match ..."). Here each one's graph is freed before the next."""
        params = [p for p in forward.parameters() if p.requires_grad]
        for _ in range(self.WARMUP_STEPS):
            outs = [o for o in torch.utils._pytree.tree_leaves(forward(*args))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            torch.autograd.grad(outs, params, [torch.zeros_like(o) for o in outs], allow_unused=True)
            del outs
        forward.last_outputs = None

    def _record(self, input_ids: torch.Tensor, labels: torch.Tensor):
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]
        device = input_ids.device.type
        # make_graphed_callables refuses autocast's weight-cast cache (its casts would live in the graph's memory)
        with torch.autocast(device, dtype=torch.get_autocast_dtype(device),
                            enabled=torch.is_autocast_enabled(device), cache_enabled=False):
            forward = _TrainingForward(self.model, self.regional)
            args = (input_ids.clone(), labels.clone())
            self._warm_up(forward, args)
            graphed = torch.cuda.make_graphed_callables(forward, args, num_warmup_iters=0, allow_unused_input=True)
        forward.release_autograd_graph()
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        torch.cuda.empty_cache()  # the warm-up ran on a side stream: its cached blocks serve nothing else
        return graphed


def start_compile_workers() -> bool:
    """Start Inductor's kernel-compiling worker processes now rather than when the first graph reaches Inductor.

    Inductor compiles each graph's Triton kernels in a pool of worker processes, which it starts at the first
    graph it gets: a process that imports torch and then forks one worker per core, seconds on a fresh machine
    that the first training step waits for. train() calls this before data preparation, so the workers come up
    while the data, the model and the validation before fit are prepared. Only where Triton compiles for a CUDA
    GPU (on CPU Inductor compiles C++ without this pool). Returns whether the pool was started; a torch without
    this hook (a private API) starts it at the first graph, as before."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    except Exception:  # never let an optimisation of the start end a run
        return False
    return True


def activation_dtype(precision: str) -> torch.dtype:
    """The dtype of the activations (and so of the 16-bit kernels' inputs) under a Lightning precision setting."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def compile_kernels_ahead(model_cfg: ModelConfig, precision: str, device: torch.device | int) -> int:
    """Start compiling the Triton kernels the model's training steps launch (model.moe.training_kernels: the
    router's top-k, the experts' SwiGLU backward) in background threads (kernels/runtime.compile_ahead), so that
    neither the validation before fit nor the first step waits for them. train() calls it at its start on one
    GPU, LitDeepSeek.configure_optimizers again on every rank (what was started is not started again). Returns
    how many compilations it started (0 off CUDA)."""
    from deepseek_mini.kernels import runtime
    from deepseek_mini.model.moe import training_kernels

    return len(runtime.compile_ahead(training_kernels(model_cfg, activation_dtype(precision)), device))


def compile_model(model: nn.Module, spec: CompileSpec, **compile_kwargs):
    """The callable LitDeepSeek runs its steps through: the model, compiled as `spec` says."""
    mode = None if spec.mode == "default" else spec.mode
    if spec.scope == "full":
        compiled = torch.compile(model, mode=mode, **compile_kwargs)
        return OneGraphUnderDDP(compiled) if spec.cudagraphs else compiled
    if spec.cudagraphs:  # the regions without cudagraph trees; the whole training step graphed instead
        mode = None if spec.mode == "reduce-overhead" else f"{spec.mode}-no-cudagraphs"
        return GraphedRegional(model, compile_regions(model, mode=mode, **compile_kwargs))
    return compile_regions(model, mode=mode, **compile_kwargs)
