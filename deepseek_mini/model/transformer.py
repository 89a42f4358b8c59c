"""The DeepSeek-V2 language model: embedding, pre-norm blocks (attention + dense MLP or MoE), head.

    h = x + Attn(RMSNorm(x));  out = h + FFN(RMSNorm(h))

FFN is a dense SwiGLU for the first `first_k_dense_replace` layers (DeepSeekMoE found routing in the
first layer balances slowly) and DeepSeekMoE afterwards. Module names mirror the Hugging Face hub
checkpoints (`model.layers.3.self_attn.kv_b_proj`, `model.layers.3.mlp.gate`, `lm_head`, ...).

With `num_nextn_predict_layers` = D > 0 the model also holds D multi-token prediction modules (`mtp`, mtp.py):
trained with the main loss, used by nothing else but speculative decoding (speculative.py), where they draft.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini.config import ModelConfig
from deepseek_mini.model.attention import MLA, build_attention
from deepseek_mini.model.layers import RMSNorm, SwiGLU
from deepseek_mini.model.loss import IGNORE_INDEX, LinearCrossEntropy
from deepseek_mini.model.moe import GroupedExperts, MoE, Router
from deepseek_mini.model.mtp import MTPModule, mtp_losses
from deepseek_mini.model.sampling import sample
from deepseek_mini.model.speculative import SpeculativeStats, speculative_stream


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # sum of aux_losses; the trainer adds it to `loss` itself
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    router_stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    # multi-token prediction (training only): lambda / D x sum_k CE_k, and the D unweighted CE_k
    mtp_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, cache=None, start_pos: int | torch.Tensor = 0):
        return self.feed_forward(self.attention(x, positions, cache, start_pos))

    # Two halves, each adding its own residual. The attention half is the same code in dense and MoE layers, so
    # regional compilation (training/compile.py) compiles it once for both kinds rather than inside each kind.
    def attention(self, x, positions, cache=None, start_pos: int | torch.Tensor = 0):
        return x + self.self_attn(self.input_layernorm(x), positions, cache, start_pos)

    def feed_forward(self, x):
        """x + FFN(RMSNorm(x)), the MoE's aux losses ({} if dense) and its router statistics (None if dense)."""
        if self.is_moe:
            h, aux, stats = self.mlp(self.post_attention_layernorm(x))
            return x + h, aux, stats
        return x + self.mlp(self.post_attention_layernorm(x)), {}, None


