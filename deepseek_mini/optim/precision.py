"""`optim.bf16_weights`: the weight matrices in bf16 during fit, their fp32 masters in the Triton AdamW.

Under bf16-mixed every GEMM reads its weight in bf16 anyway; keeping the weight itself in bf16 removes the
fp32 -> bf16 cast of every forward and the bf16 -> fp32 gradient cast of every backward, while the update
stays fp32 on the master (optim/adamw.py, keep_fp32_masters).
"""

from __future__ import annotations

import torch

from deepseek_mini.model.moe import GroupedExperts, Router
from deepseek_mini.optim import adamw


def check_bf16_weights(setting):
    if setting not in ("auto", True, False):
        raise ValueError(f"optim.bf16_weights={setting!r}: use auto, true or false")
    return setting


def bf16_weights_on(setting: bool | str, optimizer: torch.optim.Optimizer, *, on_cuda: bool, bf16_autocast: bool,
                    single_device: bool, accumulate: int = 1) -> bool:
    """optim.bf16_weights -> whether the weight matrices are kept in bf16 with fp32 masters in the optimizer.

    auto = wherever it is possible: the Triton AdamW (it owns the masters) on one CUDA device under
    bf16-mixed, without gradient accumulation. DDP and FSDP build their gradient buckets / flat parameters
    before the optimizer exists, so they keep fp32 parameters; and bf16 gradients summed over micro-batches
    would lose precision with every sum. true = the same, but an error names the condition that is not met.
    """
    if check_bf16_weights(setting) is False:
        return False
    missing = [why for ok, why in ((isinstance(optimizer, adamw.TritonAdamW), "the Triton AdamW (optim.fused=auto "
                                    "or triton, with triton installed)"), (on_cuda, "a CUDA device"),
                                   (bf16_autocast, "trainer.precision=bf16-mixed"),
                                   (single_device, "a single-device strategy (not DDP or FSDP)"),
                                   (accumulate == 1, "trainer.accumulate_grad_batches=1")) if not ok]
    if missing and setting is True:
        raise ValueError(f"optim.bf16_weights=true needs {', '.join(missing)}")
    return not missing


def bf16_weight_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights that only GEMMs read, which bf16-mixed runs in bf16 anyway: the routed-expert stacks, the
    routers and every nn.Linear (attention, MLPs, shared experts, LM head). Not the token embedding (a lookup,
    whose gradient sums many rows: it stays fp32, and so does an LM head tied to it) nor the norm weights."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            ps = list(m.parameters())
        elif isinstance(m, (torch.nn.Linear, Router)):
            ps = [m.weight]
        else:
            continue
        for p in ps:
            if id(p) not in embeddings and id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                out.append(p)
    return out
