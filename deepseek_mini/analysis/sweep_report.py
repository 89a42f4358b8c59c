"""Sweep report: `python scripts/sweep_report.py <multirun dir> [more dirs]`.

Reads every job of one or more Hydra multirun dirs (`logs/train/multiruns/<timestamp>/<job number>/`): its
`results.json` (val loss, sizes, throughput, the resolved model config), its overrides (`.hydra/overrides.yaml`)
and its CSV metrics (`csv/metrics.csv`). Writes into the first dir:

* `report.md`: the jobs sorted by val loss, one column per swept value, then failed jobs with their error;
* PNG plots, each only where its axis varies: val loss vs kv_lora_rank (a line per expert count), val loss vs
  n_routed_experts (a line per rank), val loss vs KV-cache bytes/token with the Pareto front, loss curves
  over training tokens, and val loss per job.

A job counts as failed when its results.json says `"status": "failed"` or it has none (crashed, killed or
still running); failed jobs are listed, never dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepseek_mini.analysis.sweep_plots import _fmt, _num, plot_bars, plot_curves, plot_kv_pareto, plot_vs

# override keys that describe where/how a job ran rather than what it trained
IGNORED_PREFIXES = ("paths.", "hydra.", "logger.", "callbacks.", "+hydra")
IGNORED_KEYS = {"experiment", "hparams_search", "debug"}
# derived model fields shown when they vary across jobs (e.g. expert width under the iso-FLOP rule)
DERIVED_FIELDS = ("attention", "kv_lora_rank", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "n_shared_experts", "num_key_value_heads", "head_dim", "intermediate_size")
PLOT_FILES = {
    "rank": "val_loss_vs_kv_lora_rank.png",
    "experts": "val_loss_vs_n_routed_experts.png",
    "kv": "val_loss_vs_kv_bytes.png",
    "curves": "loss_curves.png",
    "bars": "val_loss_by_job.png",
}


@dataclass
class Job:
    name: str
    path: Path
    overrides: list[str] = field(default_factory=list)
    swept: dict[str, Any] = field(default_factory=dict)  # leaf key -> value, from the overrides
    results: dict[str, Any] | None = None
    status: str = "ok"  # ok | failed
    error: str | None = None
    train_curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens, loss)
    val_curve: list[tuple[float, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def val_loss(self) -> float | None:
        v = (self.results or {}).get("val_loss")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    @property
    def config(self) -> dict:
        return (self.results or {}).get("config") or {}

    def value(self, key: str) -> Any:
        """A swept or model value of this job: the final (sized) model config wins over the override text."""
        if key in self.config:
            return self.config[key]
        return self.swept.get(key)


# ---------------------------------------------------------------------- reading
def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _split_overrides(overrides: list[str]) -> dict[str, Any]:
    out = {}
    for item in overrides:
        if "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        leaf = key[len("model."):] if key.startswith("model.") else key
        out[leaf] = _parse_value(value)
    return out


def _job_sort_key(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job dirs of a multirun dir: subdirs with .hydra/overrides.yaml or results.json (or the dir itself)."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "results.json").is_file() and not any(sweep_dir.glob("*/results.json")):
        return [sweep_dir]
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            and ((p / ".hydra" / "overrides.yaml").is_file() or (p / "results.json").is_file())]
    return sorted(jobs, key=_job_sort_key)


def _last_error_lines(job_dir: Path) -> str | None:
    """The end of the job's log when it left no results: the exception line(s), if any."""
    for log_file in sorted(job_dir.glob("*.log")):
        lines = [ln.rstrip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
        hits = [ln for ln in lines if re.search(r"(Error|Exception|error:|Traceback)", ln)]
        if hits:
            return re.sub(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - ", "", hits[-1])[:500]
    return None


def read_metrics(job_dir: Path, tokens_per_step: float | None) -> tuple[list, list]:
    """(tokens, train/loss) and (tokens, val/loss) from the job's CSV logger metrics."""
    files = sorted(job_dir.glob("**/metrics.csv"))
    train, val = [], []
    if not files:
        return train, val
    with open(files[0], newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            # Lightning logs in-training metrics at step = optimizer steps done - 1
            for key, out in (("train/loss", train), ("val/loss", val)):
                v = row.get(key)
                if v not in (None, ""):
                    try:
                        out.append(((float(step) + 1) * (tokens_per_step or 1.0), float(v)))
                    except ValueError:
                        pass
    return sorted(train), sorted(val)


def _tokens_per_step(job_dir: Path, results: dict | None) -> float | None:
    if results:
        if results.get("global_batch_tokens"):
            return float(results["global_batch_tokens"])
        if results.get("global_step") and results.get("tokens_seen"):
            return results["tokens_seen"] / results["global_step"]
    cfg_file = job_dir / ".hydra" / "config.yaml"
    if cfg_file.is_file():
        try:
            data = yaml.safe_load(cfg_file.read_text()).get("data", {})
            return float(data["batch_size"]) * float(data["seq_len"])
        except Exception:
            return None
    return None


def load_job(job_dir: Path, name: str | None = None) -> Job:
    job_dir = Path(job_dir)
    job = Job(name=name or job_dir.name, path=job_dir)
    ov_file = job_dir / ".hydra" / "overrides.yaml"
    results = None
    res_file = job_dir / "results.json"
    if res_file.is_file():
        try:
            results = json.loads(res_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            job.status, job.error = "failed", f"unreadable results.json: {type(e).__name__}: {e}"
        if results is not None and not isinstance(results, dict):  # a job's report is a mapping: not one of ours
            job.status, job.error = "failed", f"unreadable results.json: a {type(results).__name__}, not a mapping"
            results = None
    overrides = None
    if ov_file.is_file():
        try:
            overrides = yaml.safe_load(ov_file.read_text()) or []
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            overrides = None  # damaged: results.json records the overrides too
    if isinstance(overrides, list):
        job.overrides = [str(o) for o in overrides]
    elif results and isinstance(results.get("overrides"), list):
        job.overrides = [str(o) for o in results["overrides"]]
    job.swept = _split_overrides(job.overrides)
    job.results = results
    if results is None and job.status == "ok":
        job.status = "failed"
        job.error = _last_error_lines(job_dir) or "no results.json (the job crashed, was killed or is still running)"
    elif results is not None and str(results.get("status", "ok")).lower() in ("failed", "error", "crashed"):
        job.status = "failed"
        job.error = str(results.get("error") or results.get("message") or "status: failed")
    job.train_curve, job.val_curve = read_metrics(job_dir, _tokens_per_step(job_dir, results))
    if results and results.get("val_history"):  # exact optimizer steps, incl. the pre-training validation
        tps = _tokens_per_step(job_dir, results) or 1.0
        job.val_curve = [(float(s) * tps, float(v)) for s, v in results["val_history"]]
    return job


def load_jobs(sweep_dirs: list[Path]) -> list[Job]:
    jobs = []
    multi = len(sweep_dirs) > 1
    for d in sweep_dirs:
        for p in find_job_dirs(Path(d)):
            jobs.append(load_job(p, name=f"{Path(d).name}/{p.name}" if multi else p.name))
    return jobs


# ---------------------------------------------------------------------- analysis
def varying_keys(jobs: list[Job]) -> list[str]:
    """Swept keys whose value differs between jobs, then derived model fields that differ (e.g. widths)."""
    keys: list[str] = []
    for job in jobs:
        for k in job.swept:
            if k not in keys:
                keys.append(k)
    swept = [k for k in keys if len({repr(j.value(k)) for j in jobs}) > 1]
    ok = [j for j in jobs if j.config]
    derived = [k for k in DERIVED_FIELDS if k not in swept and len({repr(j.config.get(k)) for j in ok}) > 1]
    return swept + derived


def fixed_overrides(jobs: list[Job], varying: list[str]) -> dict[str, Any]:
    common: dict[str, Any] | None = None
    for job in jobs:
        items = {k: v for k, v in job.swept.items() if k not in varying}
        common = items if common is None else {k: v for k, v in common.items() if items.get(k, object()) == v}
    return common or {}


# ---------------------------------------------------------------------- report
def _md(v: Any) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def _millions(v: Any) -> str:
    return f"{v / 1e6:.2f}" if _num(v) is not None else ""


def write_report(sweep_dirs: list[Path], out_dir: Path | None = None) -> Path:
    sweep_dirs = [Path(d) for d in sweep_dirs]
    for d in sweep_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"not a directory: {d}")
    out_dir = Path(out_dir or sweep_dirs[0])
    jobs = load_jobs(sweep_dirs)
    keys = varying_keys(jobs)
    ok = sorted([j for j in jobs if j.ok], key=lambda j: (j.val_loss is None, j.val_loss or 0))
    failed = [j for j in jobs if not j.ok]

    plots = []
    label_keys = [k for k in keys if any(k in j.swept for j in jobs)] or keys  # legends: swept values only
    rank, experts = "kv_lora_rank", "n_routed_experts"
    if rank in keys and plot_vs(jobs, rank, experts if experts in keys else None, out_dir / PLOT_FILES["rank"],
                                "Validation loss vs MLA KV rank"):
        plots.append(("Val loss vs kv_lora_rank (a line per expert count)", PLOT_FILES["rank"]))
    if experts in keys and plot_vs(jobs, experts, rank if rank in keys else None, out_dir / PLOT_FILES["experts"],
                                   "Validation loss vs number of routed experts"):
        plots.append(("Val loss vs n_routed_experts (a line per rank)", PLOT_FILES["experts"]))
    skipped = []
    if plot_kv_pareto(jobs, label_keys, out_dir / PLOT_FILES["kv"]):
        plots.append(("Val loss vs KV-cache bytes per token, Pareto front dashed", PLOT_FILES["kv"]))
    elif ok:
        skipped.append("val loss vs KV bytes/token: every finished job has the same KV-cache size")
    if rank not in keys:
        skipped.append("val loss vs kv_lora_rank: kv_lora_rank is not swept")
    if experts not in keys or len({_num(j.value(experts)) for j in ok} - {None}) < 2:
        skipped.append("val loss vs n_routed_experts: fewer than two expert counts")
    if plot_curves(jobs, label_keys, out_dir / PLOT_FILES["curves"]):
        plots.append(("Loss curves over training tokens", PLOT_FILES["curves"]))
    if plot_bars(jobs, label_keys, out_dir / PLOT_FILES["bars"]):
        plots.append(("Val loss per job", PLOT_FILES["bars"]))

    lines = ["# Sweep report", ""]
    lines.append("Sweep dirs: " + ", ".join(f"`{d}`" for d in sweep_dirs))
    lines.append("")
    lines.append(f"Jobs: {len(jobs)} ({len(ok)} ok, {len(failed)} failed).")
    fixed = fixed_overrides(jobs, keys)
    if fixed:
        lines.append("Same in every job: " + ", ".join(f"`{k}={_fmt(v)}`" for k, v in fixed.items()) + ".")
    toks = sorted({int(j.results["tokens_seen"]) for j in ok if _num((j.results or {}).get("tokens_seen"))})
    if toks:
        lines.append("Training tokens per job: " + ", ".join(f"{t:,}" for t in toks) + ".")
    lines += ["", "## Results (sorted by final val loss)", ""]
    header = ["#", "job", *keys, "val loss", "val loss start", "train loss", "params total (M)",
              "params active (M)", "KV bytes/token", "tokens/s"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---:" if h not in ("job",) else "---" for h in header]) + "|")
    for i, j in enumerate(ok, 1):
        r = j.results or {}
        cells = [str(i), j.name, *[_md(j.value(k)) for k in keys],
                 f"{j.val_loss:.4f}" if j.val_loss is not None else "",
                 f"{r['val_loss_start']:.4f}" if _num(r.get("val_loss_start")) is not None else "",
                 f"{r['train_loss']:.4f}" if _num(r.get("train_loss")) is not None else "",
                 _millions(r.get("params_total")), _millions(r.get("params_active")),
                 _fmt(int(r["kv_cache_bytes_per_token"])) if _num(r.get("kv_cache_bytes_per_token")) else "",
                 f"{r['tokens_per_sec']:,.0f}" if _num(r.get("tokens_per_sec")) is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if not ok:
        lines.append("| (no job finished) |" + " |" * (len(header) - 1))
    lines += ["", f"## Failed jobs ({len(failed)})", ""]
    if failed:
        lines.append("| job | overrides | error |")
        lines.append("|---|---|---|")
        for j in failed:
            ov = " ".join(o for o in j.overrides if not o.startswith(("paths.", "hydra."))
                          and _split_overrides([o]).keys() - fixed.keys()) or " ".join(j.overrides)
            lines.append(f"| {j.name} | `{_md(ov)}` | {_md(j.error or '')} |")
    else:
        lines.append("None.")
    lines += ["", "## Plots", ""]
    if plots:
        for title, fname in plots:
            lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    else:
        lines.append("No plots: no job finished with a val loss.")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    lines += ["", "Val loss: mean cross-entropy on held-out text after the last step (nats/token). "
              "Params active: per-token parameters (shared + top-k experts, router, attention, head; embeddings "
              "excluded). KV bytes/token: bf16 cache, all layers.", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarize Hydra multirun sweep(s) of train.py into report.md + PNGs.")
    parser.add_argument("sweep_dirs", nargs="+", type=Path,
                        help="multirun dir(s), e.g. logs/train/multiruns/<timestamp>; the report goes into the first")
    parser.add_argument("--out", type=Path, default=None, help="write report.md and plots here instead")
    args = parser.parse_args(argv)
    for d in args.sweep_dirs:  # one line and exit status 2, as train.py's bad input
        if not d.is_dir():
            print(f"error: sweep_dir={d}: no such directory", file=sys.stderr)
            return 2
        if not find_job_dirs(d):
            print(f"error: sweep_dir={d}: no job directories (numbered dirs of a train.py -m run) in it",
                  file=sys.stderr)
            return 2
    report = write_report(args.sweep_dirs, args.out)
    jobs = load_jobs(args.sweep_dirs)
    n_failed = sum(not j.ok for j in jobs)
    print(f"{len(jobs)} jobs ({len(jobs) - n_failed} ok, {n_failed} failed); report: {report}")
    return 0
