"""Expert parallelism on CPU with 2 gloo processes (model/expert_parallel.py, training/expert_parallel.py).

* EP=2 forward + backward equals the single-process model with the same weights and the same global batch
  (fp32, tight tolerance): device-limited routing over the 2 real devices, both device-level losses, per
  sequence and over the batch;
* a few optimizer steps of the Lightning EP strategy match the same steps under DDP (in process, 2 ranks);
* checkpoints are EP-degree independent: the EP=2 state dict is the standard one, loads into one process and
  back into EP=2 (optimizer state included);
* bad combinations fail with one line naming the field.
The CLI run (train.py trainer=ep) is marked slow.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_OVERRIDES, needs_trusted_cpu_compile, run_cli
from model_helpers import SMALL_MODEL

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2
from deepseek_mini.model.moe import MoE
from deepseek_mini.training.compile import cpu_compile_problem

EP_MODEL = dict(SMALL_MODEL, topk_method="group_limited_greedy", n_group=2, topk_group=1, aux_loss_alpha=0.01,
                device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02)
B, S = 3, 16  # per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, world: int = 2) -> None:
    """Run fn(rank, world, port, *args) in `world` gloo processes, forked: they inherit the imported modules
    (a spawned process would import torch and the package again, ~10 s each on a loaded 2-core machine). Where
    CUDA is, an earlier test's backward may have started autograd's device threads, and a fork would then refuse
    to run backward ("Unable to handle autograd's threading in combination with fork-based multiprocessing"):
    spawned there."""
    method = "spawn" if torch.cuda.is_available() else "fork"
    mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=True, start_method=method)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _batch(cfg: ModelConfig, world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B * world, S), generator=g)
    return x, torch.roll(x, -1, dims=1)


# ---------------------------------------------------------------------- forward + backward equivalence
# device-limited (M = 1), with the balance losses per sequence and over the batch (the EP group's counts); and
# top-4 of 8 experts on 2 devices without a device limit, where every token has 2+ experts on some device
# (the dispatcher must send it there once)
# (the communication loss's M = min(K, devices) = 2); and every token steered to device 0 by the selection bias
# (device 1 receives no row at all, yet runs its collectives forward and backward)
EQUIV_CONFIGS = {"seq": dict(EP_MODEL, seq_aux=True), "batch": dict(EP_MODEL, seq_aux=False),
                 "top4": dict(EP_MODEL, num_experts_per_tok=4, topk_method="greedy"),
                 "one_device": dict(EP_MODEL, topk_method="greedy", bias_update_speed=0.01)}
# every config with the exact dispatch; the padded one (no host sync) on the batch-level losses and on the routing
# that leaves one device idle (it receives only padding)
EP_RUNS = [(name, "exact") for name in EQUIV_CONFIGS] + [("batch", "padded"), ("one_device", "padded")]
SUFFIX = {"exact": "", "padded": "_padded"}


def _model(name: str) -> DeepSeekV2:
    cfg = ModelConfig.from_dict(EQUIV_CONFIGS[name])
    torch.manual_seed(0)
    model = DeepSeekV2(cfg).train()
    if name == "one_device":  # scores are softmax probabilities: a -1 bias keeps experts E/2.. out of every top-k
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.gate.e_score_correction_bias[cfg.n_routed_experts // 2:] = -1.0
    return model


def _recording(route, into: list):
    """Router.route that also appends its top-k expert ids to `into`."""
    def wrapped(logits):
        out = route(logits)
        into.append(out[1].detach())
        return out
    return wrapped


def _grads_worker(rank, world, port, out_dir):
    from deepseek_mini.model import expert_parallel
    from deepseek_mini.model.expert_parallel import shard_experts

    _init(rank, world, port)
    sent = []  # shapes of every tensor the dispatcher sends by all_to_all_single, in call order
    to_all = expert_parallel._all_to_all

    def spy(x, out_splits, in_splits, group):
        sent.append(tuple(x.shape))
        return to_all(x, out_splits, in_splits, group)

    expert_parallel._all_to_all = spy
    autograd_a2a = expert_parallel.all_to_all_single_autograd

    def no_autograd_without_grad(*args):
        assert torch.is_grad_enabled(), "the autograd all_to_all was called under inference_mode"
        return autograd_a2a(*args)

    for name, dispatch in EP_RUNS:
        model = _model(name)
        cfg = model.config
        names = set(shard_experts(model, dist.group.WORLD, dispatch))
        routed = []  # each MoE layer's top-k expert ids on this rank
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            moe.gate.route = _recording(moe.gate.route, routed)
        x, y = _batch(cfg, world)
        rows = slice(rank * B, (rank + 1) * B)
        sent.clear()
        out = model(x[rows], labels=y[rows], return_logits=False)
        (out.loss + out.aux_loss).backward()
        # the loss of the global batch is the mean of the ranks' losses: average every gradient over the ranks
        # (an expert's local gradient already sums both ranks' tokens, so it is divided by the world size)
        grads = {}
        local_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        for n, p in model.named_parameters():
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)  # experts that got no row
            if n not in names:
                dist.all_reduce(g)
            grads[n] = g / world
        # inference_mode (validation, generation): the same loss, and no autograd collective, which has no
        # CUDA kernel to fall back on there (torch 2.11 on GPUs; on CPU it happens to have one): refused here
        expert_parallel.all_to_all_single_autograd = no_autograd_without_grad
        sent_train, routed_train = list(sent), list(routed)
        with torch.inference_mode():
            loss_inference = model(x[rows], labels=y[rows], return_logits=False).loss.clone()
        expert_parallel.all_to_all_single_autograd = autograd_a2a
        compiled = {}
        if name == "batch":  # regional torch.compile (trainer=ep compile=regional): with the exact dispatch each
            # block's graph breaks at the dispatcher, which runs eager (the batch-level counts' all-reduce too); the
            # padded dispatch is traced. aot_eager traces forward and backward as Inductor would receive them,
            # without its (slow on CPU) code generation.
            from deepseek_mini.training.compile import compile_regions

            model.zero_grad(set_to_none=True)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled_model = compile_regions(model, backend="aot_eager")
            out_c = compiled_model(x[rows], labels=y[rows], return_logits=False)
            (out_c.loss + out_c.aux_loss).backward()
            with torch.inference_mode():  # validation under compile: the collectives without autograd, traced too
                loss_c_inference = compiled_model(x[rows], labels=y[rows], return_logits=False).loss.clone()
            compiled = {"loss": out_c.loss.detach(), "loss_inference": loss_c_inference, "aux": {k: v.detach() for k, v in out_c.aux_losses.items()},
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                        "breaks": dict(torch._dynamo.utils.counters["graph_break"])}
        torch.save({"grads": grads, "names": sorted(names), "loss": out.loss.detach(),
                    "loss_inference": loss_inference, "compiled": compiled, "local_grads": local_grads,
                    "aux": {k: v.detach() for k, v in out.aux_losses.items()}, "stats": out.router_stats,
                    "sent": sent_train, "routed": routed_train}, Path(out_dir) / f"rank{rank}_{name}{SUFFIX[dispatch]}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ep_grads(tmp_path_factory) -> Path:
    """Both ranks' losses, gradients, router stats, routing and sent shapes for each of EQUIV_CONFIGS."""
    out = tmp_path_factory.mktemp("ep_grads")
    _spawn(_grads_worker, str(out))
    return out


