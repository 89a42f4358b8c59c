"""What the kernel micro-benchmarks (fp8_grouped_mm.py, triton_grouped_mm.py) share: the GPU time of a small piece
of work, the experts' rows of a random routing, their command line (the model shape and the repetitions) and their
JSON record."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from deepseek_mini.config import PRESETS

DOCS_BENCH = Path(__file__).resolve().parents[2] / "docs" / "bench"


def gpu_median_ms(fn, warmup: int, reps: int, inner: int = 10) -> float:
    """Median over `reps` of the mean of `inner` back-to-back calls of fn between two CUDA events.

    The calls queue up behind each other on the GPU, so what is timed is the GPU's work, not the host's launch: one
    call per event pair also timed the Python and launch overhead of each call whenever the GPU waited for it (a
    torch.compile'd function's guards, a Triton launcher), which a training step replaying CUDA graphs does not pay.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return sorted(times)[len(times) // 2]


def expert_rows(rows: int, experts: int, top_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of rows // top_k tokens by the top-k of random logits (about balanced): (the cumulative rows per
    expert, int32: the grouped GEMMs' `offs`; the token of each row once the rows are sorted by expert, by token
    within an expert)."""
    idx = torch.randn(rows // top_k, experts, device=device).topk(top_k, dim=-1).indices.reshape(-1)
    order = torch.sort(idx, stable=True).indices
    counts = torch.bincount(idx, minlength=experts)
    return counts.cumsum(0).to(torch.int32), order // top_k


def shape_parser(description: str, stem: str, reps: int) -> argparse.ArgumentParser:
    """--preset, --batch, --seq-len (the tokens of one step), --warmup, --reps, --out (default docs/bench/<stem>_<date>.json)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--out", default=None, help=f"JSON path (default docs/bench/{stem}_<date>.json)")
    ap.set_defaults(stem=stem)
    return ap


def record(args, **fields) -> dict:
    """The JSON record's head: when, where, the exact command and the shape; then `fields`."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "command": " ".join(["python", *sys.argv]), "preset": args.preset,
            "tokens": args.batch * args.seq_len, **fields}


def write(result: dict, args) -> Path:
    out = Path(args.out or DOCS_BENCH / f"{args.stem}_{time.strftime('%Y-%m-%d')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return out
