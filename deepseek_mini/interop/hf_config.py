"""config.json <-> ModelConfig for transformers' built-in DeepseekV2 (the config half of hf.py's adapter).

What DeepseekV2's config cannot express is refused (HFExportError / HFImportError, the message names the field);
docs/hf_interop.md lists every rule.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from deepseek_mini.config import ModelConfig, yarn_mscale

# our balancing / training-only fields, written as config.json extras (transformers keeps and ignores them)
_TRAINING_EXTRAS = ("aux_loss_alpha", "seq_aux", "device_aux_loss_alpha", "comm_aux_loss_alpha",
                    "bias_update_speed", "capacity_factor", "mtp_loss_weight")


class HFExportError(ValueError):
    """A model transformers' DeepseekV2 cannot express exactly; the message names the field."""


class HFImportError(ValueError):
    """A Hugging Face directory / config / state dict this project cannot load exactly."""


def _hf_moe_layers(num_layers: int, first_k_dense_replace: int) -> list[bool]:
    """transformers' rule: MoE for every layer_idx >= first_k_dense_replace (moe_layer_freq is ignored)."""
    return [i >= first_k_dense_replace for i in range(num_layers)]


def _yarn_hf(scaling: dict[str, Any], rope_theta: float) -> dict[str, Any]:
    """Our YaRN settings as explicit rope parameters. Defaults are resolved the way our rope.py resolves them
    (DeepSeek's remote code), and `attention_factor` (the cos/sin multiplier) is written only where
    transformers would otherwise infer a different one (it uses mscale/mscale_all_dim only when both are set)."""
    factor = float(scaling["factor"])
    mscale = float(scaling.get("mscale", 1) or 0)
    mscale_all_dim = float(scaling.get("mscale_all_dim", 0) or 0)
    out = {"rope_type": "yarn", "rope_theta": float(rope_theta), "factor": factor,
           "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 4096)),
           "beta_fast": float(scaling.get("beta_fast", 32)), "beta_slow": float(scaling.get("beta_slow", 1)),
           "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    ours = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    theirs = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
              else yarn_mscale(factor))
    if ours != theirs:
        out["attention_factor"] = ours
    return out


