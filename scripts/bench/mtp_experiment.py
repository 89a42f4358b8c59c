"""Issue 24's GPU plan for multi-token prediction: does MTP (D = 1, lambda = 0.3) change the main model's validation
loss for the same tokens, and how well do the trained MTP modules draft for self-speculative decoding?

    DATA_ROOT=<dir with gutenberg_classics_*> python scripts/bench/mtp_experiment.py --out /tmp/mtp     # one GPU
    python scripts/bench/mtp_experiment.py --cpu --out /tmp/mtp_cpu      # CPU dry run: tiny_cpu, a few steps

For each seed, two runs through the documented CLI, all at once on the one GPU (they are quality runs: their
tokens/s is shared and not reported as speed):
    python train.py experiment=mtp_small_gpu seed=S                                  # with MTP (mtp_s<S>)
    python train.py experiment=mtp_small_gpu seed=S model.num_nextn_predict_layers=0 # without   (base_s<S>)
Same seed, same data order, same initial main-model weights (MTP modules are built without drawing from the global
RNG), same steps and batch, so both see the same tokens. Only the first seed's MTP run keeps its checkpoint; the
decode benchmark then runs plain vs self-speculative generate() on it, prompts from --prompt-file (real text, so
the acceptance is real): greedy at --batches, and sampled at temperature 1 at the largest batch.

Writes to --out: per run results_<run>.json and metrics_<run>.csv (copied as each run ends), logs/, and
mtp_experiment.json / mtp_experiment.md (val loss per validation step for every run, MTP minus baseline per
seed and their mean, the MTP loss), spec_greedy.json / spec_sampled.json (bench_decode.py --ckpt).
--deadline-s caps the whole plan: training runs still going when it would leave no room for the decode
benchmark are stopped (SIGTERM: the run writes its checkpoint and results.json), and what they logged is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from multi_gpu import _csv_rows, _read_json, by_step  # noqa: E402  (the sibling script's CSV / JSON readers)

CPU_OVERRIDES = ["experiment=tiny_cpu", "model.vocab_size=512", "model.max_position_embeddings=64", "data.seq_len=32",
                 "data.batch_size=4", "data.max_chars=200000", "callbacks.samples=null", "callbacks.progress_bar=null",
                 "scheduler.warmup_steps=2", "trainer.log_every_n_steps=2"]


def run_names(seeds: list[int]) -> list[tuple[str, int, bool]]:
    return [(f"{'mtp' if mtp else 'base'}_s{s}", s, mtp) for s in seeds for mtp in (True, False)]


def train_command(args, seed: int, mtp: bool, keep_ckpt: bool) -> list[str]:
    exp = CPU_OVERRIDES + ["model.num_nextn_predict_layers=1", "model.mtp_loss_weight=0.3"] if args.cpu \
        else ["experiment=mtp_small_gpu"]
    cmd = [sys.executable, str(ROOT / "train.py"), *exp, f"seed={seed}", f"trainer.max_steps={args.steps}",
           f"trainer.val_check_interval={args.val_every}", f"trainer.limit_val_batches={args.val_batches}",
           "logger=csv", f"paths.cache_dir={args.cache}"]
    if not mtp:
        cmd.append("model.num_nextn_predict_layers=0")
    if not keep_ckpt:
        cmd.append("callbacks.model_checkpoint=null")
    return cmd + args.overrides


def last_mean(rows: list[dict], key: str, n: int = 5) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(vals[-n:]) / len(vals[-n:]) if vals else None


def summarize(out: Path, seeds: list[int]) -> dict:
    runs = {}
    for name, seed, mtp in run_names(seeds):
        rows = _csv_rows(out / f"metrics_{name}.csv")
        res = _read_json(out / f"results_{name}.json") or {}
        runs[name] = {"seed": seed, "mtp": mtp, "status": res.get("status"), "steps": res.get("global_step"),
                      "tokens_seen": res.get("tokens_seen"), "val_loss": res.get("val_loss"),
                      "val_curve": by_step(rows, "val/loss"), "train_loss_last": last_mean(rows, "train/loss"),
                      "mtp_loss_1_last": last_mean(rows, "train/mtp_loss_1"), "params_mtp": res.get("params_mtp")}
    diffs = {}
    for s in seeds:
        a, b = runs[f"mtp_s{s}"], runs[f"base_s{s}"]
        common = sorted(a["val_curve"].keys() & b["val_curve"].keys())
        diffs[s] = {step: a["val_curve"][step] - b["val_curve"][step] for step in common}
    steps = sorted(set.intersection(*(set(d) for d in diffs.values()))) if diffs else []
    mean_diff = {step: sum(d[step] for d in diffs.values()) / len(diffs) for step in steps}
    result = {"runs": runs, "mtp_minus_base": diffs, "mean_mtp_minus_base": mean_diff}
    (out / "mtp_experiment.json").write_text(json.dumps(result, indent=1))
    lines = ["| run | seed | MTP | steps | " + " | ".join(f"val @ {s}" for s in steps) + " | train/mtp_loss_1 (last) |",
             "|---|---:|---|---:|" + "---:|" * len(steps) + "---:|"]
    for name, r in runs.items():
        vals = " | ".join(f"{r['val_curve'][s]:.4f}" if s in r["val_curve"] else "-" for s in steps)
        mtp_l = f"{r['mtp_loss_1_last']:.4f}" if r["mtp_loss_1_last"] is not None else "-"
        lines.append(f"| {name} | {r['seed']} | {'D=1' if r['mtp'] else 'off'} | {r['steps']} | {vals} | {mtp_l} |")
    for s, d in diffs.items():
        lines.append(f"| MTP - base, seed {s} | | | | " + " | ".join(f"{d[x]:+.4f}" if x in d else "-" for x in steps)
                     + " | |")
    if len(diffs) > 1:
        lines.append("| MTP - base, mean | | | | " + " | ".join(f"{mean_diff[x]:+.4f}" for x in steps) + " | |")
    table = "\n".join(lines)
    (out / "mtp_experiment.md").write_text(table + "\n")
    print(table, flush=True)
    return result


def copy_run(out: Path, runs_dir: Path, name: str) -> None:
    for src, dst in ((runs_dir / name / "results.json", out / f"results_{name}.json"),
                     (runs_dir / name / "csv" / "metrics.csv", out / f"metrics_{name}.csv")):
        if src.is_file():
            shutil.copy(src, dst)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/mtp_experiment"))
    ap.add_argument("--runs", type=Path, default=None, help="run directories (default OUT/runs)")
    ap.add_argument("--cache", default="/tmp/dsm_cache", help="paths.cache_dir: tokenizer and token caches")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--val-every", type=int, default=300)
    ap.add_argument("--val-batches", type=int, default=30)
    ap.add_argument("--deadline-s", type=float, default=None, help="seconds the whole plan may take")
    ap.add_argument("--decode-reserve-s", type=float, default=120, help="kept for the decode benchmark")
    ap.add_argument("--prompt-file", default=None, help="default DATA_ROOT/gutenberg_classics_valid.txt")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--fallback-compile", default="false",
                    help="compile setting for one retry of a run that fails ('' = no retry)")
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU: tiny_cpu, the plan's logic only")
    ap.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = ap.parse_args()
    t0 = time.time()
    if args.cpu:
        args.steps, args.val_every, args.val_batches = min(args.steps, 6), min(args.val_every, 3), min(args.val_batches, 2)
        args.overrides = ["trainer.accelerator=cpu", "trainer.devices=1"] + args.overrides
        args.gen_tokens, args.prompt_tokens, args.batches = min(args.gen_tokens, 8), min(args.prompt_tokens, 16), [1, 2]
    out, runs_dir = args.out, args.runs or args.out / "runs"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}

    print(f"[{time.time() - t0:5.0f}s] token caches into {args.cache}", flush=True)
    prep = [sys.executable, str(HERE / "multi_gpu.py"), "prepare",
            *(train_command(args, args.seeds[0], True, False)[2:])]
    with (out / "logs" / "prep.log").open("w") as log:
        rc = subprocess.call(prep, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    print(f"[{time.time() - t0:5.0f}s] prep: exit {rc}", flush=True)

    procs, retried = {}, set()

    def launch(name: str, seed: int, mtp: bool, keep: bool, extra: list[str]) -> None:
        cmd = train_command(args, seed, mtp, keep_ckpt=keep) + extra + [f"hydra.run.dir={runs_dir / name}"]
        print(f"[{time.time() - t0:5.0f}s] {name}: {' '.join(cmd[1:])}", flush=True)
        log = (out / "logs" / f"{name}.log").open("a")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log)

    plan = {name: (seed, mtp, i == 0) for i, (name, seed, mtp) in enumerate(run_names(args.seeds))}
    for name, (seed, mtp, keep) in plan.items():
        launch(name, seed, mtp, keep, [])
    stop_at = None if args.deadline_s is None else t0 + args.deadline_s - (0 if args.no_decode else args.decode_reserve_s)
    stopped = False
    while True:
        for name, (p, log) in list(procs.items()):
            # a run that fails early is retried once with --fallback-compile (and said so in its log and here)
            if (p.poll() not in (None, 0) and args.fallback_compile and name not in retried and not stopped
                    and (stop_at is None or stop_at - time.time() > 120)):
                retried.add(name)
                log.close()
                print(f"[{time.time() - t0:5.0f}s] {name}: exit {p.returncode}; retrying with "
                      f"compile={args.fallback_compile}", flush=True)
                shutil.rmtree(runs_dir / name, ignore_errors=True)
                launch(name, *plan[name], [f"compile={args.fallback_compile}"])
        if all(p.poll() is not None for p, _ in procs.values()):
            break
        if stop_at is not None and time.time() > stop_at and not stopped:
            print(f"[{time.time() - t0:5.0f}s] deadline: stopping the runs still going (SIGTERM)", flush=True)
            for p, _ in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            stopped, stop_at = True, time.time() + 60
        elif stopped and time.time() > stop_at:
            for p, _ in procs.values():
                if p.poll() is None:
                    p.kill()
        time.sleep(2)
    for name, (p, log) in procs.items():
        log.close()
        copy_run(out, runs_dir, name)
        print(f"[{time.time() - t0:5.0f}s] {name}: exit {p.returncode}"
              f"{' (the retry)' if name in retried else ''}", flush=True)
    result = summarize(out, args.seeds)
    result["retried_with_fallback_compile"] = sorted(retried)
    (out / "mtp_experiment.json").write_text(json.dumps(result, indent=1))

    if args.no_decode:
        return 0
    ckpt = runs_dir / run_names(args.seeds)[0][0] / "checkpoints" / "last.ckpt"
    prompt_file = args.prompt_file or (str(Path(os.environ["DATA_ROOT"]) / "gutenberg_classics_valid.txt")
                                       if os.environ.get("DATA_ROOT") else None)
    bench = [sys.executable, str(HERE / "bench_decode.py"), "--ckpt", str(ckpt), "--gen-tokens", str(args.gen_tokens),
             "--prompt-tokens", str(args.prompt_tokens)] + (["--prompt-file", prompt_file] if prompt_file else [])
    if args.cpu:
        bench += ["--device", "cpu"]
    for name, extra in (("spec_greedy", ["--batches", *map(str, args.batches)]),
                        ("spec_sampled", ["--batches", str(max(args.batches)), "--temperature", "1.0"])):
        print(f"[{time.time() - t0:5.0f}s] {name}: {' '.join(bench[1:] + extra)}", flush=True)
        with (out / "logs" / f"{name}.log").open("w") as log:
            rc = subprocess.call(bench + extra + ["--out", str(out / f"{name}.json")], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        print((out / "logs" / f"{name}.log").read_text()[-1500:], flush=True)
        print(f"[{time.time() - t0:5.0f}s] {name}: exit {rc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
