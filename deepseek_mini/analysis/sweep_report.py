"""Sweep report: `python scripts/sweep_report.py <multirun dir> [more dirs] [--out DIR]`.

Reads every job of one or more Hydra multirun dirs (`logs/train/multiruns/<timestamp>/<job number>/`): its
`results.json` (status, val loss, sizes, throughput, the resolved model config), its overrides
(`.hydra/overrides.yaml`), its settings (`.hydra/config.yaml`: max_steps, log_every_n_steps, val_before_fit) and
its CSV metrics (`csv/metrics.csv`). Writes into the first dir (or `--out`):

* `report.md`: the completed jobs sorted by val loss, one column per swept value; then failed jobs with their
  error, unfinished ones (interrupted, or any other status than "completed") with the step they reached and where
  they stopped, and the jobs of the grid that never ran;
* PNG plots, each only where its axis varies (every plot not drawn is named with the reason): val loss vs
  kv_lora_rank (a line per expert count), val loss vs n_routed_experts (a line per rank), val loss vs KV-cache
  bytes/token with the Pareto front, loss curves over training tokens, and val loss per job.

A job is ok (ranked) only when its results.json says `"status": "completed"`. It counts as failed when its
results.json says `"failed"` or cannot be read, or it has none (crashed, killed or still running); as unfinished
under any other status (`"interrupted"`: its val loss is that of its last validation, not of trained weights).
Jobs that never started have no dir: `main(planned=...)` names them from the sweep's plan (scripts/sweep_report.py
expands multirun.yaml's grid as Hydra does; this module imports no Hydra). No job is dropped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepseek_mini.analysis.sweep_plots import (
    _fmt,
    _num,
    plot_bars,
    plot_curves,
    plot_kv_pareto,
    plot_vs,
    vs_points,
)

# override keys that describe where/how a job ran rather than what it trained
IGNORED_PREFIXES = ("paths.", "hydra.", "logger.", "callbacks.", "+hydra")
IGNORED_KEYS = {"experiment", "hparams_search", "debug", "logger", "ckpt_path", "resume"}
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
COMPLETED = "completed"
FAILED_STATUSES = ("failed", "error", "crashed")
# a sweep dir -> each job's task overrides in job order (what the sweep was to run), or None when not known
Planned = Callable[[Path], "list[list[str]] | None"]


@dataclass
class Job:
    name: str
    path: Path
    overrides: list[str] = field(default_factory=list)
    swept: dict[str, Any] = field(default_factory=dict)  # leaf key -> value, from the overrides
    results: dict[str, Any] | None = None
    status: str = "ok"  # ok (completed) | failed | unfinished | not run
    error: str | None = None  # failed: the error; unfinished: where it stopped
    train_curve: list[tuple[float, float]] = field(default_factory=list)  # (tokens, loss)
    val_curve: list[tuple[float, float]] = field(default_factory=list)
    sweep: str = ""  # the sweep dir's tag when a report covers several sweeps (labels tell them apart)
    run_status: str | None = None  # results.json's own status ("interrupted", ...)
    run_cfg: dict[str, Any] = field(default_factory=dict)  # .hydra/config.yaml
    choices: dict[str, Any] = field(default_factory=dict)  # its config groups' options (.hydra/hydra.yaml)
    step: int | None = None  # optimizer steps reached (results.json's global_step)
    logged_step: int | None = None  # without results.json: the last step metrics.csv shows reached

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def status_text(self) -> str:
        """What a listing or a legend calls the job's state: ok, failed, not run, or results.json's status."""
        return self.run_status if self.status == "unfinished" and self.run_status else self.status

    @property
    def val_loss(self) -> float | None:
        v = (self.results or {}).get("val_loss")
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    @property
    def config(self) -> dict:
        return (self.results or {}).get("config") or {}

    @property
    def max_steps(self) -> int | None:
        v = (self.run_cfg.get("trainer") or {}).get("max_steps") if isinstance(self.run_cfg, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    @property
    def log_every_n_steps(self) -> int | None:
        v = (self.run_cfg.get("trainer") or {}).get("log_every_n_steps")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def steps_text(self) -> str:
        """`2 of 4` (results.json), `>= 3 of 4` (the last step metrics.csv shows), `?`."""
        of = f" of {self.max_steps}" if self.max_steps else ""
        if self.step is not None:
            return f"{self.step}{of}"
        if self.logged_step is not None:
            return f">= {self.logged_step}{of}"
        return f"?{of}" if of else "?"

    def value(self, key: str) -> Any:
        """A swept or model value of this job: the final (sized) model config wins over the override text. A key
        its command did not set is the value the job ran with (its recorded config, or its config group's option),
        so that jobs of sweeps that set different keys compare what they ran, not a value against a blank."""
        if key in self.config:
            return self.config[key]
        if key in self.swept:
            return self.swept[key]
        if key in self.choices:
            return self.choices[key]
        node: Any = self.run_cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return None if isinstance(node, dict) else node


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


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[([A-Z]+)\] - (.*)$")
_EXCEPTION_LINE = re.compile(r"^(Traceback \(most recent call last\)|[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:?"
                             r"|error: )")


def _last_error_lines(job_dir: Path) -> str | None:
    """The end of the job's log when it left no results: its last ERROR / CRITICAL record, or the last exception
    line of a traceback; never an INFO line that merely holds the word (a generated sample naming an Error)."""
    for log_file in sorted(job_dir.glob("*.log")):
        hits = []
        for ln in log_file.read_text(errors="replace").splitlines():
            ln = ln.rstrip()
            m = _LOG_PREFIX.match(ln)
            if m:
                if m.group(1) in ("ERROR", "CRITICAL"):
                    hits.append(m.group(2))
            elif _EXCEPTION_LINE.match(ln.strip()):
                hits.append(ln.strip())
        if hits:
            return hits[-1][:500]
    return None


def read_metrics(job_dir: Path, tokens_per_step: float | None, val_before_fit: bool = True,
                 max_steps: int | None = None) -> tuple[list, list, int | None]:
    """(tokens, train/loss), (tokens, val/loss) from the job's CSV logger metrics, and the last optimizer step they
    show reached.

    Lightning logs what it logs inside fit() at `step` = optimizer steps done - 1 (the train rows and the in-fit
    validations); the validation before training (train.py's validate_before_fit, a trainer.validate() call) at
    step 0 after 0 steps. That one is the first val/loss row, at step 0, with no training row before it; with
    val_check_interval=1 an in-fit validation (after step 1) is logged at step 0 too, after it. A lone val row at
    step 0 is the one before training when the job ran with val_before_fit (the default), else that of step 1.
    The validation of the final weights after fit() (another trainer.validate(), when the last step was not
    validated) is logged at step = steps done: a val row at step >= max_steps is that one."""
    files = sorted(job_dir.glob("**/metrics.csv"))
    train, val = [], []
    if not files:
        return train, val, None
    rows = []
    try:
        with open(files[0], newline="", errors="replace") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(float(row.get("step") or ""))
                except ValueError:
                    continue
                rows.append((step, _float(row.get("train/loss")), _float(row.get("val/loss"))))
    except (OSError, csv.Error):
        return train, val, None
    pre = None  # index of the validation before training
    for i, (step, tr, va) in enumerate(rows):
        if tr is not None or step > 0:
            break  # training has been logged: no validation before it from here on
        if va is not None:
            at_zero = sum(1 for s, _, v in rows if s == 0 and v is not None)
            pre = i if (val_before_fit or at_zero > 1) else None
            break
    last = None
    scale = tokens_per_step or 1.0
    for i, (step, tr, va) in enumerate(rows):
        done = 0 if i == pre else step + 1
        if tr is not None:
            train.append((done * scale, tr))
        if va is not None:
            if max_steps and step >= max_steps:  # after fit(): no in-fit row is logged this late
                done = step
            val.append((done * scale, va))
        if tr is not None or va is not None:
            last = done if last is None else max(last, done)
    return sorted(train), sorted(val), last


def _float(v: Any) -> float | None:
    if v in (None, ""):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def _run_config(job_dir: Path, name: str = "config.yaml") -> dict:
    cfg_file = job_dir / ".hydra" / name
    if cfg_file.is_file():
        try:
            data = yaml.safe_load(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def _choices(job_dir: Path) -> dict:
    """The job's config-group options as Hydra recorded them (hydra.runtime.choices: model, trainer, ...)."""
    choices = ((_run_config(job_dir, "hydra.yaml").get("hydra") or {}).get("runtime") or {}).get("choices")
    return choices if isinstance(choices, dict) else {}


def _tokens_per_step(run_cfg: dict, results: dict | None) -> float | None:
    if results:
        if _num(results.get("global_batch_tokens")):
            return float(results["global_batch_tokens"])
        if _num(results.get("global_step")) and _num(results.get("tokens_seen")):
            return results["tokens_seen"] / results["global_step"]
    try:
        data = run_cfg.get("data", {})
        return float(data["batch_size"]) * float(data["seq_len"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _stopped(job: Job, results: dict) -> str:
    """Where an unfinished job stopped: its status, signal, checkpoint, and its last validation's step."""
    raw = results.get("status")
    parts = [f"{raw}" + (f" by {results['signal']}" if results.get("signal") else "")
             if raw is not None else "results.json has no status"]
    if results.get("error"):
        parts.append(str(results["error"]))
    if "checkpoint" in results:
        parts.append(f"checkpoint saved: {results['checkpoint']}" if results.get("checkpoint") else
                     "no checkpoint saved")
    hist = results.get("val_history")
    if isinstance(hist, list) and hist and isinstance(hist[-1], (list, tuple)) and len(hist[-1]) == 2:
        s, v = hist[-1]
        if _num(v) is not None:
            parts.append(f"last val loss {v:.4f} at step {s}")
    return "; ".join(parts)


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
    job.run_cfg = _run_config(job_dir)
    job.choices = _choices(job_dir)
    if results is not None:
        job.step = int(results["global_step"]) if _num(results.get("global_step")) is not None else None
        raw = results.get("status")
        job.run_status = str(raw) if raw is not None else None
    if results is None and job.status == "ok":
        job.status = "failed"
        job.error = _last_error_lines(job_dir) or "no results.json (the job crashed, was killed or is still running)"
    elif results is not None and str(results.get("status", "")).lower() in FAILED_STATUSES:
        job.status = "failed"
        job.error = str(results.get("error") or results.get("message") or f"status: {results.get('status')}")
    elif results is not None and str(results.get("status", "")).lower() != COMPLETED:
        # interrupted, or any status this report does not know: its val loss is no final one, never ranked
        job.status = "unfinished"
        job.error = _stopped(job, results)
    val_before_fit = job.run_cfg.get("val_before_fit", True) is not False
    tps = _tokens_per_step(job.run_cfg, results)
    job.train_curve, job.val_curve, job.logged_step = read_metrics(job_dir, tps, val_before_fit, job.max_steps)
    if results and results.get("val_history"):  # exact optimizer steps, incl. the pre-training validation
        job.val_curve = [(float(s) * (tps or 1.0), float(v)) for s, v in results["val_history"]]
    return job


def _sweep_tags(sweep_dirs: list[Path]) -> list[str]:
    """A short name per sweep dir that tells them apart: the dir's name, or as many trailing path parts as it
    takes (`a/sweep`, `b/sweep`)."""
    parts = [Path(os.path.abspath(d)).parts for d in sweep_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        tags = ["/".join(p[-n:]) for p in parts]
        if len(set(tags)) == len(tags):
            return tags
    return [f"{Path(d).name or d}#{i}" for i, d in enumerate(sweep_dirs, 1)]


def load_jobs(sweep_dirs: list[Path], planned: Planned | None = None) -> list[Job]:
    """Every job of each sweep dir, in job order. With `planned`, the jobs of the sweep's grid that left no dir
    (the sweep stopped before them) are there too, as "not run"; a numbered dir that left nothing readable is a
    failed job."""
    unique: list[Path] = []
    for d in sweep_dirs:  # the same dir twice would list every job twice
        if all(os.path.realpath(d) != os.path.realpath(u) for u in unique):
            unique.append(Path(d))
    multi = len(unique) > 1
    jobs = []
    for d, tag in zip(unique, _sweep_tags(unique)):
        def named(p: Path, tag=tag) -> str:
            return f"{tag}/{p.name}" if multi else p.name

        found = [load_job(p, name=named(p)) for p in find_job_dirs(d)]
        plan = planned(d) if planned is not None and found and found[0].path != d else None
        if plan:
            names = {j.path.name for j in found}
            ran = [j.overrides for j in found]
            for num, overrides in enumerate(plan):
                if str(num) in names or overrides in ran:
                    continue
                p = d / str(num)
                if p.is_dir():  # started, left neither .hydra/overrides.yaml nor results.json
                    job = load_job(p, name=named(p))
                    job.overrides, job.swept = list(overrides), _split_overrides(overrides)
                else:
                    job = Job(name=named(p), path=p, overrides=list(overrides), swept=_split_overrides(overrides),
                              status="not run", error="the sweep stopped before this job started")
                found.append(job)
            found.sort(key=lambda j: _job_sort_key(j.path))
        for job in found:
            job.sweep = tag if multi else ""
        jobs += found
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


def count_line(jobs: list[Job]) -> str:
    """`3 ok, 1 failed` (+ `, 1 unfinished, 1 not run` where there are such jobs)."""
    n = {s: sum(j.status == s for j in jobs) for s in ("ok", "failed", "unfinished", "not run")}
    extra = "".join(f", {n[s]} {s}" for s in ("unfinished", "not run") if n[s])
    return f"{n['ok']} ok, {n['failed']} failed{extra}"


# ---------------------------------------------------------------------- report
def _md(v: Any) -> str:
    return _fmt(v).replace("|", "\\|").replace("\n", " ")


def _millions(v: Any) -> str:
    return f"{v / 1e6:.2f}" if _num(v) is not None else ""


def _vs_skip(jobs: list[Job], key: str, keys: list[str]) -> str:
    if key not in keys:
        return f"{key} is not swept"
    done = [j for j in jobs if j.ok and j.val_loss is not None]
    n = len({x for _, x in vs_points(jobs, key)})
    return (f"fewer than two {key} values among the completed jobs with a val loss "
            f"({len(done)} such job{'s' if len(done) != 1 else ''}, {n} value{'s' if n != 1 else ''})")


def _plots(jobs: list[Job], keys: list[str], out_dir: Path) -> tuple[list, list]:
    """Draw every plot that has something to show: (title, file) of those drawn, the reason for each one not."""
    plots, skipped = [], []
    label_keys = [k for k in keys if any(k in j.swept for j in jobs)] or keys  # legends: swept values only
    rank, experts = "kv_lora_rank", "n_routed_experts"
    done = [j for j in jobs if j.ok and j.val_loss is not None]
    for key, other, what, title, file in (
            (rank, experts, "Val loss vs kv_lora_rank (a line per expert count)", "Validation loss vs MLA KV rank",
             "rank"),
            (experts, rank, "Val loss vs n_routed_experts (a line per rank)",
             "Validation loss vs number of routed experts", "experts")):
        if key in keys and plot_vs(jobs, key, other if other in keys else None, out_dir / PLOT_FILES[file], title):
            plots.append((what, PLOT_FILES[file]))
        else:
            skipped.append(f"val loss vs {key}: {_vs_skip(jobs, key, keys)}")
    if plot_kv_pareto(jobs, label_keys, out_dir / PLOT_FILES["kv"]):
        plots.append(("Val loss vs KV-cache bytes per token, Pareto front dashed", PLOT_FILES["kv"]))
    elif not any(_num((j.results or {}).get("kv_cache_bytes_per_token")) for j in done):
        skipped.append("val loss vs KV bytes/token: no completed job with a val loss and a KV-cache size")
    else:
        skipped.append("val loss vs KV bytes/token: every completed job has the same KV-cache size")
    if plot_curves(jobs, label_keys, out_dir / PLOT_FILES["curves"]):
        plots.append(("Loss curves over training tokens", PLOT_FILES["curves"]))
    else:
        skipped.append("loss curves: no job logged a loss (no csv/metrics.csv rows, no val_history)")
    if plot_bars(jobs, label_keys, out_dir / PLOT_FILES["bars"]):
        plots.append(("Val loss per job", PLOT_FILES["bars"]))
    else:
        skipped.append("val loss per job: no completed job with a val loss")
    return plots, skipped


def _overrides_cell(job: Job, fixed: dict) -> str:
    ov = " ".join(o for o in job.overrides if not o.startswith(("paths.", "hydra."))
                  and _split_overrides([o]).keys() - fixed.keys()) or " ".join(job.overrides)
    return f"`{_md(ov)}`" if ov else ""


def write_report(sweep_dirs: list[Path], out_dir: Path | None = None, planned: Planned | None = None,
                 jobs: list[Job] | None = None) -> Path:
    sweep_dirs = [Path(d) for d in sweep_dirs]
    for d in sweep_dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"not a directory: {d}")
    out_dir = Path(out_dir or sweep_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    if jobs is None:
        jobs = load_jobs(sweep_dirs, planned)
    keys = varying_keys(jobs)
    ok = sorted([j for j in jobs if j.ok], key=lambda j: (j.val_loss is None, j.val_loss or 0))
    failed = [j for j in jobs if j.status == "failed"]
    unfinished = [j for j in jobs if j.status == "unfinished"]
    not_run = [j for j in jobs if j.status == "not run"]
    plots, skipped = _plots(jobs, keys, out_dir)

    lines = ["# Sweep report", ""]
    lines.append("Sweep dirs: " + ", ".join(f"`{d}`" for d in sweep_dirs))
    lines.append("")
    lines.append(f"Jobs: {len(jobs)} ({count_line(jobs)}).")
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
        lines.append("| (no job completed) |" + " |" * (len(header) - 1))
    lines += ["", f"## Failed jobs ({len(failed)})", ""]
    if failed:
        lines.append("| job | overrides | steps | error |")
        lines.append("|---|---|---:|---|")
        for j in failed:
            lines.append(f"| {j.name} | {_overrides_cell(j, fixed)} | {j.steps_text()} | {_md(j.error or '')} |")
    else:
        lines.append("None.")
    if unfinished:
        lines += ["", f"## Unfinished jobs ({len(unfinished)})", "",
                  "Their results.json status is not `completed`: not ranked, not in the val-loss plots (their "
                  "last val loss is not that of the final weights).", "",
                  "| job | overrides | status | steps | where it stopped |", "|---|---|---|---:|---|"]
        for j in unfinished:
            lines.append(f"| {j.name} | {_overrides_cell(j, fixed)} | {_md(j.status_text)} | {j.steps_text()} "
                         f"| {_md(j.error or '')} |")
    if not_run:
        lines += ["", f"## Not run ({len(not_run)})", "",
                  "Jobs of the sweep's grid (multirun.yaml) that have no job dir: the sweep stopped before them.", "",
                  "| job | overrides |", "|---|---|"]
        for j in not_run:
            lines.append(f"| {j.name} | {_overrides_cell(j, fixed)} |")
    lines += ["", "## Plots", ""]
    if plots:
        for title, fname in plots:
            lines += [f"### {title}", "", f"![{title}]({fname})", ""]
    else:
        lines.append("No plots.")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    lines += ["", "Val loss: mean cross-entropy on held-out text after the last step (nats/token). "
              "Params active: per-token parameters (shared + top-k experts, router, attention, head; embeddings "
              "excluded). KV bytes/token: bf16 cache, all layers.", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def _out_dir_problem(out: Path) -> str | None:
    """Why report.md and the plots cannot be written into `out` (created, parents too, where missing), or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "a file is in the way, not a directory"
    except OSError as e:
        return f"cannot create it: {e.strerror or e}"
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".sweep_report-"):
            pass
    except OSError as e:
        return f"cannot write into it: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None, planned: Planned | None = None) -> int:
    """The command line. `planned` (scripts/sweep_report.py passes it) gives a sweep dir's grid, so the jobs that
    never started are named."""
    parser = argparse.ArgumentParser(description="Summarize Hydra multirun sweep(s) of train.py into report.md + PNGs.")
    parser.add_argument("sweep_dirs", nargs="+", type=Path,
                        help="multirun dir(s), e.g. logs/train/multiruns/<timestamp>; the report goes into the first")
    parser.add_argument("--out", type=Path, default=None,
                        help="write report.md and plots here instead (created where missing)")
    args = parser.parse_args(argv)
    for d in args.sweep_dirs:  # one line and exit status 2, as train.py's bad input
        if not d.is_dir():
            print(f"error: sweep_dir={d}: no such directory", file=sys.stderr)
            return 2
        if not find_job_dirs(d):
            print(f"error: sweep_dir={d}: no job directories (numbered dirs of a train.py -m run) in it",
                  file=sys.stderr)
            return 2
    out = args.out or args.sweep_dirs[0]
    problem = _out_dir_problem(out)
    if problem:
        print(f"error: {'--out' if args.out else 'sweep_dir'}={out}: {problem}", file=sys.stderr)
        return 2
    jobs = load_jobs(args.sweep_dirs, planned)
    report = write_report(args.sweep_dirs, out, jobs=jobs)
    print(f"{len(jobs)} jobs ({count_line(jobs)}); report: {report}")
    return 0
