"""Sweep plots: val loss against a swept value, against KV-cache bytes with the Pareto front, loss curves over
training tokens, val loss per job. Each returns False (and writes nothing) where its axis does not vary.

sweep_report.py loads the jobs and decides which plots a report gets (and says why one is not drawn); the labels
here name a job by its swept values (`rank=16, E=8`), after its sweep's name when a report covers several sweeps
(`sweepA: rank=16`); two jobs that would still read the same are told apart by their job names, none is dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepseek_mini.analysis.sweep_report import Job


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (x lower, y lower), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def label_of(job: Job, keys: list[str]) -> str:
    """`rank=16, E=8` (the job's values of keys); `<sweep>: rank=16, E=8` when the report covers several sweeps."""
    parts = []
    for k in keys:
        v = job.value(k)
        parts.append(f"{_short(k)}={'dense' if k == 'n_routed_experts' and not v else _fmt(v)}")
    if not parts:
        return job.name  # names the sweep already when there are several
    sweep = getattr(job, "sweep", "")
    return f"{sweep}: {', '.join(parts)}" if sweep else ", ".join(parts)


def job_labels(jobs: list[Job], keys: list[str]) -> list[str]:
    """label_of each job, with the job's name added where two labels would be the same."""
    labels = [label_of(j, keys) for j in jobs]
    count = Counter(labels)
    return [f"{lab} ({j.name})" if count[lab] > 1 and lab != j.name else lab for lab, j in zip(labels, jobs)]


_SHORT = {"kv_lora_rank": "rank", "n_routed_experts": "E", "num_experts_per_tok": "top-k",
          "moe_intermediate_size": "width", "n_shared_experts": "shared", "num_key_value_heads": "kv heads",
          "intermediate_size": "ffn", "attention": "attn"}


def _short(key: str) -> str:
    return _SHORT.get(key, key.rsplit(".", 1)[-1])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis" if n > 10 else "tab10"]
    return [cmap(i / max(1, n - 1) * 0.9) if n > 10 else cmap(i) for i in range(n)]


def vs_points(jobs: list[Job], x_key: str) -> list[tuple[Job, float]]:
    """(job, x) of the completed jobs with a val loss and a numeric x_key: what plot_vs draws."""
    pts = [(j, _num(j.value(x_key))) for j in jobs if j.ok and j.val_loss is not None]
    return [(j, x) for j, x in pts if x is not None]


def plot_vs(jobs: list[Job], x_key: str, line_key: str | None, out: Path, title: str) -> bool:
    """Val loss against a numeric swept value (log2 axis), one line per value of line_key. Jobs at the same point
    (repeated seeds, or another swept value) are drawn as their mean with min-max error bars and `n=` beside it."""
    pts = vs_points(jobs, x_key)
    if len({x for _, x in pts}) < 2:
        return False
    plt = _plt()
    groups: dict[Any, dict[float, list[Job]]] = {}
    for j, x in pts:
        groups.setdefault(j.value(line_key) if line_key else None, {}).setdefault(x, []).append(j)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = sorted(groups, key=lambda g: (g is None, _num(g) if _num(g) is not None else 0, str(g)))
    repeated = any(len(members) > 1 for g in groups.values() for members in g.values())
    # the swept values that differ inside a point: what its mean is over
    within = sorted({k for g in groups.values() for members in g.values() if len(members) > 1
                     for k in {k for j in members for k in j.swept} - {x_key, line_key}
                     if len({repr(j.value(k)) for j in members}) > 1})
    if any(len({getattr(j, "sweep", "") for j in members}) > 1 for g in groups.values() for members in g.values()):
        within.append("sweeps")
    for color, g in zip(_colors(len(keys)), keys):
        xs = sorted(groups[g])
        vals = [[j.val_loss for j in groups[g][x]] for x in xs]
        mean = [sum(v) / len(v) for v in vals]
        name = (f"{_short(line_key)} = {'dense' if line_key == 'n_routed_experts' and not g else _fmt(g)}"
                if line_key else "val loss")
        if repeated:
            ax.errorbar(xs, mean, yerr=[[m - min(v) for m, v in zip(mean, vals)],
                                        [max(v) - m for m, v in zip(mean, vals)]],
                        fmt="o-", color=color, capsize=3, label=name)
            for x, m, v in zip(xs, mean, vals):
                ax.annotate(f"n={len(v)}", (x, m), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=color)
        else:
            ax.plot(xs, mean, "o-", color=color, label=name)
    ax.set_xscale("log", base=2)
    ax.margins(x=0.08)  # room for the n= labels
    xt = sorted({x for _, x in pts})
    ax.set_xticks(xt)
    ax.set_xticklabels([_fmt(int(x) if float(x).is_integer() else x) for x in xt])
    ax.set_xlabel(f"{x_key} (log2 scale)")
    ax.set_ylabel("final validation loss (nats/token)")
    if repeated:
        over = f" over {', '.join(within)}" if within else ""
        title = f"{title}\n(points: mean of n jobs{over}; bars: min-max)"
    ax.set_title(title, fontsize=10)
    if line_key:
        ax.legend(title=line_key, fontsize=8, title_fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_kv_pareto(jobs: list[Job], keys: list[str], out: Path) -> bool:
    ok = [j for j in jobs if j.ok and j.val_loss is not None and _num((j.results or {}).get("kv_cache_bytes_per_token"))]
    if not ok:
        return False
    pts = [(float(j.results["kv_cache_bytes_per_token"]), j.val_loss) for j in ok]
    if len({x for x, _ in pts}) < 2:
        return False  # every job caches the same bytes per token: nothing to trade off
    plt = _plt()
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    attn = sorted({str(j.value("attention")) for j in ok})
    markers = dict(zip(attn, "osD^v<>p"))
    colors = dict(zip(attn, _colors(len(attn))))
    for a in attn:
        sel = [p for p, j in zip(pts, ok) if str(j.value("attention")) == a]
        ax.scatter(*zip(*sel), marker=markers[a], color=colors[a], s=40, label=f"attention = {a}", zorder=3)
    fx, fy = zip(*[pts[i] for i in front])
    ax.plot(fx, fy, "--", color="crimson", lw=1.5, zorder=2, label="Pareto front (lower is better on both)")
    ax.scatter(fx, fy, s=140, facecolors="none", edgecolors="crimson", zorder=4)
    label_keys = [k for k in keys if k != "attention"] if len(attn) > 1 else keys
    labels = job_labels(ok, label_keys)
    annotate = front if len(ok) > 8 else range(len(ok))
    texts: dict[tuple[float, float], list[str]] = {}  # jobs at the same point (the same config in two sweeps): one note
    for i in annotate:
        j = ok[i]
        texts.setdefault(pts[i], []).append(labels[i] if len(attn) == 1 else
                                            f"{j.value('attention')}" + (f" ({labels[i]})" if label_keys else ""))
    for point, text in texts.items():
        ax.annotate("\n".join(text), point, textcoords="offset points", xytext=(6, 4), fontsize=7)
    if max(p[0] for p in pts) / max(1e-9, min(p[0] for p in pts)) > 8:
        ax.set_xscale("log", base=2)
        ticks = sorted({p[0] for p in pts})
        if len(ticks) <= 8:
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:,.0f}" for t in ticks])
    ax.margins(x=0.15, y=0.08)
    ax.set_xlabel("KV cache per token (bytes, bf16, all layers)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("Validation loss vs KV-cache size" + (" (front points labelled)" if len(ok) > 8 else ""))
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _seed_groups(jobs: list[Job], keys: list[str]) -> dict[str, list[Job]]:
    """Jobs that differ only in their seed, by the label of everything else (one entry per job otherwise)."""
    if "seed" not in keys:
        return {label: [j] for label, j in zip(job_labels(jobs, keys), jobs)}  # one entry per job, none dropped
    others = [k for k in keys if k != "seed"]
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        sweep = getattr(j, "sweep", "")
        label = label_of(j, others) if others else (f"{sweep}: all jobs" if sweep else "all jobs")
        groups.setdefault(label, []).append(j)
    return groups


def plot_curves(jobs: list[Job], keys: list[str], out: Path) -> bool:
    """Training and validation loss over training tokens, on one shared x range starting at 0 (the
    validation before training is the point at 0). Jobs that differ only in `seed` are drawn as their mean
    with a min-max band: the run-to-run noise to read the other differences against."""
    with_curves = [j for j in jobs if j.train_curve or j.val_curve]
    if not with_curves:
        return False
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    top = max(x for j in with_curves for x, _ in j.train_curve + j.val_curve)
    scale, unit = next(((s, u) for s, u in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands"))
                        if top >= 2 * s), (1.0, ""))
    groups = _seed_groups(with_curves, keys)
    for color, (label, members) in zip(_colors(len(groups)), groups.items()):
        states = sorted({getattr(j, "status_text", "failed") for j in members if not j.ok})
        failed = f" [{', '.join(states)}]" if states else ""
        for ax, attr in ((a1, "train_curve"), (a2, "val_curve")):
            curves = [dict(getattr(j, attr)) for j in members if getattr(j, attr)]
            if not curves:
                continue
            xs = sorted(set.intersection(*(set(c) for c in curves)))
            if len(curves) > 1 and xs:  # repeated seeds: mean line, min-max band
                ys = [[c[x] for c in curves] for x in xs]
                mean = [sum(v) / len(v) for v in ys]
                ax.fill_between([x / scale for x in xs], [min(v) for v in ys], [max(v) for v in ys], color=color,
                                alpha=0.25, lw=0)
                ax.plot([x / scale for x in xs], mean, "o-", color=color, ms=3, lw=1.2,
                        label=f"{label} (mean of {len(curves)} seeds, band = min-max){failed}")
            else:
                for c in curves:
                    cx = sorted(c)
                    ax.plot([x / scale for x in cx], [c[x] for x in cx], "o-", color=color, ms=3, lw=1.2,
                            label=f"{label}{failed}")
    for ax, what in ((a1, "training loss"), (a2, "validation loss")):
        ax.set_xlabel(f"training tokens{f' ({unit})' if unit else ''}")
        ax.set_ylabel(f"{what} (nats/token)")
        ax.set_title(f"{what.capitalize()} over tokens")
        if not ax.get_lines():  # say why the panel is empty rather than leave blank axes
            ax.text(0.5, 0.5, _no_curve_note(with_curves, what), transform=ax.transAxes, ha="center",
                    va="center", fontsize=9, wrap=True, color="0.3")
    a1.set_xlim(0, (top / scale or 1.0) * 1.03)  # shared: both panels from 0 (the step-0 validation) to the last token
    handles, labels = a2.get_legend_handles_labels()
    if not handles:
        handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               ncol=1 if len(groups) <= 16 else 2, title="job", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _no_curve_note(jobs: list[Job], what: str) -> str:
    """Why no job has a curve in a panel: training loss is logged every trainer.log_every_n_steps steps (default
    10), so a job of fewer steps logs none."""
    if what != "training loss":
        return "No job logged a validation loss."
    every = [e for e in (getattr(j, "log_every_n_steps", None) for j in jobs) if e]
    steps = [s for j in jobs for s in (getattr(j, "step", None), getattr(j, "logged_step", None)) if s is not None]
    every_n = min(every) if every else 10
    if steps and max(steps) < every_n:
        return (f"No training loss was logged: it is logged every\n{every_n} optimizer steps "
                f"(trainer.log_every_n_steps),\nand the jobs ran at most {max(steps)}.\n"
                "Lower trainer.log_every_n_steps to see it.")
    return "No training loss was logged\n(no train/loss row in any job's csv/metrics.csv)."


def plot_bars(jobs: list[Job], keys: list[str], out: Path) -> bool:
    ok = sorted([j for j in jobs if j.ok and j.val_loss is not None], key=lambda j: j.val_loss)
    if not ok:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(ok) + 1.5))
    labels = job_labels(ok, keys)
    vals = [j.val_loss for j in ok]
    ax.barh(range(len(ok)), vals, color=_colors(len(ok)))
    ax.set_yticks(range(len(ok)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    lo, hi = min(vals), max(vals)
    ax.set_xlim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel("final validation loss (nats/token; axis does not start at 0)")
    ax.set_title("Validation loss per job (best first)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True
