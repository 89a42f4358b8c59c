"""ModelConfig: one validated description of a deepseek-mini model.

Field names are those of Hugging Face's `DeepseekV2Config`, so a config moves between this project,
transformers and the DeepSeek hub checkpoints by renaming nothing. A few fields are ours:

* `attention`     mla (DeepSeek-V2) or the baselines mha / gqa / mqa, so every comparison is one change.
* `mtp_loss_weight` lambda of the multi-token prediction loss (`num_nextn_predict_layers` is the HF
                  DeepseekV3 name for the number of MTP modules).
* `head_dim`      per-head q/k/v width of the baselines (default: v_head_dim, the paper's d_h).
* balancing       `aux_loss_alpha` (expert level, alpha1), `device_aux_loss_alpha` (alpha2),
                  `comm_aux_loss_alpha` (alpha3), `seq_aux`, `bias_update_speed` (gamma of the
                  auxiliary-loss-free method) and `capacity_factor` (token dropping while training).

Everything here is arithmetic on the config: parameter counts, KV-cache size and FLOPs are computed
analytically, so they work for the 236B shape without allocating a single weight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")
TOPK_METHODS = ("greedy", "group_limited_greedy")
SCORING_FUNCS = ("softmax", "sigmoid")


class ConfigError(ValueError):
    """A bad model setting. The message names the field and the rule it breaks."""


@dataclass
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # gqa groups; None = num_attention_heads (mha), 1 for mqa
    attention: str = "mla"
    # MLA
    q_lora_rank: int | None = None  # None = no query compression (V2-Lite style)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    head_dim: int | None = None  # baselines only; None = v_head_dim
    # feed-forward
    intermediate_size: int = 384  # dense SwiGLU width (first_k_dense_replace layers, dense models)
    moe_intermediate_size: int = 64  # width of each routed / shared expert
    n_routed_experts: int | None = 8  # None or 0 = dense model
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    # routing
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # balancing (defaults: DeepSeek-V2-Lite's expert-level loss, alpha1 = 0.001, per sequence)
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    device_aux_loss_alpha: float = 0.0
    comm_aux_loss_alpha: float = 0.0
    bias_update_speed: float = 0.0  # gamma > 0 turns on DeepSeek-V3 bias balancing
    capacity_factor: float | None = None  # None = dropless; else drop lowest-affinity tokens in training
    # positions and norms
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None or {"type": "yarn", "factor": ..., ...}
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # multi-token prediction (DeepSeek-V3 section 2.2; model/mtp.py)
    num_nextn_predict_layers: int = 0  # D sequential MTP modules; 0 = none (the plain model)
    mtp_loss_weight: float = 0.3  # lambda: the training loss adds lambda / D x the sum of the D depths' losses

    def __post_init__(self):
        self._check_types()  # before anything below reads a field
        if self.n_routed_experts == 0:
            self.n_routed_experts = None
        if self.num_key_value_heads is None:
            self.num_key_value_heads = 1 if self.attention == "mqa" else self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.v_head_dim
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ validation
    def _check_types(self) -> None:
        """Every field holds a value of its declared type: a word where a number belongs (`rms_norm_eps=abc` from
        the command line or a hand-edited config), a float where an integer belongs, a number where a flag belongs.
        Checked before any rule compares the value, so the refusal is a ConfigError naming the field, not a
        TypeError from a comparison. Floats must be finite: nan or inf in a model setting is never meant."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = [k.strip() for k in str(f.type).split("|")]
            if (value is None and "None" in kinds) or any(_is_kind(value, k) for k in kinds):
                continue
            allowed = [_KIND_NAMES[k] for k in kinds if k != "None"] + (["None"] if "None" in kinds else [])
            raise ConfigError(f"ModelConfig.{f.name}={value!r}: must be {' or '.join(allowed)}")

    def validate(self) -> None:
        def fail(name, rule):
            raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: {rule}")

        self._check_types()

        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "head_dim", "intermediate_size", "max_position_embeddings",
                    "moe_layer_freq"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, "must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", "must be a positive integer or None (no query compression)")
        if self.attention not in ATTENTION_TYPES:
            fail("attention", f"must be one of {', '.join(ATTENTION_TYPES)}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if self.attention != "mla" and self.head_dim % 2:
            fail("head_dim", "must be even for the mha/gqa/mqa baselines (RoPE rotates pairs)")
        if self.attention == "mha" and self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", "must equal num_attention_heads for attention=mha")
        if self.attention == "mqa" and self.num_key_value_heads != 1:
            fail("num_key_value_heads", "must be 1 for attention=mqa")
        if self.attention == "gqa" and self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads} for attention=gqa")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be > 0")
        if self.initializer_range <= 0:
            fail("initializer_range", "must be > 0")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be > 0")
        if isinstance(self.num_nextn_predict_layers, bool) or not isinstance(self.num_nextn_predict_layers, int) \
                or self.num_nextn_predict_layers < 0:
            fail("num_nextn_predict_layers", "must be an integer >= 0 (0 = no multi-token prediction)")
        if isinstance(self.mtp_loss_weight, bool) or not isinstance(self.mtp_loss_weight, (int, float)) \
                or not math.isfinite(self.mtp_loss_weight) or self.mtp_loss_weight < 0:
            fail("mtp_loss_weight", "must be a finite number >= 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                fail("rope_scaling", "must be None or a dict with type 'yarn'")
            # YaRN's numbers (float() of a word raised a ValueError, nan trained to a nan loss)
            for key in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                value = self.rope_scaling.get(key)
                if value is not None and not _is_kind(value, "float"):
                    fail("rope_scaling", f"its {key}={value!r} must be a finite number")
            if float(self.rope_scaling.get("factor", 0)) < 1:
                fail("rope_scaling", "needs factor >= 1")
            original = self.rope_scaling.get("original_max_position_embeddings")
            if original is not None and (not _is_kind(original, "int") or original <= 0):
                fail("rope_scaling", f"its original_max_position_embeddings={original!r} must be a positive integer")
        if not self.is_moe:
            return
        moe_ints = ["n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group"]
        for name in moe_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(name, "must be a positive integer")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            fail("n_shared_experts", "must be an integer >= 0")
        if not isinstance(self.first_k_dense_replace, int) or self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", "must be an integer >= 0")
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(self, name) % 8:
                fail(name, "must be a multiple of 8 for an MoE model (grouped_mm needs 16-byte aligned bf16 rows)")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            fail("n_routed_experts", f"must be divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be <= n_group={self.n_group}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"must be one of {', '.join(TOPK_METHODS)}")
        if self.topk_method == "group_limited_greedy":
            per_group = self.n_routed_experts // self.n_group
            if self.topk_group * per_group < self.num_experts_per_tok:
                fail("topk_group", f"topk_group * experts per group ({per_group}) must be >= num_experts_per_tok")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"must be one of {', '.join(SCORING_FUNCS)}")
        if self.scoring_func == "sigmoid" and not self.norm_topk_prob:
            fail("norm_topk_prob", "must be true with scoring_func=sigmoid (V3 renormalises the selected sigmoid scores)")
        if self.routed_scaling_factor <= 0:
            fail("routed_scaling_factor", "must be > 0")
        for name in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha", "bias_update_speed"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", "must be > 0 or None (dropless)")
        if self.first_k_dense_replace >= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be < num_hidden_layers={self.num_hidden_layers} for an MoE model "
                 "(set n_routed_experts=null for a dense model)")

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: MoE from layer first_k_dense_replace on, every moe_layer_freq layers."""
        return (self.is_moe and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the MoE layers, in order (router statistics come one per MoE layer, in this order)."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)

    def kv_cache_elements_per_token(self) -> int:
        """Values cached per token over all layers for the configured attention."""
        if self.attention == "mla":
            per_layer = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_layer = 2 * self.num_key_value_heads * self.head_dim
        return per_layer * self.num_hidden_layers

    def kv_cache_bytes_per_token(self, bytes_per_element: float = 2) -> float:
        return self.kv_cache_elements_per_token() * bytes_per_element

    def softmax_scale(self) -> float:
        """1/sqrt(q.k width), times YaRN's mscale^2 when YaRN is on (DeepSeek-V2 remote code)."""
        width = self.qk_head_dim if self.attention == "mla" else self.head_dim
        scale = width ** -0.5
        if self.rope_scaling is not None:
            factor = float(self.rope_scaling["factor"])
            mscale_all_dim = float(self.rope_scaling.get("mscale_all_dim", 0) or 0)
            if mscale_all_dim:
                m = yarn_mscale(factor, mscale_all_dim)
                scale = scale * m * m
        return scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_KIND_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
               "dict[str, Any]": "a mapping"}


