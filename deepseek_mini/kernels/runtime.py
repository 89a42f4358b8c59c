"""Whether the Triton kernels can run: the one `import triton` guard and the one interpreter switch; and their
compilation ahead of the first launch.

CPU-only installs have no Triton; every kernel's caller then takes its PyTorch path. With
TRITON_INTERPRET=1 (read once, at import, as Triton itself does) the kernels run on CPU tensors through
Triton's interpreter, which is how the tests check them without a GPU. Kernel modules read `INTERPRET`
and `triton` from this module at call time, so a test can switch them in one place.

Triton compiles a kernel at its first launch, in the launching thread: 0.1-0.9 s per variant on an H200 (most of
it waiting for `ptxas`), plus ~0.4 s to build its launcher with the C compiler. In a training run the router's
top-k (in the validation before fit), the experts' SwiGLU backward and the AdamW step and gradient norm were
compiled that way, one after the other: 2-3 s of a cold start's wait for the first step (docs/benchmarks.md).
`compile_ahead` compiles them in background threads at the start of the run instead (`kernel.warmup`: no launch,
no GPU memory), and `launch` makes the first launch of a kernel whose compilation is still under way wait for it
rather than compile it a second time. Each kernel module compiles through the same launch code it runs with (its
`warm_up`), so the two cannot compile different variants of a kernel by drifting apart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every caller uses its PyTorch path
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(t: torch.Tensor) -> bool:
    """Triton is installed and can reach this tensor: on CUDA, or on CPU under the interpreter."""
    return triton is not None and (t.is_cuda or INTERPRET)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is contiguous (the kernels take the other strides: a split GEMM output's
    columns, say), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ------------------------------------------------------------------ compilation ahead of the first launch
log = logging.getLogger(__name__)

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_started: dict[str, Future] = {}  # job name -> its compilation (a name is compiled once per process)
_pending: dict[object, list[Future]] = {}  # kernel -> the compilations of it not yet waited for


def compiles() -> bool:
    """Kernels are compiled here (CUDA): not on a CPU-only install, nor under the interpreter."""
    return triton is not None and not INTERPRET and torch.cuda.is_available()


def compile_ahead(jobs: dict[str, tuple[object, Callable[[], object]]], device: torch.device | int | None = None) -> list[Future]:
    """Start compiling kernels in background threads, before their first launch.

    `jobs` maps a name (what is compiled: "route_top_k E=64 K=6") to (the @triton.jit kernel, a call that compiles
    that variant through the kernel module's launch code, as `warm_up(...)` functions do). A name already started
    in this process is not started again. `device`: the CUDA device the kernels will run on (its index keys
    Triton's kernel cache; the current one when None). A job that fails is only logged: the launch then
    compiles as it always did, and raises what is really wrong. Returns the started jobs' futures.
    """
    global _pool
    if not compiles() or (isinstance(device, torch.device) and device.type != "cuda"):
        return []
    index = device.index if isinstance(device, torch.device) else device
    if index is None:
        index = torch.cuda.current_device()
    started = []
    with _lock:
        for name, (kernel, job) in jobs.items():
            if name in _started:
                continue
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="triton-compile-ahead")
            future = _pool.submit(_run_job, name, job, index)
            _started[name] = future
            _pending.setdefault(kernel, []).append(future)
            started.append(future)
    return started


def _run_job(name: str, job: Callable[[], object], index: int) -> None:
    try:
        with torch.cuda.device(index):  # Triton compiles for, and caches under, the thread's current device
            job()
    except Exception as e:  # an optimisation only: the first launch compiles, and raises a real problem itself
        log.debug("compiling %s ahead failed: %s", name, e)


def compiling(kernel: object) -> bool:
    """Whether a compilation of `kernel` started ahead is still under way: an eager caller with an exact
    PyTorch path of its own may take it rather than wait (the router's top-k in the validation before fit)."""
    return any(not f.done() for f in _pending.get(kernel, ()))


def wait_for(kernel: object) -> None:
    """Wait for the compilations of `kernel` started ahead, if any are still running (`launch` does this)."""
    if kernel not in _pending:
        return
    with _lock:
        futures = _pending.pop(kernel, [])
    for future in futures:
        future.exception()  # waits; _run_job never raises


def launch(kernel, grid, *args, warmup: bool = False, **kwargs):
    """`kernel[grid](*args, **kwargs)`, after any compilation of it started ahead has finished. With warmup=True,
    only the compilation of the variant these arguments select (tensor arguments may then be given as their
    dtypes), which is what `compile_ahead` jobs run."""
    if warmup:
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        _build_launcher(compiled)
        return compiled
    wait_for(kernel)
    return kernel[grid](*args, **kwargs)


def _build_launcher(compiled) -> None:
    """Build the host-side launcher the kernel's first launch needs, into Triton's disk cache: a small C module
    per kernel signature that Triton compiles with the system's C compiler (~0.4 s, seen at the first launch of
    the AdamW step). Only the build: loading the kernel onto the GPU stays with the first launch, since a
    background thread must not call into CUDA while the main thread may be capturing a CUDA graph."""
    try:
        from triton.runtime.driver import driver

        driver.active.launcher_cls(compiled.src, compiled.metadata)
    except Exception as e:  # another Triton's internals: the first launch builds it, as before
        log.debug("building a launcher ahead failed: %s", e)
