"""KV-cache report: MHA vs GQA vs MQA vs MLA at the same model shape (the DeepSeek-V2 paper's Table 1).

    python scripts/kv_cache_report.py                       # tiny, small, lite, v2 -> reports/kv_cache/{.md,.png}
    python scripts/kv_cache_report.py --ckpt logs/train/multiruns/<sweep>/0/checkpoints/last.ckpt --ckpt ...
    python scripts/kv_cache_report.py --measure --device cuda   # allocate caches, measured vs formula

GQA groups (defaults): 8 for v2 (the paper's Table 1), 4 for lite (16 heads), 2 for tiny and small (the
`*_gqa` ablation presets: 4 -> 2 and 12 -> 2 heads). Change them with --gqa-groups shape=n.
For each --ckpt: its attention type, KV bytes/token and the val loss of its weights (the run's validation at the
checkpoint's step: from the checkpoint's own history, else <run>/results.json's val_history; n/a when that step
was never validated).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepseek_mini.analysis.kv_cache import (  # noqa: E402
    DEFAULT_SHAPES,
    equivalent_gqa_groups,
    format_table,
    human_bytes,
    kv_cache_table,
    measure_kv_bytes,
    paper_comparison,
    plot_kv_cache,
    shape_variants,
)
from deepseek_mini.config import ConfigError, ModelConfig  # noqa: E402


def checkpoint_val_loss(path: Path, ckpt: dict | None) -> tuple[float | None, str]:
    """The validation loss of these weights: the run's validation at the checkpoint's step, from the checkpoint's
    own history (RunHistory), else from its run's results.json val_history (a best-step file of the weights only
    holds no history). A Hugging Face directory has no step: its run's final val_loss, when it lies in one. None
    when no validation was made at that step (the weights of an interrupted step were never validated)."""
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    results = [c for c in (run_dir / "results.json", path.parent / "results.json") if c.is_file()]
    step = (ckpt or {}).get("global_step")
    if isinstance(step, int):
        state = next((v for k, v in ((ckpt or {}).get("callbacks") or {}).items() if str(k).startswith("RunHistory")),
                     None)
        for history, source in [((state or {}).get("val_history"), f"{path.name}: its validation at step {step}"),
                                *((_read(c).get("val_history"), f"{c}: val_history at step {step}") for c in results)]:
            found = [v for s, v in history or [] if s == step]
            if found:
                return float(found[-1]), source
        return None, f"n/a: no validation at step {step}"
    for candidate in results:
        if isinstance(loss := _read(candidate).get("val_loss"), (int, float)):
            return float(loss), str(candidate)
    return None, "n/a"


def _read(results: Path) -> dict:
    """A results.json of ours, or {} (unreadable, or not a mapping)."""
    try:
        data = json.loads(results.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_rows(paths: list[str], context: int) -> list[dict]:
    """Config and val loss of each checkpoint, without building the model (reads config + callbacks only)."""
    from deepseek_mini.checkpoint import (
        CheckpointError,
        checkpoint_model_config,
        load_hf,
        read_lightning_checkpoint,
        verify_weights,
    )

    rows = []
    for p in paths:
        path = Path(p)
        if path.is_dir() and (path / "config.json").is_file():
            cfg, ckpt = load_hf(path).config, None  # the verified loader: damaged weights are refused
        else:
            ckpt = read_lightning_checkpoint(path)
            cfg = checkpoint_model_config(ckpt, path)
            if cfg is None:
                raise CheckpointError(f"{path} has no model_config")
            verify_weights(cfg, ckpt.pop("state_dict"), path)  # the numbers below are of the model the weights are
        loss, source = checkpoint_val_loss(path, ckpt)
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        row = kv_cache_table({f"{run_dir.name}/{cfg.attention}": cfg}, context)[0]
        row.update(label=f"{run_dir.name}/{path.name}", val_loss=loss, val_loss_source=source, path=str(path))
        rows.append(row)
    return rows


def measure(shapes: list[str], device: str, batch: int, max_len: int) -> str:
    """Allocate a bf16 cache (batch x max_len) per attention type of each preset shape; measured vs formula."""
    import torch

    from deepseek_mini.model import DeepSeekV2

    lines = [f"Measured KV cache allocation ({device}, bf16, batch {batch} x {max_len} tokens)", "",
             "| model | attention | measured bytes | formula bytes | measured / formula | source |",
             "|---|---|---:|---:|---:|---|"]
    for name, cfg in shape_variants(shapes).items():
        with torch.device("meta"):
            model = DeepSeekV2(cfg)  # no weights needed: new_cache only reads the config and the head's dtype
        try:
            r = measure_kv_bytes(model, batch, max_len, device=device, dtype=torch.bfloat16)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            lines.append(f"| {name.split('/')[0]} | {cfg.attention.upper()} | OOM | "
                         f"{int(cfg.kv_cache_bytes_per_token(2) * batch * max_len):,} | | |")
            continue
        lines.append(f"| {name.split('/')[0]} | {cfg.attention.upper()} | {r['measured_bytes']:,} | "
                     f"{r['formula_bytes']:,} | {r['ratio']:.4f} | {r['source']} |")
    return "\n".join(lines)


def gqa_groups(specs: list[str], shapes: list[str]) -> dict[str, int]:
    """--gqa-groups SHAPE=N ... -> {shape: N}; each SHAPE one of --shapes (another would be silently unused),
    N a positive integer that divides the shape's attention heads."""
    groups = {}
    for spec in specs:
        shape, sep, n = spec.partition("=")
        if not sep or not shape or not n.strip().isdigit() or int(n) < 1:
            raise ValueError(f"--gqa-groups {spec}: expected SHAPE=N with N a positive integer, e.g. tiny=2")
        if shape not in shapes:
            raise ValueError(f"--gqa-groups {spec}: {shape} is not one of --shapes ({', '.join(shapes)})")
        heads = ModelConfig.preset(shape).num_attention_heads
        if heads % int(n):
            raise ValueError(f"--gqa-groups {spec}: N must divide {shape}'s {heads} attention heads")
        groups[shape] = int(n)
    return groups


