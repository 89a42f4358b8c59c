"""Hugging Face interop: export to / import from transformers' built-in DeepseekV2 layout.

    export_hf(model, out_dir, tokenizer)       config.json + model.safetensors (+ tokenizer files) that
                                               `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`
                                               loads with no custom code and the same logits
    load_hf_directory(path)                    such a directory, or one laid out like DeepSeek-V2-Lite's
                                               hub checkpoint, as a DeepSeekV2
    from_pretrained(path) / save_pretrained(model, out_dir)   the same two, under transformers' names

A one-way adapter: it imports the model, the model never imports it.

The two layouts differ in one place only: we stack the routed experts (`mlp.experts.gate_up_proj`
[E, 2I, D], gate rows first; `mlp.experts.down_proj` [E, D, I]); the hub stores them one by one
(`mlp.experts.{e}.{gate,up,down}_proj.weight`). We write the per-expert names, which transformers v4 and
v5 both load (v5 fuses them at load time), and read either form.

What transformers' DeepseekV2 cannot express is refused (HFExportError / HFImportError, the message names
the field) rather than exported into a model that silently computes something else; docs/hf_interop.md
lists every rule. transformers is never imported here: the files are plain JSON and safetensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from deepseek_mini.config import ModelConfig, yarn_mscale
from deepseek_mini.model import DeepSeekV2

__all__ = ["HFExportError", "HFImportError", "config_from_hf", "config_to_hf", "export_hf", "from_pretrained",
           "load_hf_directory", "read_hf_state_dict", "save_pretrained", "state_dict_from_hf", "state_dict_to_hf",
           "write_hf_tokenizer"]

# end-of-document token names, in order of preference (ours is <|endoftext|>, id 0)
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# our balancing / training-only fields, written as config.json extras (transformers keeps and ignores them)
_TRAINING_EXTRAS = ("aux_loss_alpha", "seq_aux", "device_aux_loss_alpha", "comm_aux_loss_alpha",
                    "bias_update_speed", "capacity_factor")


class HFExportError(ValueError):
    """A model transformers' DeepseekV2 cannot express exactly; the message names the field."""


class HFImportError(ValueError):
    """A Hugging Face directory / config / state dict this project cannot load exactly."""


# ---------------------------------------------------------------------- config
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


# ---------------------------------------------------------------------- weights
def state_dict_to_hf(model) -> dict[str, torch.Tensor]:
    """Our state dict under the hub's names: stacked experts split per expert, lm_head left out when tied
    (transformers re-ties it to model.embed_tokens.weight). Tensors are contiguous and unshared."""
    cfg = model.config
    config_to_hf(cfg)  # refuse what cannot be expressed before touching weights
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        name = name.replace("_orig_mod.", "")
        t = t.detach()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("mlp.gate.e_score_correction_bias"):
            raise HFExportError(f"{name}: transformers' DeepseekV2 has no expert score-correction bias")
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone().contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone().contiguous()
            continue
        if name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone().contiguous()
            continue
        out[name] = t.clone().contiguous()
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A hub / transformers DeepseekV2 state dict in our layout. Accepts per-expert names
    (`mlp.experts.{e}.gate_proj.weight` ...) and transformers v5's fused `mlp.experts.gate_up_proj` /
    `mlp.experts.down_proj` (already ours). A missing lm_head is the tied embedding."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # older exports save RoPE buffers; ours are rebuilt
            continue
        m = _EXPERT_RE.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for prefix, parts in experts.items():
        n = cfg.n_routed_experts or 0
        for kind in ("gate_proj", "up_proj", "down_proj"):
            have = sorted(parts.get(kind, {}))
            if have != list(range(n)):
                raise HFImportError(f"{prefix}: expected {kind} for experts 0..{n - 1}, found {len(have)} "
                                    f"({have[:3]}...)")
        gate = torch.stack([parts["gate_proj"][e] for e in range(n)])
        up = torch.stack([parts["up_proj"][e] for e in range(n)])
        out[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    if cfg.tie_word_embeddings:
        # transformers ties lm_head to the embedding whatever the file holds
        if "model.embed_tokens.weight" in out:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, a sharded *.safetensors.index.json, or any *.safetensors."""
    from safetensors.torch import load_file

    from deepseek_mini.checkpoint import check_safetensors_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise HFImportError(f"{path}: no *.safetensors weights (pytorch_model.bin is not read; convert it first)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not (path / f).is_file():
            raise HFImportError(f"{path}: shard {f} named in the index is missing")
        sd.update(load_file(str(check_safetensors_file(path / f))))  # truncation / not safetensors: one line
    return sd


def load_hf_directory(path: str | os.PathLike, dtype: torch.dtype | None = None) -> DeepSeekV2:
    """A DeepSeekV2 (eval mode) from a Hugging Face DeepseekV2 directory: config.json + safetensors.
    Weights keep the model's fp32 parameters unless `dtype` is given."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFImportError(f"{path}: no config.json")
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
    sd = state_dict_from_hf(read_hf_state_dict(path), cfg)
    model = DeepSeekV2(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise HFImportError(f"{path}: weights do not match config.json: missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise HFImportError(f"{path}: {k} has shape {tuple(v.shape)}, "
                                f"config.json implies {tuple(expected[k].shape)}")
    model.load_state_dict(sd)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# ---------------------------------------------------------------------- tokenizer + export
def _special_token(tok, candidates=_EOS_CANDIDATES) -> tuple[str | None, int | None]:
    for name in candidates:
        i = tok.token_to_id(name)
        if i is not None:
            return name, i
    return None, None


def write_hf_tokenizer(tokenizer, out_dir: str | os.PathLike, model_max_length: int | None = None) -> list[Path]:
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast, bos = eos = <|endoftext|>) +
    special_tokens_map.json, so `AutoTokenizer.from_pretrained(out_dir)` loads it offline and encodes exactly
    as the `tokenizers.Tokenizer` does (no special tokens are added around the text)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    eos, _ = _special_token(tokenizer)
    special = {"bos_token": eos, "eos_token": eos} if eos else {}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = model_max_length
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]


def export_hf(model, out_dir: str | os.PathLike, tokenizer=None) -> list[Path]:
    """Write config.json + model.safetensors (+ tokenizer files) for transformers' DeepseekV2.

    Refuses (HFExportError) before writing anything if the config cannot be expressed. Returns the paths."""
    from safetensors.torch import save_file

    bos = eos = None
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer))
        _, eos = _special_token(tokenizer)
        bos = eos
    sd = state_dict_to_hf(model)  # also validates the config
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    dtype = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    config = config_to_hf(model.config, bos_token_id=bos, eos_token_id=eos, torch_dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    os.chmod(out / "model.safetensors", (out / "config.json").stat().st_mode & 0o777)  # safetensors wrote 0600
    written = [out / "config.json", out / "model.safetensors"]
    if tokenizer is not None:
        written += write_hf_tokenizer(tokenizer, out, model_max_length=model.config.max_position_embeddings)
    return written


# ---------------------------------------------------------------------- transformers' names
def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | None = None) -> DeepSeekV2:
    """Load a Hugging Face DeepseekV2 directory (config.json + safetensors) as a DeepSeekV2: load_hf_directory."""
    return load_hf_directory(path, dtype=dtype)


def save_pretrained(model: DeepSeekV2, out_dir: str | os.PathLike, tokenizer=None) -> list[Path]:
    """Write a directory transformers' AutoModelForCausalLM loads with no custom code: export_hf."""
    return export_hf(model, out_dir, tokenizer=tokenizer)
