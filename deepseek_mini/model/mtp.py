"""Multi-token prediction (DeepSeek-V3, section 2.2): D sequential modules that predict tokens further ahead.

Module k (k = 1..D) at position i sees the representation of depth k-1 at i and the embedding of token
t_{i+k}, and predicts t_{i+k+1}:

    h'_k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1})])      concatenation, then one linear projection
    h_k  = Block(h'_k)                                          one transformer block (MLA + MoE or dense)
    logits_k = lm_head(shared_head.norm(h_k))                   the main model's output head

h_0 is the main model's final hidden state after its last norm (what its head reads). The embedding and the
head are the main model's own (shared, not copied); each module owns enorm, hnorm, eh_proj, its block and
the norm before the head. The paper writes the concatenation as [h ; Emb]; the released DeepSeek-V3
checkpoint's `eh_proj` takes the embedding half first (as vLLM and SGLang read it), and so do we, so our
exported weights mean the same thing as the hub's.

Names follow transformers' DeepseekV3 layout for the extra layer `model.layers.{num_hidden_layers + k - 1}`
(`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, and the block's `input_layernorm`, `self_attn.*`,
`post_attention_layernorm`, `mlp.*`): ours are `mtp.{k-1}.*`, with the block one level down (`mtp.{k-1}.block.*`,
the trunk's own `Block` class); interop/hf.py maps the two.

Training uses the modules through `mtp_losses`; plain inference never calls them. Self-speculative decoding
(speculative.py) runs them one position at a time as a drafter, each with its own latent cache.
"""

from __future__ import annotations

import torch
from torch import nn

from deepseek_mini.config import ModelConfig
from deepseek_mini.model.layers import RMSNorm
from deepseek_mini.model.loss import IGNORE_INDEX


class SharedHead(nn.Module):
    """The norm before the (shared) output head; named like DeepseekV3's `shared_head` (whose `head` is ours)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(nn.Module):
    """One MTP depth: the input combiner, one transformer block (built by the caller: the trunk's `Block` at
    layer index num_hidden_layers + k - 1) and the norm before the shared head."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = block
        self.shared_head = SharedHead(cfg)

    def forward(self, h_prev_BTD, emb_BTD, positions, cache=None, start_pos: int | torch.Tensor = 0):
        """h_k [B, T, D] (before shared_head.norm), and the block's aux losses and router stats."""
        x_BTD = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1))
        return self.block(x_BTD, positions, cache, start_pos)


def mtp_hidden_states(modules: nn.ModuleList, embed: nn.Embedding, h0_BTD: torch.Tensor, labels_BT: torch.Tensor):
    """Yields (h_k [B, T-k, D], aux losses) for k = 1..D, h_k before shared_head.norm.

    `labels` are the main model's targets (labels[:, i] = t_{i+1}, -100 = ignored), so depth k at position i
    reads token t_{i+k} = labels[:, i+k-1] (an ignored one is embedded as token 0; its loss is dropped). The
    sequence gets one position shorter per depth: the last k positions have no token k+1 ahead in the window.
    Causal: depth k at position i depends on tokens up to t_{i+k} only (the block attends to positions <= i).
    """
    T = h0_BTD.shape[1]
    h_BTD = h0_BTD
    for k, module in enumerate(modules, start=1):
        n = T - k
        if n <= 0:
            raise ValueError(f"num_nextn_predict_layers={len(modules)} needs sequences longer than {len(modules)} "
                             f"tokens, got {T}")
        tokens_BN = labels_BT[:, k - 1:k - 1 + n]
        positions = torch.arange(n, device=h0_BTD.device)
        h_BTD, aux, _ = module(h_BTD[:, :n], embed(tokens_BN.clamp_min(0)), positions)
        yield h_BTD, aux


def mtp_losses(modules: nn.ModuleList, embed: nn.Embedding, head_weight_VD: torch.Tensor, h0_BTD: torch.Tensor,
               labels_BT: torch.Tensor, head_loss: nn.Module) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The D cross-entropies CE_1..CE_D (unweighted means over labelled tokens; CE_k predicts t_{i+k+1} =
    labels[:, i+k]) through the fused head + loss of loss.py (`head_loss`: the model's LinearCrossEntropy), and
    the MTP blocks' summed aux losses."""
    B = h0_BTD.shape[0]
    losses: list[torch.Tensor] = []
    aux_losses: dict[str, torch.Tensor] = {}
    for k, (h_BND, aux) in enumerate(mtp_hidden_states(modules, embed, h0_BTD, labels_BT), start=1):
        n = h_BND.shape[1]
        inputs_BN = labels_BT[:, k - 1:k - 1 + n]
        targets_BN = labels_BT[:, k:k + n].masked_fill(inputs_BN == IGNORE_INDEX, IGNORE_INDEX)  # an unknown input: no loss
        for name, v in aux.items():
            aux_losses[name] = aux_losses[name] + v if name in aux_losses else v
        x_ND = modules[k - 1].shared_head.norm(h_BND).reshape(B * n, -1)
        losses.append(head_loss(x_ND, head_weight_VD, targets_BN.reshape(-1)))
    return losses, aux_losses