def check_args(args) -> None:
    """Every flag before any work: sizes positive, preset names known, --measure's device usable, the output paths
    directories (a size <= 0 was taken: --context -5 printed negative bytes; --measure-len -3 a traceback)."""
    from deepseek_mini.generation_args import parse_device

    for flag in ("context", "measure_batch", "measure_len"):
        value = getattr(args, flag)
        if value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value}: must be a positive integer")
    for flag, names in (("--shapes", args.shapes), ("--measure-shapes", args.measure_shapes if args.measure else [])):
        for name in names:
            try:
                ModelConfig.preset(name)
            except ConfigError as e:  # it names the presets there are
                raise ValueError(f"{flag}: {e}") from None
    if args.measure:
        try:
            parse_device(args.device)  # the device rule of eval.py and generate.py
        except ConfigError as e:
            raise ValueError(f"--{e}") from None  # "--device=foo: use auto, cpu or cuda ..."
    if args.png and Path(args.png).suffix.lower() not in (".png", ".svg", ".pdf"):
        # matplotlib would add .png to the name and the report would then look for the file it named
        raise ValueError(f"--png {args.png}: give the chart's file name with .png (or .svg, .pdf)")
    if not args.no_files:
        from deepseek_mini.training.run_config import dir_problem

        for flag, path in (("--out-dir", Path(args.out_dir)), ("--png", Path(args.png).parent if args.png else None)):
            if path is not None and (problem := dir_problem(path)) is not None:
                raise ValueError(f"{flag}: {problem}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="preset shapes (default: %(default)s)")
    ap.add_argument("--gqa-groups", nargs="*", default=[], metavar="SHAPE=N", help="GQA groups per shape")
    ap.add_argument("--context", type=int, default=131072, help="context length for the bytes column (128K)")
    ap.add_argument("--ckpt", action="append", default=[], help="checkpoint(s) to list with their val loss")
    ap.add_argument("--out-dir", default="reports/kv_cache", help="where kv_cache_report.md / .png / .json go")
    ap.add_argument("--png", default=None, help="chart path (default: <out-dir>/kv_cache.png)")
    ap.add_argument("--no-files", action="store_true", help="print only")
    ap.add_argument("--measure", action="store_true", help="allocate each cache and print measured vs formula")
    ap.add_argument("--device", default="auto", help="device for --measure (auto: cuda if available)")
    ap.add_argument("--measure-shapes", nargs="+", default=["tiny", "small", "lite"],
                    help="shapes to allocate for --measure (v2 MHA at 4 x 4K tokens would need 64 GB)")
    ap.add_argument("--measure-batch", type=int, default=4)
    ap.add_argument("--measure-len", type=int, default=4096)
    args = ap.parse_args(argv)

    try:
        check_args(args)
        groups = gqa_groups(args.gqa_groups, args.shapes)
        configs = shape_variants(args.shapes, groups)
        rows = kv_cache_table(configs, args.context)
        ck_rows = checkpoint_rows(args.ckpt, args.context) if args.ckpt else []
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    parts = ["# KV cache per token: MHA, GQA, MQA and MLA at the same model shape", "",
             f"Elements are per token over all layers; bytes in bf16; the context column is {args.context:,} tokens. "
             "'= GQA groups' is MLA's cache as a GQA group count, (kv_lora_rank + qk_rope_head_dim) / (2 x head_dim). "
             "GQA groups: " + ", ".join(f"{s} {configs[f'{s}/gqa'].num_key_value_heads}" for s in args.shapes) + ".",
             "", format_table(rows), ""]
    for s in args.shapes:
        cfg = configs[f"{s}/mla"]
        mha = configs[f"{s}/mha"]
        parts.append(f"- {s}: MLA {cfg.kv_cache_elements_per_token():,} elements/token = "
                     f"{equivalent_gqa_groups(cfg):.3g} GQA groups of head_dim {cfg.head_dim}; "
                     f"{mha.kv_cache_elements_per_token() / cfg.kv_cache_elements_per_token():.1f}x smaller than MHA")
    parts += ["", paper_comparison()]
    if ck_rows:
        parts += ["", "## Checkpoints: val loss beside cache size", "", format_table(ck_rows), ""]
        parts += [f"- {r['label']}: val loss from {r['val_loss_source']}" for r in ck_rows]
    if args.measure:
        from deepseek_mini.generation_args import parse_device

        parts += ["", measure(args.measure_shapes, str(parse_device(args.device)), args.measure_batch, args.measure_len)]
    text = "\n".join(parts)

    if not args.no_files:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = Path(args.png) if args.png else out / "kv_cache.png"
        plot_kv_cache(rows, png, checkpoints=ck_rows)  # + a val loss vs KV bytes panel for --ckpt
        (out / "kv_cache_report.md").write_text(text + f"\n\n![KV cache per token]({png.resolve()})\n")
        (out / "kv_cache_report.json").write_text(json.dumps({"rows": rows, "checkpoints": ck_rows}, indent=1))
        text += f"\n\nwrote {out / 'kv_cache_report.md'}, {out / 'kv_cache_report.json'} and {png} " \
                f"({human_bytes(png.stat().st_size)})"
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
