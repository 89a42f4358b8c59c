"""Expert parallelism in Lightning: `trainer=ep` (configs/trainer/ep.yaml), a small subclass of DDPStrategy.

The world of W ranks is a (dp, ep) DeviceMesh, ep = `trainer.strategy.expert_parallel`, dp = W / ep:

* routed experts: each rank of an EP group (ep consecutive ranks) holds E/ep of them (model/expert_parallel.py
  moves the tokens); their gradients already sum every EP-group rank's tokens, and are summed over the dp
  replicas that hold the same experts and divided by W once per optimizer step (reduce_expert_grads);
* everything else (attention, embeddings, router, shared experts, norms): replicated, wrapped in torch's DDP
  with the expert parameters excluded (`_ddp_params_and_buffers_to_ignore`), so gradients are averaged over
  all W ranks with DDP's bucketing and overlap, exactly as under `trainer=ddp`.

Why a DDPStrategy subclass and not Lightning's ModelParallelStrategy: ModelParallelStrategy hands over a
mesh but leaves all gradient synchronisation to the module (FSDP2 / replicate applied in configure_model),
and its checkpoints are either distributed-checkpoint directories or full state dicts gathered through
DTensor parameters. Here the replicated part is plain DDP (the `trainer=ddp` path, its buffer settings and
launcher unchanged) and only the experts need their own rule, so the subclass adds just that: the mesh,
sharding the experts before DDP wraps the module, their gradient reduction, an EP-aware gradient norm, and
checkpoints that hold the standard (gathered) state dict. Both CPU/gloo and GPU/NCCL run the same code.

Checkpoints are EP-degree independent: on save, expert tensors (and their AdamW moments) are all-gathered
to the full [E, ...] tensors, so last.ckpt is exactly what a one-process or DDP run writes; on load, a full
checkpoint (from any EP degree, DDP or one process) is sliced to this rank's experts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from deepseek_mini.config import ConfigError

log = logging.getLogger(__name__)


def check_expert_parallel(model, strategy: dict, devices: Any, num_nodes: int, compile_mode: str | None,
                          precision: str) -> int:
    """Bad EP combinations fail at start with one line naming the field (RunConfig calls this). Returns the
    `shards` of run_config.check_fits_in_memory: EP divides the routed experts, most of an MoE's parameters,
    by ep (the replicated rest is counted as if divided too, a slight overestimate of what fits)."""
    ep = strategy.get("expert_parallel")
    key = "trainer.strategy.expert_parallel"
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ConfigError(f"{key}={ep!r}: must be a positive integer (the expert-parallel degree)")
    if not model.is_moe:
        raise ConfigError(f"{key}={ep}: the model has no routed experts (model.n_routed_experts=0)")
    from deepseek_mini.model.expert_parallel import DISPATCH_MODES

    dispatch = strategy.get("dispatch", "exact")
    if dispatch not in DISPATCH_MODES:
        raise ConfigError(f"trainer.strategy.dispatch={dispatch!r}: must be one of {', '.join(DISPATCH_MODES)} (exact: "
                          "each token once per device it uses; padded: every token to every device, no host sync)")
    E = model.n_routed_experts
    if E % ep:
        raise ConfigError(f"model.n_routed_experts={E}: must be divisible by {key}={ep} (E/ep experts per rank)")
    if isinstance(devices, int) and devices >= 1:
        world = devices * int(num_nodes)
        if world % ep:
            raise ConfigError(f"trainer.devices={devices}: the world size {world} (devices x num_nodes) must be a "
                              f"multiple of {key}={ep}")
    device_limited = model.topk_method == "group_limited_greedy"
    if ep > 1 and (device_limited or model.device_aux_loss_alpha > 0 or model.comm_aux_loss_alpha > 0) and model.n_group != ep:
        raise ConfigError(f"model.n_group={model.n_group}: must equal {key}={ep} under expert parallelism (the expert "
                          "groups of device-limited routing and of the device/communication losses are the devices)")
    if ep > 1 and device_limited and model.topk_group > ep:  # implied by topk_group <= n_group = ep; said plainly
        raise ConfigError(f"model.topk_group={model.topk_group}: the device limit M must be <= {key}={ep}")
    if compile_mode is not None and ep > 1:
        from deepseek_mini.training.compile import parse_compile

        spec = parse_compile(compile_mode)
        if spec.cudagraphs and dispatch != "padded":
            raise ConfigError(f"compile={compile_mode}: CUDA graphs need trainer.strategy.dispatch=padded under expert "
                              "parallelism (the exact dispatch reads its all-to-all sizes on the host, which a CUDA "
                              "graph cannot replay), or compile=regional")
    if str(precision) in ("16-mixed", "16"):
        raise ConfigError(f"trainer.precision={precision}: fp16 needs a gradient scaler, whose inf check does not see "
                          "the other ranks' experts; use bf16-mixed or 32-true")
    return ep


class ExpertParallelStrategy(DDPStrategy):
    """DDP for the replicated parameters, expert parallelism (E/ep experts per rank) for the routed experts."""

    strategy_name = "expert_parallel"

    def __init__(self, expert_parallel: int = 2, dispatch: str = "exact", **kwargs: Any):
        super().__init__(**kwargs)
        self.expert_parallel = int(expert_parallel)
        self.dispatch = dispatch  # model/expert_parallel.py: "exact" (each token once per device it uses) or "padded"
        self.mesh = None
        self._expert_params: dict[str, torch.nn.Parameter] = {}  # state-dict name -> this rank's shard

    # ------------------------------------------------------------------ setup
    def setup_environment(self) -> None:
        super().setup_environment()  # the process group
        from torch.distributed.device_mesh import init_device_mesh

        ep, world = self.expert_parallel, self.world_size
        if world % ep:  # RunConfig checks this for an integer trainer.devices; -1 / a list are only known here
            raise ConfigError(f"trainer.strategy.expert_parallel={ep}: must divide the world size {world}")
        # ep is the inner dimension: an EP group is ep consecutive ranks (one node's GPUs, the fast links)
        self.mesh = init_device_mesh(self.root_device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))

    @property
    def ep_group(self):
        return self.mesh["ep"].get_group()

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group()

    def _shard(self) -> None:
        from deepseek_mini.model.expert_parallel import shard_experts

        module = self.lightning_module
        if not self._expert_params:
            names = shard_experts(module, self.ep_group, self.dispatch)
            params = dict(module.named_parameters())
            self._expert_params = {n: params[n] for n in names}
            log.info("expert parallelism: %d-way over %d ranks (dp=%d); this rank holds experts %d..%d of each MoE "
                     "layer", self.expert_parallel, self.world_size, self.world_size // self.expert_parallel,
                     *self._local_range())

    def _local_range(self) -> tuple[int, int]:
        p = next(iter(self._expert_params.values()))
        n = p.shape[0]
        first = dist.get_rank(self.ep_group) * n
        return first, first + n - 1

    def setup(self, trainer) -> None:
        self._shard()  # after a checkpoint was restored into the whole model, before DDP and the optimizer
        if trainer.state.fn == TrainerFn.FITTING:
            super().setup(trainer)
            return
        # not fitting (validate): DDPStrategy would broadcast rank 0's whole state, its experts over the others';
        # the replicated parameters are identical on every rank already
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.setup_precision_plugin()

    def _setup_model(self, model):
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(self._expert_params))
        return super()._setup_model(model)

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def reduce_expert_grads(self) -> None:
        """Expert gradients -> the mean over all W ranks' losses, as DDP gives the replicated parameters.

        After backward an expert's gradient already sums the loss gradients of every rank of its EP group
        (the backward all-to-all brought them); the dp replicas holding the same experts add theirs.
        """
        for p in self._expert_params.values():
            if p.grad is None:  # this rank's experts received no rows: a zero gradient, so the reduction matches
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self._expert_params.values()]
        if self.world_size // self.expert_parallel > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(f)
        torch._foreach_div_(grads, float(self.world_size))

    def optimizer_step(self, optimizer, closure, model=None, **kwargs):
        # Lightning runs the closure (forward + backward of the last micro-batch) inside the optimizer step,
        # then the clipping and on_before_optimizer_step hooks: the expert gradients are reduced in between,
        # once per optimizer step whatever accumulate_grad_batches is.
        def closure_then_reduce():
            out = closure()
            self.reduce_expert_grads()
            return out

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    @torch.no_grad()
    def grad_norm(self, module) -> torch.Tensor:
        """The 2-norm of the whole model's gradient: the replicated part (the same on every rank) plus every
        EP rank's experts (summed over the EP group)."""
        from deepseek_mini.optim.adamw import total_norm

        experts = {id(p) for p in self._expert_params.values()}
        rest = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in experts]
        mine = [p.grad for p in self._expert_params.values() if p.grad is not None]
        zero = torch.zeros((), device=self.root_device)
        sq_rest = total_norm(rest).pow(2) if rest else zero
        sq_experts = total_norm(mine).pow(2) if mine else zero.clone()
        dist.all_reduce(sq_experts, group=self.ep_group)
        return (sq_rest + sq_experts).sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, module, optimizer, max_norm: float) -> torch.Tensor:
        """Norm clipping with the global norm (the same factor on every rank, so replicas stay identical)."""
        from deepseek_mini.optim.clip import fold_clip_into_step, is_fused

        norm = self.grad_norm(module)
        raw = getattr(optimizer, "_optimizer", optimizer)
        if is_fused(raw):  # folded into the fused step, as optim.clip.clip_in_fused_step does
            fold_clip_into_step(raw, norm, max_norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(module.parameters(), max_norm, norm, foreach=True)
        return norm

    # ------------------------------------------------------------------ checkpoints
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """[E/ep, ...] shards -> the full [E, ...] tensor, on the CPU of global rank 0 (the rank that writes the
        checkpoint; the others keep their shard). One tensor at a time: a model whose experts do not fit one
        GPU never holds all of them there."""
        parts = [torch.empty_like(t) for _ in range(self.expert_parallel)]
        dist.all_gather(parts, t.contiguous(), group=self.ep_group)
        return torch.cat(parts).cpu() if self.global_rank == 0 else t

    def _slice(self, t: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == local.shape[0]:  # already this rank's rows (expert_parallel=1)
            return t
        n = local.shape[0]
        first = dist.get_rank(self.ep_group) * n
        return t[first:first + n]

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The standard state dict: experts all-gathered to [E, ...] (a collective: every rank calls it)."""
        state = super().lightning_module_state_dict()
        for name in self._expert_params:
            state[name] = self._gather(state[name].detach())
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        state = dict(checkpoint["state_dict"])
        for name, p in self._expert_params.items():  # a sharded module: take this rank's rows
            if name in state:
                state[name] = self._slice(state[name], p)
        self.lightning_module.load_state_dict(state, strict=strict)

    def _expert_indices(self, optimizer) -> dict[int, torch.nn.Parameter]:
        """Optimizer state-dict index -> expert parameter (indices run over the param groups in order)."""
        experts = {id(p) for p in self._expert_params.values()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {i: p for i, p in enumerate(params) if id(p) in experts}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        raw = getattr(optimizer, "_optimizer", optimizer)
        state = raw.state_dict()
        out = dict(state, state=dict(state["state"]))
        for i, p in self._expert_indices(raw).items():
            if i in out["state"]:
                out["state"][i] = {k: self._gather(v) if torch.is_tensor(v) and v.shape == p.shape else v
                                   for k, v in out["state"][i].items()}
        return out

    def load_optimizer_state_dict(self, checkpoint) -> None:
        from lightning.fabric.utilities.optimizer import _optimizer_to_device

        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            raw = getattr(optimizer, "_optimizer", optimizer)
            opt_state = dict(opt_state, state=dict(opt_state["state"]))
            for i, p in self._expert_indices(raw).items():
                if i in opt_state["state"]:
                    opt_state["state"][i] = {
                        k: self._slice(v, p) if torch.is_tensor(v) and v.dim() > 0 and v.shape[1:] == p.shape[1:]
                        else v for k, v in opt_state["state"][i].items()}
            optimizer.load_state_dict(opt_state)
            _optimizer_to_device(optimizer, self.root_device)


@torch.no_grad()
def device_load_metrics(layers, router_stats: list[dict], strategy: ExpertParallelStrategy) -> dict[str, torch.Tensor]:
    """Per MoE layer, summed over the EP group for this step (LitDeepSeek logs them every log_every_n_steps):
    (token, expert) pairs each device's experts computed (`device<d>_rows`, the compute load) and tokens each
    device received (`device<d>_tokens_received`, a token counted once per device: exactly the rows the
    dispatcher sent there, and the paper's communication measure, moe.tokens_to_groups), with
    their max/mean. One small all-reduce over the EP group."""
    ep, n = strategy.expert_parallel, len(router_stats)
    rows = torch.stack([s["tokens_per_expert"] for s in router_stats]).float().view(n, ep, -1).sum(-1)
    received = torch.stack([s["tokens_per_device"] for s in router_stats]).float()
    both = torch.cat([rows, received], dim=1)
    dist.all_reduce(both, group=strategy.ep_group)
    out = {}
    for i, layer in enumerate(layers):
        load, recv = both[i, :ep], both[i, ep:]
        out[f"moe/layer{layer}/device_max_load"] = load.max() / load.mean().clamp_min(1e-9)
        out[f"moe/layer{layer}/device_max_received"] = recv.max() / recv.mean().clamp_min(1e-9)
        for d in range(ep):
            out[f"moe/layer{layer}/device{d}_rows"] = load[d]
            out[f"moe/layer{layer}/device{d}_tokens_received"] = recv[d]
    return out


def expert_parallel_strategy(expert_parallel: int = 2, dispatch: str = "exact", **kwargs: Any) -> ExpertParallelStrategy:
    """The `_target_` of configs/trainer/ep.yaml (kwargs are DDPStrategy's)."""
    return ExpertParallelStrategy(expert_parallel=expert_parallel, dispatch=dispatch, **kwargs)


def is_expert_parallel(strategy: Any) -> bool:
    """trainer=ep: experts are sharded over ranks (gradient norm, clipping and sampling need every rank)."""
    return isinstance(strategy, ExpertParallelStrategy)


__all__ = ["ExpertParallelStrategy", "check_expert_parallel", "device_load_metrics", "expert_parallel_strategy",
           "is_expert_parallel"]