def test_ep2_forward_backward_equals_one_process(ep_grads):
    """Both dispatches; the padded one also equals the exact one to the bit (the same pairs in the same order, plus
    zero rows), and compiled regionally it traces whole (no graph break) where the exact one breaks per MoE layer."""
    tmp_path = ep_grads
    for name, dispatch in EP_RUNS:
        ref = _model(name)
        cfg = ref.config
        x, y = _batch(cfg, 2)
        out = ref(x, labels=y, return_logits=False)
        (out.loss + out.aux_loss).backward()
        r = [torch.load(tmp_path / f"rank{i}_{name}{SUFFIX[dispatch]}.pt", weights_only=False) for i in range(2)]
        if dispatch == "padded":
            exact = [torch.load(tmp_path / f"rank{i}_{name}.pt", weights_only=False) for i in range(2)]
            for i in range(2):
                assert torch.equal(r[i]["loss"], exact[i]["loss"]) and r[i]["aux"] == exact[i]["aux"]
                torch.testing.assert_close(r[i]["grads"], exact[i]["grads"], rtol=0, atol=0)  # experts without rows: 0
        assert r[0]["names"], "no expert was sharded"
        assert set(out.aux_losses) == {"expert_balance", "device_balance", "comm_balance"}
        # the CE of the global batch is the mean of the ranks'; so are the balance losses, per sequence, and over
        # the batch, where each rank multiplies the EP group's counts f by its own mean scores P
        torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, out.loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r[0]["loss_inference"] + r[1]["loss_inference"], r[0]["loss"] + r[1]["loss"])
        for k, v in out.aux_losses.items():
            torch.testing.assert_close((r[0]["aux"][k] + r[1]["aux"][k]) / 2, v.detach(), rtol=1e-5, atol=1e-7)
        E = cfg.n_routed_experts
        for n, p in ref.named_parameters():
            if n in r[0]["names"]:  # rank 0 holds experts 0..E/2-1, rank 1 the rest
                assert r[0]["grads"][n].shape[0] == E // 2 and p.shape[0] == E
                torch.testing.assert_close(torch.cat([r[0]["grads"][n], r[1]["grads"][n]]), p.grad, rtol=1e-4,
                                           atol=1e-6)
            else:
                torch.testing.assert_close(r[0]["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=(name, n))
        for rank in range(2) if name == "batch" else ():  # compiled regionally, the same loss and local gradients
            c = r[rank]["compiled"]
            assert c["graphs"] >= 2, "nothing was compiled"
            n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
            n_breaks = sum(c["breaks"].values())
            assert (n_breaks == 0) if dispatch == "padded" else (n_breaks >= n_moe), (dispatch, c["breaks"])
            torch.testing.assert_close(c["loss"], r[rank]["loss"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(c["loss_inference"], r[rank]["loss_inference"], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(c["aux"], r[rank]["aux"], rtol=1e-6, atol=1e-8)
            assert c["grads"].keys() == r[rank]["local_grads"].keys()
            if cpu_compile_problem() is None:  # a torch whose compiled CPU step has the experts' gradients right
                torch.testing.assert_close(c["grads"], r[rank]["local_grads"], rtol=1e-5, atol=1e-7)
        if cfg.topk_method == "group_limited_greedy":  # M = topk_group = 1: each token's experts on one device
            assert r[0]["stats"][0]["tokens_per_device"].sum() == B * S
        if name == "one_device" and dispatch == "exact":  # rank 1 received (and returned) no row in any layer
            assert [shape[0] for shape in r[1]["sent"][2::3]] == [0] * (cfg.num_hidden_layers - cfg.first_k_dense_replace)


def test_ep_dispatch_sends_each_token_once_per_device(ep_grads):
    """Top-4 of 8 experts on 2 devices: the hidden rows each rank sends are its unique (token, device) pairs
    (at most 2 per token), not its T*K = 4 per token (token, expert) pairs, and one row per (token, device)
    comes back; the logged tokens per device count exactly the rows sent. (The outputs and gradients of this
    run equal the single process: test_ep2_forward_backward_equals_one_process, config "top4".)"""
    cfg = ModelConfig.from_dict(EQUIV_CONFIGS["top4"])
    T, K, D, L = B * S, cfg.num_experts_per_tok, cfg.hidden_size, cfg.n_routed_experts // 2
    sent = returned = 0
    for rank in range(2):
        r = torch.load(ep_grads / f"rank{rank}_top4.pt", weights_only=False)
        n_moe = len(r["routed"])
        assert n_moe == cfg.num_hidden_layers - cfg.first_k_dense_replace and len(r["sent"]) == 3 * n_moe
        for layer, (topk_idx, stats) in enumerate(zip(r["routed"], r["stats"])):
            x_sent, gates_sent, y_returned = r["sent"][3 * layer: 3 * layer + 3]
            unique = torch.zeros(T, 2).scatter_(1, topk_idx // L, 1.0)  # (token, device) pairs
            n_unique = int(unique.sum())
            assert x_sent == (n_unique, D) and gates_sent == (n_unique, K)
            assert n_unique < T * K, "every token has several experts on one device: dedup must show"
            assert stats["tokens_per_device"].tolist() == unique.sum(0).tolist()
            sent, returned = sent + x_sent[0], returned + y_returned[0]
    assert returned == sent  # one row back per (token, device) row received


# ---------------------------------------------------------------------- the Lightning strategy, in process
STEPS, RESUME_AT = 5, 3


class _Windows(torch.utils.data.Dataset):
    """Rank r's share of a fixed token stream: item i is global sample start + r + i * world."""

    def __init__(self, vocab: int, rank: int, world: int, start: int):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randint(0, vocab, (world * STEPS * B, S + 1), generator=g)
        self.idx = list(range(start * world * B + rank, world * STEPS * B, world))

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        row = self.x[self.idx[i]]
        return row[:-1], row[1:]


def _fit_worker(rank, world, port, kind, out_dir, ckpt_in, max_steps):
    import lightning as L

    from deepseek_mini.training.expert_parallel import ExpertParallelStrategy
    from deepseek_mini.training.module import LitDeepSeek

    # Lightning's environment then sees processes it did not start (as under torchrun): no launcher
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    L.seed_everything(0)
    model_cfg = dict(EP_MODEL, bias_update_speed=0.01)
    module = LitDeepSeek(model_cfg, optim={"lr": 3e-3}, scheduler={"name": "constant", "warmup_steps": 0},
                         max_steps=max_steps, log_every_n_steps=1)
    ddp = dict(find_unused_parameters=False, broadcast_buffers=False)
    strategy = ExpertParallelStrategy(expert_parallel=2, **ddp) if kind == "ep" else L.pytorch.strategies.DDPStrategy(
        **ddp)
    losses = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # the loss, and the global gradient norm (EP: replicated part + every rank's experts), before clipping
            losses[trainer.global_step - 1] = [float(outputs["loss"]), float(trainer.callback_metrics["train/grad_norm"])]

    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=world, max_steps=max_steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=0.5, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False, callbacks=[Record()])
    start = RESUME_AT if ckpt_in else 0
    loader = torch.utils.data.DataLoader(_Windows(model_cfg["vocab_size"], rank, world, start), batch_size=B)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_in)
    trainer.save_checkpoint(Path(out_dir) / f"{kind}{max_steps}.ckpt")  # every rank: EP gathers its experts
    if rank == 0:
        (Path(out_dir) / f"{kind}{max_steps}_{'resumed' if ckpt_in else 'fresh'}.json").write_text(json.dumps(losses))


def test_ep2_strategy_matches_ddp_and_its_checkpoint_resumes_under_both(tmp_path):
    """A few optimizer steps of the Lightning EP=2 strategy (clipping, the bias update and the AdamW state
    included) match DDP on the same data; its checkpoint is DDP's state dict, loads into one process, and
    resumes under EP=2 and under DDP to the same losses. (That a resumed run continues exactly like an
    uninterrupted one is the data module's part: the slow CLI test checks it; this harness's plain DataLoader
    departs from the uninterrupted run after the first resumed step, under DDP alone too.)"""
    from deepseek_mini.checkpoint import load_checkpoint

    out, ep_ckpt_path = str(tmp_path), str(tmp_path / f"ep{RESUME_AT}.ckpt")
    _spawn(_fit_worker, "ddp", out, None, STEPS)
    _spawn(_fit_worker, "ep", out, None, RESUME_AT)
    _spawn(_fit_worker, "ep", out, ep_ckpt_path, STEPS)
    _spawn(_fit_worker, "ddp", out, ep_ckpt_path, STEPS)  # the EP checkpoint into DDP (writes ddp5.ckpt again)
    ddp = json.loads((tmp_path / f"ddp{STEPS}_fresh.json").read_text())
    ep = json.loads((tmp_path / f"ep{RESUME_AT}_fresh.json").read_text())
    ep_resumed = json.loads((tmp_path / f"ep{STEPS}_resumed.json").read_text())
    ddp_resumed = json.loads((tmp_path / f"ddp{STEPS}_resumed.json").read_text())
    assert sorted(ep) == [str(i) for i in range(RESUME_AT)]
    assert sorted(ep_resumed) == sorted(ddp_resumed) == [str(i) for i in range(RESUME_AT, STEPS)]
    for step, (loss, norm) in {**ep, str(RESUME_AT): ep_resumed[str(RESUME_AT)]}.items():
        assert math.isclose(loss, ddp[step][0], rel_tol=2e-5), (step, loss, ddp[step])
        assert math.isclose(norm, ddp[step][1], rel_tol=1e-6), (step, norm, ddp[step])
    for step, (loss, norm) in ep_resumed.items():
        assert math.isclose(loss, ddp_resumed[step][0], rel_tol=2e-5), (step, loss, ddp_resumed[step])
        assert math.isclose(norm, ddp_resumed[step][1], rel_tol=1e-6), (step, norm, ddp_resumed[step])
    # the EP checkpoint is the standard one: DDP's keys and shapes, experts and AdamW moments full size
    ep_ckpt = torch.load(tmp_path / f"ep{STEPS}.ckpt", map_location="cpu", weights_only=False)
    ddp_ckpt = torch.load(tmp_path / f"ddp{STEPS}.ckpt", map_location="cpu", weights_only=False)
    assert {k: v.shape for k, v in ep_ckpt["state_dict"].items()} == {k: v.shape for k, v in
                                                                     ddp_ckpt["state_dict"].items()}
    for k, v in ep_ckpt["state_dict"].items():
        torch.testing.assert_close(v, ddp_ckpt["state_dict"][k], rtol=1e-3, atol=1e-5, msg=k)
    for i, st in ddp_ckpt["optimizer_states"][0]["state"].items():
        assert ep_ckpt["optimizer_states"][0]["state"][i]["exp_avg"].shape == st["exp_avg"].shape
    ckpt = tmp_path / "ep.ckpt"
    ckpt.write_bytes((tmp_path / f"ep{STEPS}.ckpt").read_bytes())
    (tmp_path / "model_config.json").write_text(json.dumps(dict(EP_MODEL, bias_update_speed=0.01)))
    assert load_checkpoint(ckpt).model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == EP_MODEL[
        "n_routed_experts"], "loads into one process"


# ---------------------------------------------------------------------- bad combinations: one line, rc 2
def _ep_run_config(overrides, tmp_path):
    from conftest import run_config_of

    return run_config_of(tmp_path, "trainer=ep", "trainer.accelerator=cpu", *overrides)


@pytest.mark.parametrize("overrides, line", [
    (["trainer.strategy.expert_parallel=3"], "error: model.n_routed_experts=8: must be divisible by "
                                             "trainer.strategy.expert_parallel=3"),
    (["trainer.devices=1"], "error: trainer.devices=1: the world size 1 (devices x num_nodes) must be a multiple"),
    (["model.device_aux_loss_alpha=0.01", "model.n_group=4"], "error: model.n_group=4: must equal "
                                                               "trainer.strategy.expert_parallel=2"),
    (["model.topk_method=group_limited_greedy", "model.n_group=4", "model.topk_group=1"],
     "error: model.n_group=4: must equal"),
    pytest.param(["compile=reduce-overhead"], "error: compile=full:reduce-overhead: CUDA graphs need "
                 "trainer.strategy.dispatch=padded under expert parallelism",
                 marks=needs_trusted_cpu_compile),  # (below torch 2.13 the CPU compile is refused first)
    (["trainer.strategy.expert_parallel=0"], "error: trainer.strategy.expert_parallel=0: must be a positive integer"),
    (["trainer.strategy.dispatch=fast"], "error: trainer.strategy.dispatch='fast': must be one of exact, padded"),
])
def test_bad_expert_parallel_settings_fail_with_one_line(overrides, line, tmp_path):
    from deepseek_mini.config import ConfigError

    with pytest.raises(ConfigError) as e:
        _ep_run_config(overrides, tmp_path)
    assert f"error: {e.value}".startswith(line), str(e.value)
    assert "\n" not in str(e.value)


def test_cuda_graphs_are_accepted_with_the_padded_dispatch(tmp_path):
    """The padded dispatch has no host sync, so the whole model (collectives included) may run as CUDA graphs."""
    run = _ep_run_config(["compile=reduce-overhead", "trainer.strategy.dispatch=padded"], tmp_path)
    assert run.compile == "full:reduce-overhead"


# ---------------------------------------------------------------------- train.py trainer=ep, end to end (slow)
CLI = [o for o in TINY_OVERRIDES if not o.startswith(("trainer.max_steps=", "scheduler."))] + [
    "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv", "model.bias_update_speed=0.01",
    "model.topk_method=group_limited_greedy", "model.n_group=2", "model.topk_group=1",
    "model.device_aux_loss_alpha=0.01", "model.comm_aux_loss_alpha=0.01",  # per sequence (seq_aux): as DDP
    "scheduler=constant", "scheduler.warmup_steps=2", "val_before_fit=false"]  # constant: lr independent of max_steps


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "csv" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _val(run_dir: Path) -> dict[int, float]:
    return dict(json.loads((run_dir / "results.json").read_text())["val_history"])


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """train.py trainer=ep for 4 steps (checkpoints at steps 2 and 4), and the same run resumed from step 2."""
    root = tmp_path_factory.mktemp("ep")
    runs = {"ep4": root / "ep4", "resumed": root / "resumed"}
    common = [*CLI, "trainer=ep", "trainer.max_steps=4", f"paths.cache_dir={cache_dir}", "trainer.log_every_n_steps=1"]
    run_cli("train.py", *common, "callbacks.model_checkpoint.save_top_k=-1", f"hydra.run.dir={runs['ep4']}")
    run_cli("train.py", *common, f"ckpt_path={runs['ep4'] / 'checkpoints' / 'best-step2.ckpt'}",
            f"hydra.run.dir={runs['resumed']}")
    return runs


@pytest.mark.slow
def test_ep2_cli_run_resumes_mid_run_to_the_same_losses(ep_runs):
    full, resumed = _train_losses(ep_runs["ep4"]), _train_losses(ep_runs["resumed"])
    assert sorted(full) == [0, 1, 2, 3] and sorted(resumed) == [2, 3]
    for step in (2, 3):  # the real data module continues the sample stream where the checkpoint left it
        assert math.isclose(resumed[step], full[step], rel_tol=1e-6), (step, resumed[step], full[step])
    assert math.isclose(_val(ep_runs["resumed"])[4], _val(ep_runs["ep4"])[4], rel_tol=1e-6)
    res = json.loads((ep_runs["ep4"] / "results.json").read_text())
    assert res["world_size"] == 2 and res["config"]["n_group"] == 2
    # per-device load and tokens received per device, and both device losses, in the CSV
    header = (ep_runs["ep4"] / "csv" / "metrics.csv").open().readline()
    for key in ("train/moe/layer1/device_max_load", "train/moe/layer1/device1_tokens_received",
                "train/moe/layer1/device0_rows", "train/comm_balance", "train/device_balance", "train/grad_norm"):
        assert key in header, key


@pytest.mark.slow
def test_ep2_checkpoint_is_the_standard_state_dict_for_eval(ep_runs, tmp_path):
    from deepseek_mini.checkpoint import load_checkpoint

    last = ep_runs["ep4"] / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(last)  # one process, verified
    experts = [p for n, p in loaded.model.named_parameters() if n.endswith("experts.gate_up_proj")]
    assert experts and all(p.shape[0] == loaded.config.n_routed_experts for p in experts)
    run_cli("eval.py", f"ckpt_path={last}", "limit_batches=2", "max_new_tokens=4", "prompt=def ",
            f"hydra.run.dir={tmp_path / 'eval'}")
    assert math.isfinite(json.loads((tmp_path / "eval" / "eval.json").read_text())["loss"])
