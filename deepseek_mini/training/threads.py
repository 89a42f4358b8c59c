"""How many threads torch uses for CPU work: the `cpu_threads` config key (auto | <n>).

torch's default is one intra-op thread per core. When anything else runs on the cores (a second training run,
the test suite) those threads spin waiting for each other: a 2-thread run under load measured 1.5x to 7x slower
than a 1-thread one. On an idle 2-core machine the second thread does help (the default run: 4,412 against
2,714 tokens/s), so `auto` trades idle speed for never collapsing under load; `cpu_threads=<n>` is the switch
when the cores are yours. README.md ("Quick start") has the timings. (The thread count is fixed per run rather
than read from the load average, so that two runs of one command, and a run and its resume, sum in the same
order and give the same numbers.)

    auto  one thread when training runs on the CPU (the accelerator is cpu, or auto without CUDA);
          torch's default on a GPU, where CPU threads only feed the device
    <n>   exactly n threads (OMP_NUM_THREADS is the other way to say it: auto leaves it alone if set)
"""

from __future__ import annotations

import os

import torch

from deepseek_mini.config import ConfigError

AUTO_CPU_THREADS = 1


def resolve_cpu_threads(value, trainer_cfg=None) -> int | None:
    """`cpu_threads` -> the thread count to set, or None to leave torch's default."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            return None  # the user already chose
        accel = str((trainer_cfg or {}).get("accelerator", "auto"))
        on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())
        return AUTO_CPU_THREADS if on_cpu else None
    try:
        n = int(value)
        if isinstance(value, bool) or n != float(value) or n < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"cpu_threads={value}: must be auto or a positive integer") from None
    cores = os.cpu_count() or 1
    if n > cores:  # more threads than cores only contend; 100000 failed to create them and crashed the process
        raise ConfigError(f"cpu_threads={value}: must be at most this machine's {cores} cores (or auto)")
    return n


def set_cpu_threads(value, trainer_cfg=None) -> int:
    """Apply `cpu_threads` (raises ConfigError for a bad value); returns the thread count now in use."""
    n = resolve_cpu_threads(value, trainer_cfg)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
