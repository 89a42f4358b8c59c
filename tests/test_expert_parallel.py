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

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from model_helpers import SMALL_MODEL

from deepseek_mini.config import ModelConfig
from deepseek_mini.model import DeepSeekV2

EP_MODEL = dict(SMALL_MODEL, topk_method="group_limited_greedy", n_group=2, topk_group=1, aux_loss_alpha=0.01,
                device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02)
B, S = 3, 16  # per rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args, world: int = 2) -> None:
    """Run fn(rank, world, port, *args) in `world` gloo processes."""
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _batch(cfg: ModelConfig, world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B * world, S), generator=g)
    return x, torch.roll(x, -1, dims=1)


# ---------------------------------------------------------------------- forward + backward equivalence
def _grads_worker(rank, world, port, seq_aux, out_dir):
    from deepseek_mini.model.expert_parallel import shard_experts

    _init(rank, world, port)
    cfg = ModelConfig.from_dict(dict(EP_MODEL, seq_aux=seq_aux))
    torch.manual_seed(0)
    model = DeepSeekV2(cfg).train()
    names = set(shard_experts(model, dist.group.WORLD))
    x, y = _batch(cfg, world)
    rows = slice(rank * B, (rank + 1) * B)
    out = model(x[rows], labels=y[rows], return_logits=False)
    (out.loss + out.aux_loss).backward()
    # the loss of the global batch is the mean of the ranks' losses: average every gradient over the ranks
    # (an expert's local gradient already sums both ranks' tokens, so it is divided by the world size)
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.clone()
        if n not in names:
            dist.all_reduce(g)
        grads[n] = g / world
    losses = {k: v.detach().clone() for k, v in out.aux_losses.items()}
    for v in [out.loss.detach().clone(), *losses.values()]:
        dist.all_reduce(v)
    torch.save({"grads": grads, "names": sorted(names), "loss": out.loss.detach() / world,
                "aux": {k: v for k, v in out.aux_losses.items()}, "stats": out.router_stats},
               Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("seq_aux", [True, False])
def test_ep2_forward_backward_equals_one_process(tmp_path, seq_aux):
    _spawn(_grads_worker, seq_aux, str(tmp_path))
    cfg = ModelConfig.from_dict(dict(EP_MODEL, seq_aux=seq_aux))
    torch.manual_seed(0)
    ref = DeepSeekV2(cfg).train()
    x, y = _batch(cfg, 2)
    out = ref(x, labels=y, return_logits=False)
    (out.loss + out.aux_loss).backward()
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]
    assert r[0]["names"], "no expert was sharded"
    assert set(out.aux_losses) == {"expert_balance", "device_balance", "comm_balance"}
    # losses: the CE of the global batch is the mean of the ranks'; the balance losses per sequence too, and
    # over the batch each rank computes the loss from the EP group's counts with its own P (mean = global)
    torch.testing.assert_close(r[0]["loss"] + r[1]["loss"], out.loss, rtol=1e-5, atol=1e-6)
    for k, v in out.aux_losses.items():
        torch.testing.assert_close((r[0]["aux"][k] + r[1]["aux"][k]) / 2, v.detach(), rtol=1e-5, atol=1e-7)
    E, half = cfg.n_routed_experts, cfg.n_routed_experts // 2
    for n, p in ref.named_parameters():
        if n in r[0]["names"]:  # rank 0 holds experts 0..E/2-1, rank 1 the rest
            torch.testing.assert_close(torch.cat([r[0]["grads"][n], r[1]["grads"][n]]), p.grad, rtol=1e-4, atol=1e-6)
            assert r[0]["grads"][n].shape[0] == half and p.shape[0] == E
        else:
            torch.testing.assert_close(r[0]["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # device-limited routing with M = topk_group = 1: every token's experts sit on one device
    tpd = r[0]["stats"][0]["tokens_per_device"]
    assert tpd.sum() == B * S, "each token is sent to exactly one of the 2 devices"
