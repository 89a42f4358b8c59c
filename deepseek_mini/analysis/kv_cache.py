"""Inference-side arithmetic and measurement: the KV-cache table of the DeepSeek-V2 paper, its chart, the
93.3% comparison with DeepSeek 67B, and an allocator measurement of a real cache.

Used by scripts/kv_cache_report.py, scripts/generate.py, scripts/bench/bench_decode.py and eval.py. Everything
except `measure_kv_bytes` is analytic (it works for the 236B shape without allocating a weight).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from deepseek_mini.config import ModelConfig

BF16 = 2  # bytes per element of the cache the table is quoted in

# DeepSeek 67B (the paper's dense baseline): 95 layers, GQA with 8 KV heads of 128 dims.
DS67B_LAYERS, DS67B_KV_HEADS, DS67B_HEAD_DIM = 95, 8, 128
V2_KV_BITS = 6  # the paper deploys V2 with its KV cache quantised to about 6 bits per element on average (§3.2.3)

# GQA groups used by the default report, per shape: the paper's Table 1 uses 8 for V2; 4 for V2-Lite (16 heads);
# tiny / small use the 2-group `*_gqa` ablation presets (num_attention_heads // 2 for tiny, // 6 for small).
DEFAULT_GQA_GROUPS = {"tiny": 2, "small": 2, "lite": 4, "v2": 8}
DEFAULT_SHAPES = ("tiny", "small", "lite", "v2")


def equivalent_gqa_groups(cfg: ModelConfig) -> float:
    """MLA's cache expressed as GQA groups of the same head width: (d_c + d_h^R) / (2 d_h); 2.25 for V2."""
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.head_dim)


def with_attention(cfg: ModelConfig, attention: str, groups: int | None = None) -> ModelConfig:
    """The same model shape with another attention type (head width = cfg.head_dim, i.e. d_h)."""
    kv_heads = {"mha": cfg.num_attention_heads, "mqa": 1, "mla": cfg.num_attention_heads}.get(attention, groups)
    if attention == "gqa" and groups is None:
        raise ValueError("gqa needs a group count")
    return cfg.replace(attention=attention, num_key_value_heads=kv_heads)