def config_to_hf(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 torch_dtype: str = "float32") -> dict[str, Any]:
    """A complete transformers DeepseekV2 config.json dict (every field explicit) for `cfg`.

    Raises HFExportError, naming the field, for what transformers' DeepseekV2 would compute differently.
    Training-only settings (balancing losses, bias speed 0, capacity factor) never change a forward pass in
    eval mode, so they are exported as ignored extras and the exported model is exact.
    """
    def refuse(name, why):
        raise HFExportError(f"ModelConfig.{name}={getattr(cfg, name)!r}: {why}")

    if cfg.attention != "mla":
        refuse("attention", "transformers' DeepseekV2 is MLA-only; exporting the mha/gqa/mqa baselines to the "
               "DeepseekV2 layout is not supported (their k_proj/v_proj weights have no place in it)")
    if cfg.is_moe:
        if cfg.scoring_func != "softmax":
            refuse("scoring_func", "transformers' DeepseekV2 router is softmax-only (sigmoid scoring is DeepSeek-V3)")
        if cfg.bias_update_speed > 0:
            refuse("bias_update_speed", "bias balancing selects experts with mlp.gate.e_score_correction_bias, "
                   "which transformers' DeepseekV2 does not have (it is DeepSeek-V3's)")
        if cfg.norm_topk_prob and not (cfg.topk_method == "greedy" and cfg.num_experts_per_tok == cfg.n_routed_experts):
            refuse("norm_topk_prob", "transformers' DeepseekV2 ignores norm_topk_prob (it never renormalises the "
                   "top-k gate weights), so the exported model would compute different outputs")
        ours = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
        if ours != _hf_moe_layers(cfg.num_hidden_layers, cfg.first_k_dense_replace):
            refuse("moe_layer_freq", "transformers' DeepseekV2 ignores moe_layer_freq (every layer from "
                   "first_k_dense_replace on is MoE), so the MoE layers would not be the same")
        if cfg.n_shared_experts == 0:
            refuse("n_shared_experts", "transformers' DeepseekV2 always adds a shared-expert MLP; 0 shared experts "
                   "cannot be expressed")
    if cfg.tie_word_embeddings not in (True, False):
        refuse("tie_word_embeddings", "must be a bool")

    n_layers = cfg.num_hidden_layers
    d: dict[str, Any] = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": n_layers,
        # DeepseekV3's name: the MTP modules are stored as layers num_hidden_layers.. (interop/hf.py); transformers'
        # DeepseekV2 keeps the value as an unused attribute and drops those layers' weights when it loads
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,  # MLA: every head has its own k/v (re-expanded)
        "head_dim": cfg.qk_rope_head_dim,  # what transformers sets it to (it sizes the RoPE table)
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        # a dense model is every layer dense: first_k_dense_replace = num_hidden_layers
        "n_routed_experts": cfg.n_routed_experts if cfg.is_moe else 1,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok if cfg.is_moe else 1,
        "first_k_dense_replace": cfg.first_k_dense_replace if cfg.is_moe else n_layers,
        "moe_layer_freq": cfg.moe_layer_freq,
        "topk_method": cfg.topk_method,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "scoring_func": cfg.scoring_func,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": float(cfg.routed_scaling_factor),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,  # the v4 name
    }
    # RoPE: v5 reads rope_parameters; v4 and DeepSeek's remote code read rope_theta + rope_scaling. All agree.
    if cfg.rope_scaling is None:
        d["rope_theta"] = float(cfg.rope_theta)
        d["rope_scaling"] = None
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    else:
        params = _yarn_hf(cfg.rope_scaling, cfg.rope_theta)
        d["rope_theta"] = float(cfg.rope_theta)
        d["rope_parameters"] = params
        legacy = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
        d["rope_scaling"] = {"type": "yarn", **legacy}
    for name in _TRAINING_EXTRAS:
        d[name] = getattr(cfg, name)
    return d


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from v4 keys (rope_theta + rope_scaling) or v5's rope_parameters.
    As in transformers v5, a non-null rope_scaling wins over rope_parameters."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    params = dict(params)
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise HFImportError(f"rope type {kind!r} is not supported (only default RoPE and DeepSeek's YaRN)")
    if params.get("truncate", True) is False:
        raise HFImportError("rope_parameters.truncate=false (untruncated YaRN correction range) is not supported")
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or d.get("max_position_embeddings")
    if factor is None:  # transformers' rule (DeepSeek-V3 style configs)
        factor = d["max_position_embeddings"] / original
    scaling = {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original),
               "beta_fast": float(params.get("beta_fast") or 32), "beta_slow": float(params.get("beta_slow") or 1),
               "mscale": float(params.get("mscale", 1) or 0),
               "mscale_all_dim": float(params.get("mscale_all_dim", 0) or 0)}
    # what transformers multiplies cos/sin by must be what our rope.py computes from mscale / mscale_all_dim
    f, m, mad = scaling["factor"], scaling["mscale"], scaling["mscale_all_dim"]
    theirs = params.get("attention_factor")
    if theirs is None:
        theirs = yarn_mscale(f, m) / yarn_mscale(f, mad) if m and mad else yarn_mscale(f)
    ours = yarn_mscale(f, m) / yarn_mscale(f, mad)
    if not math.isclose(float(theirs), ours, rel_tol=1e-6):
        raise HFImportError(f"rope_parameters: YaRN attention_factor {float(theirs)} differs from "
                            f"mscale(factor, mscale) / mscale(factor, mscale_all_dim) = {ours}, which is what "
                            "deepseek-mini computes")
    return theta, scaling


