"""How many threads torch uses for CPU work: the `cpu_threads` config key (auto | <n>).

torch's default is one intra-op thread per core. The CPU models here are tiny (the `tiny` preset's matmuls
are 128 wide), so a second thread buys little even on an idle machine, and when anything else runs on the
cores (a second training run, the test suite) the threads spin waiting for each other: a 2-thread run under
load measured 7x slower than a 1-thread one (0.22 vs 1.6 it/s). README.md ("Quick start") has the timings
behind the `auto` choice.

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
    return n


def set_cpu_threads(value, trainer_cfg=None) -> int:
    """Apply `cpu_threads` (raises ConfigError for a bad value); returns the thread count now in use."""
    n = resolve_cpu_threads(value, trainer_cfg)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
