"""Export a deepseek-mini checkpoint to a Hugging Face DeepseekV2 directory (no custom code needed).

    python scripts/export_hf.py logs/run/checkpoints/last.ckpt exports/tiny-hf
    python scripts/export_hf.py last.ckpt out/ --no-verify        # skip the transformers logits check

Writes config.json (model_type deepseek_v2, every field explicit), model.safetensors (hub per-expert
names) and, when a tokenizer.json sits beside the checkpoint, tokenizer.json + tokenizer_config.json.
Then, if transformers is installed, loads the directory with AutoModelForCausalLM and compares its
logits with ours on random tokens. Configs transformers cannot express (MHA/GQA/MQA baselines, sigmoid
scoring, bias balancing, ...) are refused with exit code 2; docs/hf_interop.md lists the rules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOLERANCE = 1e-4  # max abs logit difference accepted (fp32 rounding)


def verify(model, out_dir: Path, seq_len: int = 16) -> float:
    """Max abs difference between our logits and transformers' on the exported directory."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, min(seq_len, cfg.max_position_embeddings)), generator=gen)
    model = model.float().eval()
    with torch.no_grad():
        return (model(x).logits - hf(x).logits).abs().max().item()


def out_dir_problem(out_dir: Path) -> str | None:
    """Why `out_dir` cannot become the export directory (None: it can): a new or empty directory, where one can be
    made and written (run_config.dir_problem)."""
    from deepseek_mini.training.run_config import dir_problem

    out_dir = out_dir.expanduser().absolute()
    if out_dir.is_dir() and any(out_dir.iterdir()):
        # an older export's files (other shards, a tokenizer) would stay beside this one's and be read with it
        return f"directory {out_dir} is not empty; give a new or empty directory"
    return dir_problem(out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_path", help="a deepseek-mini Lightning .ckpt (or an HF directory to re-export)")
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--no-verify", action="store_true", help="do not load the result with transformers")
    p.add_argument("--no-tokenizer", action="store_true", help="do not export the tokenizer")
    args = p.parse_args(argv)

    from deepseek_mini.checkpoint import CheckpointError, load_checkpoint
    from deepseek_mini.config import ConfigError
    from deepseek_mini.interop.hf import HFExportError, HFImportError, export_hf

    problem = ("an empty path would be the current directory; give the export its own directory"
               if not args.out_dir.strip() else out_dir_problem(Path(args.out_dir)))
    if problem:  # before the checkpoint is read: export_hf's mkdir would raise a FileExistsError traceback after it
        print(f"error: out_dir={args.out_dir}: {problem}", file=sys.stderr)
        return 2
    try:
        loaded = load_checkpoint(args.ckpt_path)
        tokenizer = None if args.no_tokenizer else loaded.tokenizer
        written = export_hf(loaded.model, args.out_dir, tokenizer=tokenizer)
    except (HFExportError, HFImportError, CheckpointError, ConfigError) as e:
        print(f"error: cannot export {args.ckpt_path}: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    if tokenizer is None and not args.no_tokenizer:
        print("note: no tokenizer.json found beside the checkpoint; exported weights only")

    if args.no_verify:
        print(f"verdict: exported {args.out_dir} (not verified with transformers)")
        return 0
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(f"verdict: exported {args.out_dir} (transformers not installed: not verified)")
        return 0
    diff = verify(loaded.model, Path(args.out_dir))
    ok = diff <= TOLERANCE
    print(f"verdict: {'OK' if ok else 'MISMATCH'}: transformers AutoModelForCausalLM loads {args.out_dir}; "
          f"max abs logit difference {diff:.2e} ({'<=' if ok else '>'} {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