def shape_variants(shapes=DEFAULT_SHAPES, gqa_groups: dict[str, int] | None = None) -> dict[str, ModelConfig]:
    """{"<shape>/<attention>": config} for MHA, GQA, MQA and MLA at each preset shape."""
    groups = {**DEFAULT_GQA_GROUPS, **(gqa_groups or {})}
    out = {}
    for shape in shapes:
        base = ModelConfig.preset(shape)
        g = groups.get(shape, max(1, base.num_attention_heads // 4))
        for att in ("mha", "gqa", "mqa", "mla"):
            out[f"{shape}/{att}"] = with_attention(base, att, g)
    return out


def human_bytes(n: float) -> str:
    """Decimal units, as the paper's "KB/token" (1 KB = 1000 B)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:,.0f} {unit}"
    return f"{n:,.0f} B"


def kv_cache_table(configs: dict[str, ModelConfig], context: int = 131072) -> list[dict[str, Any]]:
    """One row per config: KV elements / bytes (bf16) per token, bytes for `context` tokens, the ratio to MHA
    at the same shape and, for MLA, the equivalent GQA group count. Names "shape/attention" split into columns."""
    rows = []
    for name, cfg in configs.items():
        shape, _, _ = name.partition("/")
        elems = cfg.kv_cache_elements_per_token()
        mha = with_attention(cfg, "mha").kv_cache_elements_per_token()
        rows.append({
            "name": name,
            "shape": shape,
            "attention": cfg.attention,
            "kv_heads": None if cfg.attention == "mla" else cfg.num_key_value_heads,
            "layers": cfg.num_hidden_layers,
            "elements_per_token": elems,
            "bytes_per_token_bf16": elems * BF16,
            "context": context,
            "bytes_context_bf16": elems * BF16 * context,
            "fraction_of_mha": elems / mha,
            "equivalent_gqa_groups": equivalent_gqa_groups(cfg) if cfg.attention == "mla" else None,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `kv_cache_table` rows (plus val_loss when rows carry one)."""
    if not rows:
        return ""
    ctx = rows[0]["context"]
    ctx_label = f"{ctx // 1024}K" if ctx % 1024 == 0 else f"{ctx:,}"
    has_loss = any("val_loss" in r for r in rows)
    head = ["model", "attention", "KV heads", "KV elements / token", "bytes / token (bf16)",
            f"{ctx_label}-token context (bf16)", "vs MHA", "= GQA groups"]
    if has_loss:
        head.append("val loss")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        groups = r["equivalent_gqa_groups"]
        cells = [r.get("label", r["shape"]), r["attention"].upper(),
                 "latent" if r["kv_heads"] is None else str(r["kv_heads"]),
                 f"{r['elements_per_token']:,}", _bytes_cell(r["bytes_per_token_bf16"]),
                 human_bytes(r["bytes_context_bf16"]), f"{100 * r['fraction_of_mha']:.1f}%",
                 "" if groups is None else f"{groups:.3g}"]
        if has_loss:
            loss = r.get("val_loss")
            cells.append("n/a" if loss is None else f"{loss:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bytes_cell(n: float) -> str:
    return f"{n:,.0f}" + (f" ({human_bytes(n)})" if n >= 1000 else "")


def paper_comparison_numbers() -> dict[str, float]:
    ds67b = 2 * DS67B_LAYERS * DS67B_KV_HEADS * DS67B_HEAD_DIM
    v2 = ModelConfig.preset("v2").kv_cache_elements_per_token()
    ds67b_bytes = ds67b * BF16
    v2_quant = v2 * V2_KV_BITS / 8
    v2_bf16 = v2 * BF16
    return {"ds67b_elements": ds67b, "ds67b_bytes_bf16": ds67b_bytes, "v2_elements": v2,
            "v2_bytes_6bit": v2_quant, "v2_bytes_bf16": v2_bf16,
            "reduction_quantized": 1 - v2_quant / ds67b_bytes, "reduction_bf16": 1 - v2_bf16 / ds67b_bytes}


def paper_comparison() -> str:
    """How the paper's "93.3% less KV cache than DeepSeek 67B" arises, and what it is without quantisation."""
    n = paper_comparison_numbers()
    return "\n".join([
        "DeepSeek-V2 vs DeepSeek 67B KV cache (paper: 93.3% reduction)",
        f"- DeepSeek 67B: {DS67B_LAYERS} layers x {DS67B_KV_HEADS} KV heads x {DS67B_HEAD_DIM} dims x 2 (K and V) = "
        f"{n['ds67b_elements']:,} elements/token = {n['ds67b_bytes_bf16']:,.0f} B ({n['ds67b_bytes_bf16'] / 1e3:.0f} KB) "
        "per token in bf16",
        f"- DeepSeek-V2 (MLA): 60 layers x (512 + 64) = {n['v2_elements']:,} elements/token; at the ~{V2_KV_BITS}-bit "
        f"KV quantisation the paper deploys: {n['v2_bytes_6bit']:,.0f} B ({n['v2_bytes_6bit'] / 1e3:.1f} KB) per token",
        f"- reduction: 1 - {n['v2_bytes_6bit'] / 1e3:.1f} / {n['ds67b_bytes_bf16'] / 1e3:.0f} = "
        f"{100 * n['reduction_quantized']:.1f}%  (the paper's figure: 6-bit V2 cache against a bf16 67B cache)",
        f"- without quantisation (both bf16): V2 {n['v2_bytes_bf16']:,.0f} B ({n['v2_bytes_bf16'] / 1e3:.1f} KB) vs "
        f"{n['ds67b_bytes_bf16'] / 1e3:.0f} KB -> {100 * n['reduction_bf16']:.1f}% reduction from the architecture alone",
    ])


def plot_kv_cache(rows: list[dict[str, Any]], path: str | Path, title: str | None = None,
                  checkpoints: list[dict[str, Any]] | None = None) -> Path:
    """Horizontal bar chart, log x-axis: KV cache bytes per token (bf16), one bar per attention type per shape.

    With `checkpoints` (rows with val_loss, e.g. kv_cache_report.py --ckpt) a second panel plots each
    checkpoint's validation loss against its KV bytes per token: the trade-off the bars alone cannot show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mha": "#d62728", "gqa": "#ff7f0e", "mqa": "#7f7f7f", "mla": "#1f77b4"}
    order = ["mha", "gqa", "mqa", "mla"]
    shapes = list(dict.fromkeys(r.get("label", r["shape"]) for r in rows))
    by_key = {(r.get("label", r["shape"]), r["attention"]): r for r in rows}
    bar_h = 0.8 / len(order)
    ck = [r for r in checkpoints or [] if r.get("val_loss") is not None]
    height = 1.1 + 1.15 * len(shapes)
    if ck:
        fig, (ax, ax_ck) = plt.subplots(1, 2, figsize=(16, max(height, 4.5)), gridspec_kw={"width_ratios": [10, 6]})
    else:
        fig, ax = plt.subplots(figsize=(10, height))
    for j, att in enumerate(order):
        ys, xs, texts = [], [], []
        for i, shape in enumerate(shapes):
            r = by_key.get((shape, att))
            if r is None:
                continue
            ys.append(i + (j - (len(order) - 1) / 2) * bar_h)
            xs.append(r["bytes_per_token_bf16"])
            extra = f" (GQA-{r['kv_heads']})" if att == "gqa" else ""
            texts.append(f"{human_bytes(r['bytes_per_token_bf16'])}{extra}")
        if not xs:
            continue
        label = {"mha": "MHA", "gqa": "GQA", "mqa": "MQA", "mla": "MLA (latent c_KV + k_R)"}[att]
        ax.barh(ys, xs, height=bar_h * 0.9, color=colors[att], label=label)
        for y, x, t in zip(ys, xs, texts):
            ax.text(x * 1.08, y, t, va="center", fontsize=7.5)
    ax.set_xscale("log")
    ax.set_yticks(range(len(shapes)))
    ax.set_yticklabels(shapes)
    ax.invert_yaxis()
    xmax = max(r["bytes_per_token_bf16"] for r in rows)
    ax.set_xlim(min(r["bytes_per_token_bf16"] for r in rows) / 2, xmax * 12)
    ax.set_xlabel("KV cache per token (bytes, bf16, all layers; log scale)")
    ax.set_ylabel("model shape")
    ax.set_title(title or "KV cache per token: MHA vs GQA vs MQA vs MLA at the same model shape")
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    if ck:
        for r in ck:
            att = str(r.get("attention", "mla")).lower()
            ax_ck.scatter(r["bytes_per_token_bf16"], r["val_loss"], s=50, color=colors.get(att, "k"), zorder=3)
            ax_ck.annotate(str(r.get("label", r.get("shape", ""))), (r["bytes_per_token_bf16"], r["val_loss"]),
                           textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
        ax_ck.set_xscale("log")
        ax_ck.margins(x=0.25, y=0.2)  # room for the centred labels at both ends
        ax_ck.set_xlabel("KV cache per token (bytes, bf16; log scale)")
        ax_ck.set_ylabel("validation loss (nats/token)")
        ax_ck.set_title("Checkpoints: val loss vs KV cache")
        ax_ck.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")  # the value labels right of the longest bars stay in
    plt.close(fig)
    return path


def cache_nbytes(cache) -> int:
    """Bytes held by a model.new_cache(...) list (LatentCache / KVCache per layer)."""
    total = 0
    for layer in cache:
        for t in vars(layer).values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def measure_kv_bytes(model, batch: int, max_len: int, device=None, dtype=None) -> dict[str, Any]:
    """Allocate model.new_cache(batch, max_len) and return the measured bytes next to the formula's.

    On CUDA "measured" is the torch.cuda.memory_allocated delta (what the allocator really handed out);
    elsewhere it is the sum of the cache tensors' nbytes."""
    ref = model.lm_head.weight
    device = torch.device(device) if device is not None else ref.device
    dtype = dtype or ref.dtype
    elem = torch.empty((), dtype=dtype).element_size()
    formula = int(model.config.kv_cache_bytes_per_token(elem) * batch * max_len)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        cache = model.new_cache(batch, max_len, device=device, dtype=dtype)
        torch.cuda.synchronize(device)
        measured = torch.cuda.memory_allocated(device) - before
        source = "torch.cuda.memory_allocated delta"
    else:
        cache = model.new_cache(batch, max_len, device=device, dtype=dtype)
        measured = cache_nbytes(cache)
        source = "sum of cache tensor nbytes"
    del cache
    return {"attention": model.config.attention, "batch": batch, "max_len": max_len, "dtype": str(dtype).split(".")[-1],
            "device": str(device), "measured_bytes": int(measured), "formula_bytes": formula,
            "ratio": measured / formula if formula else math.nan, "source": source}
