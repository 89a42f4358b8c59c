"""The block a training run ends on: what it reached, how fast, where it is, and how to go on.

`format_summary(results)` reads only results.json's fields, so the block and the file never disagree;
train() prints it as the last thing on screen (wandb's own end-of-run summary goes to its log file).
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def _seconds(value) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)} min {seconds:.1f} s" if minutes else f"{seconds:.1f} s"


_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/.:+@~%-]+")  # what Hydra's override grammar reads unquoted in a path


def hydra_value(value) -> str:
    """A value as Hydra's override grammar reads it back unchanged: plain ASCII path characters as they are,
    anything else (letters outside ASCII, spaces, commas, quotes) in Hydra's own quotes. A run dir named
    `runs/ü` printed bare made the printed resume command a Hydra parse error."""
    v = str(value)
    if _HYDRA_PLAIN.fullmatch(v):
        return v
    # inside Hydra's quotes a backslash escapes only a quote or the end: double those, escape the quotes
    v = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", v)
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, v) + "'"


def _arg(key: str, value) -> str:
    """key=value as one shell word that Hydra parses back to `value`: quoted only when it must be."""
    return shlex.quote(f"{key}={hydra_value(value)}")


def resume_command(results: dict) -> str | None:
    """`python train.py hydra.run.dir=<run> ckpt_path=last trainer.max_steps=<2 x steps>` (twice as long)."""
    if not results.get("checkpoint") or not results.get("run_dir"):
        return None
    more = max(1, 2 * int(results.get("global_step") or 0))
    return f"python train.py {_arg('hydra.run.dir', results['run_dir'])} ckpt_path=last trainer.max_steps={more}"


def eval_command(results: dict) -> str | None:
    ckpt = results.get("best_checkpoint") or results.get("checkpoint")
    return f"python eval.py {_arg('ckpt_path', ckpt)}" if ckpt else None


STAGE_NAMES = {"launch": "start-up"}  # Python, the imports and Hydra before train() (training/startup.py)


def _graphs(graphs) -> str:
    """' for 10 graphs, 8 from the cache' from results.json's first_step_graphs; '' without any."""
    n = sum(v for v in graphs.values() if isinstance(v, int)) if isinstance(graphs, dict) else 0
    return f" for {n} graphs, {graphs.get('from_cache', 0)} from the cache" if n else ""


def _time_line(results: dict) -> str:
    """'first step after 24.1 s from launch (start-up 3.2 s, data 1.0 s, model 0.4 s, validation 0.5 s, fit 19.0 s,
    compiling 12.3 s for 10 graphs, 8 from the cache), wall 1 min 1.0 s': the parts before fit() (results.json's
    startup_sec), then fit's."""
    first = f"first step after {_seconds(results.get('time_to_first_step_sec'))} from launch"
    stages = results.get("startup_sec") if isinstance(results.get("startup_sec"), dict) else {}
    parts = [f"{STAGE_NAMES.get(stage, stage)} {_seconds(secs)}" for stage, secs in stages.items()
             if isinstance(secs, (int, float))]
    fit, compiling = results.get("fit_to_first_step_sec"), results.get("compile_time_sec")
    if isinstance(fit, (int, float)):
        parts.append(f"fit {_seconds(fit)}")
    if isinstance(compiling, (int, float)) and compiling > 0:
        parts.append(f"compiling {_seconds(compiling)}{_graphs(results.get('first_step_graphs'))}")
    if parts:
        first += f" ({', '.join(parts)})"
    return f"{first}, wall {_seconds(results.get('wall_time_sec'))}"


def format_summary(results: dict) -> str:
    """results.json of a training run -> the short block the console ends with."""
    start, end = results.get("val_loss_start"), results.get("val_loss")
    val = f"{_loss(start)} -> {_loss(end)}" if start is not None else _loss(end)
    ppl = results.get("val_perplexity")
    if isinstance(ppl, (int, float)):
        val += f"   (perplexity {ppl:.2f})"
    lines = [
        ("val loss", val),
        ("train loss", _loss(results.get("train_loss"))),
        ("steps", f"{results.get('global_step', 0)}"
                  + (f" (resumed at {results['resumed_at_step']})" if results.get("resumed_at_step") else "")),
        ("tokens", f"{int(results.get('tokens_seen') or 0):,} seen, {float(results.get('tokens_per_sec') or 0):,.0f}"
                   " tokens/s"),
        ("time", _time_line(results)),
    ]
    best, last = results.get("best_checkpoint"), results.get("checkpoint")
    if best and best != last:
        lines.append(("best ckpt", str(best)))
    lines.append(("last ckpt", str(last) if last else "none (nothing saved in this mode)"))
    lines.append(("run dir", str(results.get("run_dir"))))
    for name, cmd in (("resume", resume_command(results)), ("evaluate", eval_command(results))):
        if cmd:
            lines.append((name, cmd))
    lines.append(("results", str(Path(str(results.get("run_dir"))) / "results.json")))
    rule = "-" * 24
    # "label: value", unaligned: scripts (and the tests) grep for "run dir: <path>"
    return "\n".join([f"{rule} run summary {rule}", *(f"{k}: {v}" for k, v in lines)])