class Backbone(nn.Module):
    """Named `model` inside DeepSeekV2 so parameter names match the hub's `model.*`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekV2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.head_loss = LinearCrossEntropy()  # the training step's head + loss (no parameters)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.num_nextn_predict_layers:
            # built without drawing from the global RNG (reset_parameters draws every weight, the trunk's
            # first), so a seed gives the main model the same initial weights with and without MTP; built on a
            # GPU (torch.device context), that GPU's generator is the one drawn from
            device = torch.get_default_device()
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
                self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.num_hidden_layers + k))
                                         for k in range(cfg.num_nextn_predict_layers))
        else:
            self.mtp = None  # D = 0: exactly the plain model (no `mtp.*` names in the state dict)
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) everywhere; projections that write into the residual stream (o_proj,
        down_proj, the experts' down projections) get std / sqrt(2 * layers), GPT-2 style, so the
        residual's variance does not grow with depth. Norm weights start at 1."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if residual_out else std)
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_up_proj, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, out_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, cache=None, start_pos: int | torch.Tensor = 0):
        """The trunk: final hidden states [B, T, D] after the last norm (what the head reads), the summed aux
        losses and the router statistics (one dict per MoE layer). `start_pos` is where the T tokens go in the
        cache: one int for the batch, or a [B] tensor when rows sit at different positions (speculative decoding
        with per-row accepted lengths; the attention then writes, ropes and masks each row at its own place)."""
        B, T = input_ids.shape
        per_row = isinstance(start_pos, torch.Tensor)
        end = int(start_pos.max()) + T if per_row else start_pos + T
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {end} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if per_row:
            positions = start_pos[:, None] + torch.arange(T, device=input_ids.device)  # [B, T]
        else:
            positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        aux_losses: dict[str, torch.Tensor] = {}
        router_stats = []
        for i, layer in enumerate(self.model.layers):
            x, aux, stats = layer(x, positions, None if cache is None else cache[i], start_pos)
            for k, v in aux.items():
                aux_losses[k] = aux_losses[k] + v if k in aux_losses else v
            if stats is not None:
                router_stats.append(stats)
        return self.model.norm(x), aux_losses, router_stats

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache=None,
                start_pos: int = 0, return_logits: bool = True) -> ModelOutput:
        B, T = input_ids.shape
        x, aux_losses, router_stats = self.hidden_states(input_ids, cache, start_pos)
        logits = loss = None
        if labels is not None and not return_logits and torch.is_grad_enabled():
            # the training step: the head and its loss fused, the logits' gradient written with the loss (loss.py)
            loss = self.head_loss(x.reshape(B * T, -1), self.lm_head.weight, labels.reshape(-1))
        else:
            logits = self.lm_head(x)
            if labels is not None:
                logits_f = logits.to(torch.promote_types(logits.dtype, torch.float32))  # >= fp32
                loss = F.cross_entropy(logits_f.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
            if not return_logits:
                logits = None
        mtp_loss, per_depth = None, []
        if self.mtp is not None and labels is not None and cache is None and torch.is_grad_enabled():
            # multi-token prediction trains with the main loss; validation, eval and generation (no grad) skip it
            per_depth, mtp_aux = mtp_losses(self.mtp, self.model.embed_tokens, self.lm_head.weight, x, labels,
                                            self.head_loss)
            mtp_loss = self.config.mtp_loss_weight / len(per_depth) * sum(per_depth)
            for k, v in mtp_aux.items():  # the MTP blocks' experts balance like the trunk's
                aux_losses[k] = aux_losses[k] + v if k in aux_losses else v
        aux_loss = sum(aux_losses.values()) if aux_losses else x.new_zeros((), dtype=torch.float32)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, aux_losses=aux_losses,
                           router_stats=router_stats, mtp_loss=mtp_loss, mtp_losses=per_depth)

    # ------------------------------------------------------------------ balancing / modes
    def update_expert_bias(self, all_reduce=None) -> None:
        """Aux-loss-free balancing step (DeepSeek-V3); call after each optimizer step."""
        if not (self.config.is_moe and self.config.bias_update_speed > 0):
            return  # no router has a bias: skip walking the module tree on every training step
        for module in self.modules():
            if isinstance(module, Router):
                module.update_bias(all_reduce)

    def set_mla_decode(self, mode: str) -> None:
        if mode not in ("absorb", "naive"):
            raise ValueError(f"MLA decode mode must be 'absorb' or 'naive', got {mode!r}")
        for module in self.modules():
            if isinstance(module, MLA):
                module.decode_mode = mode

    # ------------------------------------------------------------------ inference
    @contextlib.contextmanager
    def folded_weights(self):
        """Inference with weights derived once instead of at every step: W_UK folded into MLA's query projection, as
        the paper writes the absorption, and the concatenations fused_linears would copy at every batched step
        (MLA.fold, SwiGLU.fold), and a 16-bit MoE's router and shared experts in one GEMM (MoE.fold). generate()
        decodes inside it. The folded copies are read only by forwards that differentiate nothing, and they do not
        follow changes to the weights: change none inside the block. Nested blocks fold once; the outermost one
        drops the copies when it ends."""
        folded = [m for m in self.modules() if isinstance(m, (MLA, MoE, SwiGLU)) and m.fold()]
        try:
            yield self
        finally:
            for m in folded:
                m.unfold()

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        """A preallocated (static) cache per layer: latents for MLA, K/V for the baselines."""
        ref = self.lm_head.weight
        device = device or ref.device
        dtype = dtype or ref.dtype
        return [layer.self_attn.new_cache(batch_size, max_len, device, dtype) for layer in self.model.layers]

    @torch.no_grad()
    def generate_stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                        generator: torch.Generator | None = None, speculative: bool = False,
                        stats: SpeculativeStats | None = None,
                        prompt_lengths: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yields the next token [B] at each step: prefill once, then one cached decode step per token.

        speculative=True drafts with the MTP modules and verifies the drafts in one forward (speculative.py):
        the same tokens as greedy decoding at temperature 0, the same distribution when sampling; `stats`
        (a SpeculativeStats) collects the acceptance per depth and per row.

        prompt_lengths [B] (optional): ragged prompts, right-padded: row b's prompt is input_ids[b, :length_b]
        and its continuation starts at position length_b (each row at its own cache position)."""
        B, T = input_ids.shape
        lengths = None if prompt_lengths is None else torch.as_tensor(prompt_lengths, device=input_ids.device).long()
        if lengths is not None and (lengths.shape != (B,) or int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"prompt_lengths must hold {B} lengths in 1..{T}, got {prompt_lengths}")
        with self.folded_weights():
            if speculative:
                yield from speculative_stream(self, input_ids, max_new_tokens, temperature, top_k, top_p,
                                              eos_token_id, generator, stats, lengths)
            else:
                yield from self._decode_stream(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                               generator, lengths)

    def _decode_stream(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator, lengths):
        """Plain decoding: prefill once, then one cached forward per new token."""
        B, T = input_ids.shape
        max_len = T + max_new_tokens
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        cache = self.new_cache(B, max_len, device=input_ids.device)
        logits = self(input_ids, cache=cache, start_pos=0).logits
        # ragged rows: each row's last prompt token, then per-row decode positions (the scalar path otherwise)
        logits = logits[:, -1] if lengths is None else logits[torch.arange(B, device=logits.device), lengths - 1]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                finished |= token == eos_token_id
            yield token
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                return
            logits = self(token[:, None], cache=cache, start_pos=T + i if lengths is None else lengths + i).logits[:, -1]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, speculative: bool = False,
                 stats: SpeculativeStats | None = None, prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Returns [B, T + new] token ids. temperature=0 means greedy. speculative, prompt_lengths: see
        generate_stream (with ragged prompts row b's new tokens are out[b, T:], after its padded prompt)."""
        was_training = self.training
        self.eval()
        try:
            new = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, top_p,
                                            eos_token_id, generator, speculative, stats, prompt_lengths))
        finally:
            self.train(was_training)
        return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids
