"""Helpers of scripts/bench/multi_gpu.sh: token-cache preparation, loss-sequence comparison, the summary table.

    python scripts/bench/multi_gpu.py prepare <train.py overrides...>   build tokenizer + token caches, one process
    python scripts/bench/multi_gpu.py compare REF_RUN RESUMED_RUN FROM_STEP    train/loss after FROM_STEP, step by step
    python scripts/bench/multi_gpu.py summary OUT                            the table of every run under OUT/runs
    python scripts/bench/multi_gpu.py device_limit OUT RUN...                 tokens received per device, val loss

`prepare` composes the training config exactly as train.py does (same overrides) and runs the data module's
prepare_data(), so the multi-process runs that follow find the caches and never build them on several ranks.
`compare` reads both runs' csv/metrics.csv (the resumed run's file keeps its rows before the resume step and
appends the rest) and prints how many logged steps are bit-identical and the largest difference.
`summary` reads each run's results.json (tokens_per_sec counts all ranks and leaves out the first throughput
window, which holds compilation), the per-GPU memory peaks nvidia-smi sampled (mem_<run>.csv, when there
were GPUs) and the comparisons, prints one table and writes OUT/summary.json. Scaling efficiency is the
per-GPU rate of ddp / fsdp over gpu1's (same per-device batch, same compile setting for gpu1 and ddp); `ep` is
set against the DDP run with its compile setting (results.json's `compile`: `ddp` or `ddp_eager`).
`device_limit` reads the EP experiment's runs (metrics_<run>.csv): per MoE layer the max/mean of tokens received
per device (`device_max_received`) and of rows computed per device (`device_max_load`), averaged over the layers
and over the logged steps of the run's second half, with each run's val loss; it writes OUT/device_limit.json.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's package and configs


def prepare(overrides: list[str]) -> None:
    import hydra
    from hydra import compose, initialize_config_dir

    from deepseek_mini.training import presets  # noqa: F401  (registers model=<preset>, as train.py does)

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    print(f"token caches ready: vocab {dm.vocab_size}, seq_len {dm.seq_len}")


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def by_step(rows: list[dict], key: str) -> dict[int, float]:
    """step -> the metric `key` from CSV rows (the last row of a step wins: a resumed run re-logs it)."""
    return {int(float(r["step"])): float(r[key]) for r in rows
            if r.get(key) not in (None, "") and r.get("step") not in (None, "")}


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss from csv/metrics.csv."""
    return by_step(_csv_rows(run_dir / "csv" / "metrics.csv"), "train/loss")


def _nan_last(d: float) -> float:
    """max()'s key: a NaN ranks above every number (plain max() would pass over one that is not first)."""
    return math.inf if math.isnan(d) else d


def compare(ref: Path, resumed: Path, from_step: int) -> dict:
    a, b = train_losses(ref), train_losses(resumed)
    steps = sorted(s for s in a.keys() & b.keys() if s > from_step)
    diffs = [abs(a[s] - b[s]) for s in steps]
    result = {"reference": str(ref), "resumed": str(resumed), "after_step": from_step, "steps_compared": len(steps),
              "bit_identical": sum(d == 0.0 for d in diffs), "max_abs_diff": max(diffs, key=_nan_last) if diffs else None,
              "missing_in_resumed": sorted(s for s in a if s > from_step and s not in b)}
    print(json.dumps(result))
    return result


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _gpu_peaks(mem_csv: Path) -> list[float] | None:
    """Per-GPU maximum of nvidia-smi's memory.used (MiB -> GiB): the whole process, allocator cache included."""
    if not mem_csv.is_file():
        return None
    peaks: dict[int, float] = {}
    for line in mem_csv.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                peaks[int(parts[0])] = max(peaks.get(int(parts[0]), 0.0), float(parts[1]) / 1024)
            except ValueError:
                continue
    return [round(peaks[i], 1) for i in sorted(peaks)] if peaks else None


