"""Learning-rate schedules as LambdaLR multipliers: warmup, then cosine to a floor, DeepSeek's steps, or constant.

DeepSeek-V2 trains with warmup then a step schedule (x0.316 at 80% and 90% of the tokens); warmup_cosine is
the usual default of small runs. Each is a function of the 0-based optimizer step.
"""

from __future__ import annotations

import math


def lr_lambda(schedule: dict, max_steps: int, anchor: tuple[int, float] | list | None = None):
    """Multiplier of the base lr at optimizer step `step` (0-based).

    `anchor=(step0, multiplier0)`: the run was resumed at step0 with a different max_steps (training.resume.
    ResumeSchedule). From step0 on, warmup_cosine's tail is stretched: it continues from multiplier0 down to
    min_lr_ratio at the new max_steps (so extending a run never raises the lr); the step schedule keeps the
    decays it had made and places the remaining milestones in the new length; constant is unchanged.
    """
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
    if anchor is None or int(anchor[0]) < warmup:  # warmup does not depend on max_steps: nothing to anchor
        return fn
    step0, mult0, base = int(anchor[0]), float(anchor[1]), fn
    if name == "warmup_cosine":
        min_ratio = float(schedule.get("min_lr_ratio", 0.1))

        def fn(step):
            if step < step0:
                return base(step)
            progress = min(1.0, (step - step0) / max(1, total - step0))
            return min_ratio + (mult0 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif name == "step":
        def fn(step):
            return base(step) if step < step0 else min(mult0, base(step))
    return fn
