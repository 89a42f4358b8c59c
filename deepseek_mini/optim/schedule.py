"""Learning-rate schedules as LambdaLR multipliers: warmup, then cosine to a floor, DeepSeek's steps, or constant.

DeepSeek-V2 trains with warmup then a step schedule (x0.316 at 80% and 90% of the tokens); warmup_cosine is
the usual default of small runs. Each is a function of the 0-based optimizer step.
"""

from __future__ import annotations

import math


def lr_lambda(schedule: dict, max_steps: int):
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    name = schedule.get("name", "warmup_cosine")
    warmup = max(0, int(schedule.get("warmup_steps", 0)))
    total = max(1, int(max_steps))

    def warm(step: int) -> float | None:
        return (step + 1) / warmup if step < warmup else None

    if name == "warmup_cosine":
        min_ratio = float(schedule.get("min_lr_ratio", 0.1))

        def fn(step):
            w = warm(step)
            if w is not None:
                return w
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif name == "step":
        milestones = [float(m) * total for m in schedule.get("milestones", [0.8, 0.9])]
        gamma = float(schedule.get("gamma", 0.316))

        def fn(step):
            w = warm(step)
            return w if w is not None else gamma ** sum(step >= m for m in milestones)
    elif name == "constant":
        def fn(step):
            w = warm(step)
            return 1.0 if w is None else w
    else:
        raise ValueError(f"unknown scheduler {name!r}; use warmup_cosine, step or constant")
    return fn