def summary(out: Path) -> None:
    rows, base = [], None
    for run in sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []:
        res = _read_json(out / f"results_{run.name}.json") or _read_json(run / "results.json")
        if res is None:
            rows.append({"run": run.name, "status": "no results.json"})
            continue
        world = int(res.get("world_size") or 1)
        tps = res.get("tokens_per_sec")
        row = {"run": run.name, "status": res.get("status"), "world_size": world, "steps": res.get("global_step"),
               "global_batch_tokens": res.get("global_batch_tokens"), "tokens_seen": res.get("tokens_seen"),
               "tokens_per_sec": tps, "per_gpu_tokens_per_sec": tps / world if tps else None,
               "peak_alloc_gib_rank0": res.get("peak_gpu_memory_gib"), "gpu_mem_used_gib": _gpu_peaks(out / f"mem_{run.name}.csv"),
               "val_loss": res.get("val_loss"), "error": res.get("error"), "compile": res.get("compile", "?")}
        if run.name == "gpu1":
            base = row
        rows.append(row)
    by_name = {r["run"]: r for r in rows}
    for row in rows:  # only the runs with the baseline's per-device batch (the *_ref / *_kill runs halve it)
        if row["run"] in ("gpu1", "ddp", "fsdp") and base and base.get("per_gpu_tokens_per_sec") \
                and row.get("per_gpu_tokens_per_sec"):
            # scaling efficiency: N-GPU tokens/s / (N x one-GPU tokens/s) = per-GPU rate / one-GPU rate
            row["scaling_efficiency"] = row["per_gpu_tokens_per_sec"] / base["per_gpu_tokens_per_sec"]
    ep = by_name.get("ep")
    ref = next((by_name[n] for n in ("ddp", "ddp_eager") if ep and n in by_name
                and by_name[n].get("compile") == ep.get("compile") != "?"), None)
    if ep and ref and ep.get("tokens_per_sec") and ref.get("tokens_per_sec"):
        ep["vs_ddp"] = ep["tokens_per_sec"] / ref["tokens_per_sec"]
        ep["ddp_reference"] = ref["run"]
    compares = [c for p in sorted(out.glob("compare_*.json")) if (c := _read_json(p))]
    head = f"{'run':<14}{'status':<16}{'ranks':>5}{'steps':>7}{'tok/s/GPU':>12}{'scaling':>9}{'alloc GiB':>11}" \
           f"{'nvsmi GiB':>16}{'val loss':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['run']:<14}{str(r.get('status')):<16}{f(r.get('world_size'), 'd'):>5}{f(r.get('steps'), 'd'):>7}"
              f"{f(r.get('per_gpu_tokens_per_sec'), ',.0f'):>12}{f(r.get('scaling_efficiency'), '.3f'):>9}"
              f"{f(r.get('peak_alloc_gib_rank0'), '.1f'):>11}{str(r.get('gpu_mem_used_gib') or '-'):>16}"
              f"{f(r.get('val_loss'), '.4f'):>10}")
        if r.get("error"):
            print(f"    error: {r['error']}")
    if ep and ep.get("vs_ddp"):
        print(f"ep tokens/s / {ep['ddp_reference']} tokens/s = {ep['vs_ddp']:.3f} (same GPUs, same global batch, both "
              f"compile={ep['compile'] or 'false'})")
    for c in compares:
        print(f"{Path(c['resumed']).name} vs {Path(c['reference']).name} after step {c['after_step']}: "
              f"{c['bit_identical']}/{c['steps_compared']} logged train/loss values bit-identical, "
              f"max |diff| {c['max_abs_diff']}")
    (out / "summary.json").write_text(json.dumps({"runs": rows, "comparisons": compares}, indent=2))


def device_limit(out: Path, runs: list[str]) -> dict:
    table = {}
    for name in runs:
        rows = _csv_rows(out / f"metrics_{name}.csv")
        steps = sorted({int(float(r["step"])) for r in rows if r.get("step")})
        half = steps[len(steps) // 2] if steps else 0
        entry: dict = {"val_loss": (_read_json(out / f"results_{name}.json") or {}).get("val_loss")}
        for key in ("device_max_received", "device_max_load"):
            vals = [float(v) for r in rows if r.get("step") and int(float(r["step"])) >= half
                    for k, v in r.items() if k.startswith("train/moe/layer") and k.endswith("/" + key) and v]
            entry[key] = sum(vals) / len(vals) if vals else None
        table[name] = entry
    print(f"{'run':<20}{'received max/mean':>19}{'rows max/mean':>15}{'val loss':>10}")
    for name, e in table.items():
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{name:<20}{f(e['device_max_received'], '.3f'):>19}{f(e['device_max_load'], '.3f'):>15}"
              f"{f(e['val_loss'], '.4f'):>10}")
    (out / "device_limit.json").write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    cmd, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "prepare":
        prepare(args)
    elif cmd == "compare" and len(args) == 3:
        result = compare(Path(args[0]), Path(args[1]), int(args[2]))
        sys.exit(0 if result["steps_compared"] else 1)
    elif cmd == "summary" and len(args) == 1:
        summary(Path(args[0]))
    elif cmd == "device_limit" and len(args) >= 2:
        device_limit(Path(args[0]), args[1:])
    else:
        sys.exit(__doc__)