def _is_kind(value: Any, kind: str) -> bool:
    """`value` is of the annotated `kind` (bool is not an int here, and an int is a float)."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return kind.startswith("dict") and isinstance(value, Mapping)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- presets
# `tiny` trains on a 2-core CPU in minutes; `small` is the GPU benchmark shape; `lite` and `v2` are the
# released DeepSeek-V2-Lite and DeepSeek-V2 shapes, for counting and for loading weights.
_V2_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                 intermediate_size=384, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=1024),
    "small": dict(vocab_size=16384, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  kv_lora_rank=256, q_lora_rank=384, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  intermediate_size=2048, moe_intermediate_size=384, n_routed_experts=64, n_shared_experts=2,
                  num_experts_per_tok=6, first_k_dense_replace=1, max_position_embeddings=2048),
    "lite": dict(vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                 kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                 num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
                 routed_scaling_factor=1.0, rope_scaling=_V2_YARN, max_position_embeddings=163840),
    "v2": dict(vocab_size=102400, hidden_size=5120, num_hidden_layers=60, num_attention_heads=128,
               kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
               intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2,
               num_experts_per_tok=6, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=8,
               topk_group=3, routed_scaling_factor=16.0, aux_loss_alpha=0.003, device_aux_loss_alpha=0.05,
               comm_aux_loss_alpha=0.02, rope_scaling=_V2_YARN, max_position_embeddings=163840),
}
# Baselines at the tiny / small shapes. The dense models keep the active FFN width of the MoE ones
# (shared + top-k experts): same active compute, no routing.
PRESETS["tiny_dense"] = {**PRESETS["tiny"], "n_routed_experts": None, "first_k_dense_replace": 0,
                         "intermediate_size": 3 * 64}
PRESETS["small_dense"] = {**PRESETS["small"], "n_routed_experts": None, "first_k_dense_replace": 0,
                          "intermediate_size": 8 * 384}
for _shape in ("tiny", "small"):
    PRESETS[f"{_shape}_mha"] = {**PRESETS[_shape], "attention": "mha"}
    PRESETS[f"{_shape}_gqa"] = {**PRESETS[_shape], "attention": "gqa", "num_key_value_heads": 2}
    PRESETS[f"{_shape}_mqa"] = {**PRESETS[_shape], "attention": "mqa", "num_key_value_heads": 1}


# ---------------------------------------------------------------------- counting
@dataclass
class ParameterCount:
    total: int
    active: int  # per token: everything a token's forward touches, except the embedding lookup
    embedding: int
    attention: int = 0
    dense_mlp: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    router: int = 0
    # multi-token prediction modules (training and speculative drafting only): not in total / active above,
    # which describe the main model; the embedding and output head they share are not counted again
    mtp: int = 0
    mtp_active: int = 0  # per token, through all D modules

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def attention_parameters(cfg: ModelConfig) -> int:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.attention == "mla":
        q_width = h * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            q = d * q_width
        else:
            q = d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * q_width
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
        kv += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + h * cfg.v_head_dim * d
    hd, kvh = cfg.head_dim, cfg.num_key_value_heads
    return d * h * hd + 2 * d * kvh * hd + h * hd * d


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Total and active parameter counts of the main model, and of the MTP modules apart, analytically (no
    weights are allocated)."""
    d, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    norms = 2 * d * n_layers + d
    attn = attention_parameters(cfg) * n_layers
    n_moe = cfg.num_moe_layers
    n_dense = n_layers - n_moe
    swiglu = lambda width: 3 * d * width  # noqa: E731  gate, up, down
    dense_mlp = n_dense * swiglu(cfg.intermediate_size)
    routed = shared = router = routed_active = 0
    if n_moe:
        routed = n_moe * cfg.n_routed_experts * swiglu(cfg.moe_intermediate_size)
        routed_active = n_moe * cfg.num_experts_per_tok * swiglu(cfg.moe_intermediate_size)
        shared = n_moe * swiglu(cfg.n_shared_experts * cfg.moe_intermediate_size)
        router = n_moe * cfg.n_routed_experts * d
    total = embed + head + norms + attn + dense_mlp + routed + shared + router
    # The output head is a matmul every token pays for; with tied embeddings it is the embedding matrix.
    active = (head or embed) + norms + attn + dense_mlp + routed_active + shared + router
    mtp = mtp_active = 0
    for layer_idx in range(n_layers, n_layers + cfg.num_nextn_predict_layers):
        # enorm, hnorm, eh_proj [d, 2d], shared_head.norm, then a block: its two norms, attention and FFN
        common = 3 * d + 2 * d * d + 2 * d + attention_parameters(cfg)
        if cfg.is_moe_layer(layer_idx):
            ffn = (swiglu(cfg.n_shared_experts * cfg.moe_intermediate_size) + cfg.n_routed_experts * d)
            mtp += common + ffn + cfg.n_routed_experts * swiglu(cfg.moe_intermediate_size)
            mtp_active += common + ffn + cfg.num_experts_per_tok * swiglu(cfg.moe_intermediate_size)
        else:
            mtp += common + swiglu(cfg.intermediate_size)
            mtp_active += common + swiglu(cfg.intermediate_size)
    return ParameterCount(total=total, active=active, embedding=embed, attention=attn, dense_mlp=dense_mlp,
                          routed_experts=routed, shared_experts=shared, router=router, mtp=mtp,
                          mtp_active=mtp_active)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul parameters + the attention score/value term.

    The attention term follows the PaLM / torchtitan convention, 6 * layers * heads * (qk + v width) * seq_len
    (forward 2 + backward 4 for q.k^T and p.v, causal half not discounted), so MFU figures compare
    directly with those projects'. Norm weights are left out: they are not matmuls.

    MTP modules (num_nextn_predict_layers > 0) are training compute too: each adds its active matmul parameters,
    one more pass through the shared output head and one more attention term (depth k's window is k positions
    shorter; that difference is ignored).
    """
    counts = count_parameters(cfg)
    matmul_params = counts.active - (2 * cfg.hidden_size * cfg.num_hidden_layers + cfg.hidden_size)
    if cfg.attention == "mla":
        width = cfg.qk_head_dim + cfg.v_head_dim
        matmul_params -= cfg.num_hidden_layers * (cfg.kv_lora_rank + (cfg.q_lora_rank or 0))  # latent norms
    else:
        width = 2 * cfg.head_dim
    D = cfg.num_nextn_predict_layers
    matmul_params += counts.mtp_active - D * 5 * cfg.hidden_size + D * cfg.vocab_size * cfg.hidden_size
    if cfg.attention == "mla":
        matmul_params -= D * (cfg.kv_lora_rank + (cfg.q_lora_rank or 0))
    attn = 6 * (cfg.num_hidden_layers + D) * cfg.num_attention_heads * width * seq_len
    return 6.0 * matmul_params + attn
