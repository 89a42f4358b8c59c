"""Sizing rules for sweeps: derive some model fields from others so the jobs of a sweep stay comparable.

`apply_sizing(model_dict, sizing_cfg)` runs on the flat model dict (cfg.model) before `ModelConfig` is
built; `sizing_cfg` is the top-level `sizing:` node of the sweep experiments (absent or empty = no change).
Rules, each off unless switched on:

* `iso_flop: true` with `reference: {n_routed_experts: E0, num_experts_per_tok: K0, moe_intermediate_size: I0}`
  keeps the active routed-expert FLOPs (and with `scale_topk` the total expert parameters) equal to the
  reference's as `n_routed_experts` (E) changes:
    - `scale_topk: true` is DeepSeekMoE's fine-grained expert segmentation: m = E / E0, top-k K = K0 * m and
      width I = I0 / m. K * I and E * I stay constant. K and I must come out as integers (ConfigError otherwise).
    - `scale_topk: false` keeps the model's own top-k K and sets I = I0 * K0 / K, so K * I stays constant:
      the active FLOPs are the reference's whatever E is, and total expert parameters grow with E.
  Shared experts have the same width I (as in DeepSeekMoE), so with `reference.n_shared_experts: S0` the shared
  count becomes S = S0 * I0 / I (their total width, and FLOPs, stay constant; must be an integer). Without
  S0 the shared experts are left alone and their FLOPs change with I. I is rounded to a multiple of 8 (MoE rows
  must be 16-byte aligned): exact with scale_topk, within 5 % otherwise, else ConfigError. The router
  (hidden_size x E per MoE layer) is the only active part that still grows with E.
* `dense_match_active: true`: a dense model (n_routed_experts null or 0) gets first_k_dense_replace=0 and the
  SwiGLU width that gives it the active parameter count of its MoE twin (this dict with the reference's E, K, I;
  without a reference, the model's own num_experts_per_tok / moe_intermediate_size and
  `dense_twin_experts`), rounded to a multiple of 8.
* `kv_heads: {gqa: 2, mqa: 1, ...}`: num_key_value_heads by attention type (for sweeps over model.attention).
* `match_attention_params: true`: for mha / gqa / mqa, head_dim is chosen (nearest even integer) so that the
  attention parameters per layer equal MLA's at the same hidden size, heads and MLA dims. Everything else is
  unchanged, so total and active parameters match MLA's to within the rounding of head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepseek_mini.config import ConfigError, ModelConfig, attention_parameters, count_parameters

ROUTING_FIELDS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
# Fields a sweep report / wandb shows as top-level columns even when they were derived rather than swept.
KEY_FIELDS = ("attention", "kv_lora_rank", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "num_key_value_heads", "head_dim", "intermediate_size")


def _get(cfg: Mapping | None, key: str, default=None):
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _round8(x: float, field: str, tolerance: float = 0.05) -> int:
    width = max(8, int(round(x / 8.0)) * 8)
    if abs(width - x) > tolerance * x:
        raise ConfigError(f"sizing: {field}={x:g} is not close to a multiple of 8 (nearest {width}); "
                          "choose a reference whose widths divide evenly")
    return width


def _reference(sizing: Mapping, model: dict) -> dict[str, int]:
    ref = _get(sizing, "reference")
    if ref is None:
        raise ConfigError("sizing.reference: iso_flop needs {n_routed_experts, num_experts_per_tok, "
                          "moe_intermediate_size} of the reference MoE")
    out = {}
    for name in (*ROUTING_FIELDS, "n_shared_experts"):
        value = _get(ref, name)
        if value is None and name == "n_shared_experts":
            continue  # optional: without it the shared experts are left as they are
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "n_shared_experts" else 1):
            raise ConfigError(f"sizing.reference.{name}={value!r}: must be a positive integer")
        out[name] = value
    return out


def _iso_flop(model: dict, sizing: Mapping) -> dict:
    if not model.get("n_routed_experts"):
        return model  # dense: nothing to segment
    ref = _reference(sizing, model)
    e0, k0, i0 = ref["n_routed_experts"], ref["num_experts_per_tok"], ref["moe_intermediate_size"]
    e = int(model["n_routed_experts"])
    if bool(_get(sizing, "scale_topk", False)):
        k, rem_k = divmod(k0 * e, e0)
        if rem_k:
            raise ConfigError(f"sizing: n_routed_experts={e} with scale_topk needs num_experts_per_tok = "
                              f"{k0}*{e}/{e0} to be an integer (reference {e0} experts, top-{k0})")
        if k < 1:
            raise ConfigError(f"sizing: n_routed_experts={e} gives num_experts_per_tok < 1 with scale_topk")
        width, rem_i = divmod(i0 * e0, e)
        if rem_i:
            raise ConfigError(f"sizing: n_routed_experts={e} with scale_topk needs moe_intermediate_size = "
                              f"{i0}*{e0}/{e} to be an integer")
        model["num_experts_per_tok"] = k
        model["moe_intermediate_size"] = _round8(width, "moe_intermediate_size", tolerance=0.0)
    else:
        k = int(model.get("num_experts_per_tok") or k0)
        model["moe_intermediate_size"] = _round8(i0 * k0 / k, "moe_intermediate_size")
    s0 = ref.get("n_shared_experts")
    if s0 is not None:  # keep the shared width S * I at the reference's S0 * I0
        shared, rem_s = divmod(s0 * i0, model["moe_intermediate_size"])
        if rem_s or (s0 and not shared):
            raise ConfigError(f"sizing: n_routed_experts={e} gives moe_intermediate_size="
                              f"{model['moe_intermediate_size']}, so n_shared_experts = {s0}*{i0}/"
                              f"{model['moe_intermediate_size']} must be an integer (reference shared width)")
        model["n_shared_experts"] = shared
    return model


def _dense_match_active(model: dict, sizing: Mapping) -> dict:
    if model.get("n_routed_experts"):
        return model
    twin = dict(model)
    ref = _get(sizing, "reference")
    if ref is not None:
        twin.update(_reference(sizing, model))
    else:
        twin["n_routed_experts"] = int(_get(sizing, "dense_twin_experts", 0)) or None
        if not twin["n_routed_experts"]:
            raise ConfigError("sizing.dense_match_active needs sizing.reference (or sizing.dense_twin_experts)")
    twin_cfg = ModelConfig.from_dict(twin)
    target = count_parameters(twin_cfg).active
    dense = {**model, "n_routed_experts": None, "first_k_dense_replace": 0}
    base = count_parameters(ModelConfig.from_dict({**dense, "intermediate_size": 8})).active
    per_unit = 3 * twin_cfg.hidden_size * twin_cfg.num_hidden_layers  # gate, up, down per unit of width
    dense["intermediate_size"] = max(8, int(round(((target - base) / per_unit + 8) / 8)) * 8)
    return dense


def _kv_heads(model: dict, sizing: Mapping) -> dict:
    table = _get(sizing, "kv_heads")
    if table:
        attn = model.get("attention", "mla")
        if attn in table:
            model["num_key_value_heads"] = table[attn]
    return model


def _match_attention_params(model: dict) -> dict:
    attn = model.get("attention", "mla")
    if attn == "mla":
        return model
    mla = ModelConfig.from_dict({**model, "attention": "mla", "num_key_value_heads": None, "head_dim": None})
    target = attention_parameters(mla)
    h = mla.num_attention_heads
    kvh = model.get("num_key_value_heads") or (1 if attn == "mqa" else h)
    per_dim = mla.hidden_size * (2 * h + 2 * kvh)  # q and o: h heads; k and v: kvh heads
    model["head_dim"] = max(2, 2 * int(round(target / per_dim / 2)))
    return model


def apply_sizing(model_dict: Mapping[str, Any], sizing_cfg: Mapping | None) -> dict:
    """Return a copy of the flat model dict with the sizing rules of `sizing_cfg` applied (see module doc)."""
    model = dict(model_dict)
    if not sizing_cfg:
        return model
    model = _kv_heads(model, sizing_cfg)
    if bool(_get(sizing_cfg, "match_attention_params", False)):
        model = _match_attention_params(model)
    if bool(_get(sizing_cfg, "iso_flop", False)):
        model = _iso_flop(model, sizing_cfg)
    if bool(_get(sizing_cfg, "dense_match_active", False)):
        model = _dense_match_active(model, sizing_cfg)
    return model


def wandb_sweep_fields(model: Mapping[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """Top-level config entries for wandb: the key model fields, plus the last component of every override key.

    wandb groups and plots by top-level config keys without any setup, so `kv_lora_rank`, `n_routed_experts`,
    `attention`, ... appear beside the nested `model` dict. Overrides like `optim.lr=1e-3` add `lr`; values come
    from the final (sized) config where possible, else the override's text.
    """
    out: dict[str, Any] = {k: model.get(k) for k in KEY_FIELDS if k in model}
    for item in overrides or []:
        if "=" not in item or item.startswith(("hydra", "~")):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if key.startswith(("paths.", "logger.", "callbacks.")) or key in ("experiment", "hparams_search"):
            continue
        leaf = key.rsplit(".", 1)[-1]
        if key.startswith("model."):
            out[leaf] = model.get(leaf, value)
        elif leaf not in out:
            out[leaf] = value
    return out