def config_from_hf(d: dict[str, Any] | str | os.PathLike) -> ModelConfig:
    """A ModelConfig from a DeepseekV2 config.json (dict or path): ours, transformers v4/v5's, or the hub's
    (DeepSeek-V2-Lite: rope_scaling yarn dict, q_lora_rank null, topk_method, n_group, aux_loss_alpha, ...).

    Raises HFImportError for settings where transformers and DeepSeek's remote code would disagree, or that
    deepseek-mini does not implement."""
    if not isinstance(d, dict):
        d = json.loads(Path(d).read_text())

    def refuse(name, why):
        raise HFImportError(f"config.json {name}={d.get(name)!r}: {why}")

    if d.get("model_type", "deepseek_v2") != "deepseek_v2":
        refuse("model_type", "only deepseek_v2 (DeepSeek-V2 / V2-Lite layout) is supported")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "only silu (SwiGLU) experts are implemented")
    for name in ("attention_bias", "mlp_bias"):
        if d.get(name):
            refuse(name, "biases are not implemented")
    heads = d["num_attention_heads"]
    if d.get("num_key_value_heads") not in (None, heads):
        refuse("num_key_value_heads", f"MLA needs num_key_value_heads == num_attention_heads ({heads})")
    n_layers = d["num_hidden_layers"]
    n_routed = d.get("n_routed_experts", d.get("num_experts"))
    first_k = int(d.get("first_k_dense_replace", 0) or 0)
    is_moe = bool(n_routed) and first_k < n_layers
    topk_method = d.get("topk_method") or "greedy"
    if topk_method == "gready":  # a typo in some released configs
        topk_method = "greedy"
    moe_layer_freq = int(d.get("moe_layer_freq", 1) or 1)
    scoring = d.get("scoring_func", "softmax")
    norm_topk = bool(d.get("norm_topk_prob", False))
    top_k = d.get("num_experts_per_tok")
    if is_moe:
        if topk_method not in ("greedy", "group_limited_greedy"):
            refuse("topk_method", "transformers' DeepseekV2 supports greedy and group_limited_greedy only")
        if scoring != "softmax":
            refuse("scoring_func", "transformers' DeepseekV2 scores experts with softmax only")
        if top_k is None:
            refuse("num_experts_per_tok", "must be set for an MoE model")
        if norm_topk and not (topk_method == "greedy" and top_k == n_routed):
            refuse("norm_topk_prob", "transformers' DeepseekV2 ignores it while DeepSeek's remote code renormalises; "
                   "the checkpoint's outputs are ambiguous")
        ours = [i >= first_k and i % moe_layer_freq == 0 for i in range(n_layers)]
        if ours != _hf_moe_layers(n_layers, first_k):
            refuse("moe_layer_freq", "transformers' DeepseekV2 ignores it, so it and DeepSeek's remote code build "
                   "different MoE layers")
        if not d.get("n_shared_experts"):
            refuse("n_shared_experts", "transformers' DeepseekV2 always has shared experts")
    rope_theta, rope_scaling = _rope_from_hf(d)
    kw: dict[str, Any] = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=n_layers,
        num_attention_heads=heads, attention="mla", q_lora_rank=d.get("q_lora_rank"),
        kv_lora_rank=d["kv_lora_rank"], qk_nope_head_dim=d["qk_nope_head_dim"],
        qk_rope_head_dim=d["qk_rope_head_dim"], v_head_dim=d["v_head_dim"],
        intermediate_size=d["intermediate_size"],
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), initializer_range=float(d.get("initializer_range", 0.02)),
        max_position_embeddings=d["max_position_embeddings"], tie_word_embeddings=bool(d.get("tie_word_embeddings")),
        rope_theta=rope_theta, rope_scaling=rope_scaling,
        num_nextn_predict_layers=int(d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0),
    )
    if is_moe:
        kw.update(n_routed_experts=n_routed, n_shared_experts=d["n_shared_experts"], num_experts_per_tok=top_k,
                  moe_intermediate_size=d["moe_intermediate_size"], first_k_dense_replace=first_k,
                  moe_layer_freq=moe_layer_freq, topk_method=topk_method, n_group=d.get("n_group") or 1,
                  topk_group=d.get("topk_group") or 1, scoring_func=scoring, norm_topk_prob=norm_topk,
                  routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)))
    else:
        # every layer dense; keep the MoE shape fields when they are valid, they are not used
        kw.update(n_routed_experts=None, first_k_dense_replace=first_k)
        if d.get("moe_intermediate_size"):
            kw["moe_intermediate_size"] = d["moe_intermediate_size"]
    for name in _TRAINING_EXTRAS:
        if name in d:
            kw[name] = d[name]
    # a bias-balanced model cannot come from a DeepseekV2 directory (no e_score_correction_bias there)
    kw["bias_update_speed"] = 0.0
    return ModelConfig(**kw)
