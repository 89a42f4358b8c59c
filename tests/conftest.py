"""Shared test setup: offline everything, and a helper that runs train.py / eval.py as a user would."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_mini.training import presets  # noqa: F401  (model=<preset> for the tests that compose configs)
from deepseek_mini.training.compile import cpu_compile_problem

# The model tests' tensors are tiny: intra-op threads only add contention on a shared 2-core box (measured: the
# 60-step training test takes 0.3 s on one thread, over 10 s on two under load).
torch.set_num_threads(1)

# No network in tests or CI: wandb writes offline runs, datasets / hub never reach out.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

# A model and data small enough that a CLI run takes seconds on a 2-core CPU.
TINY_OVERRIDES = [
    "model.vocab_size=512",
    "model.max_position_embeddings=64",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.max_chars=200000",
    "data.val_fraction=0.1",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=2",
    "scheduler.warmup_steps=2",
    "callbacks.samples.max_new_tokens=8",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
]


def run_cli(script: str, *args: str, cwd: Path = ROOT, check: bool = True, timeout: int = 300):
    """`python <script> <args>` from the repo root, as in the README; returns the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_config_of(tmp_path: Path, *overrides: str):
    """RunConfig.from_cfg of `train.py <TINY_OVERRIDES> <overrides>`, as cli_entry checks a command before Hydra
    runs (the run dir is tmp_path/run, which a refused command must leave uncreated)."""
    from hydra import compose, initialize_config_dir

    from deepseek_mini.training.run_config import RunConfig

    data_dir = tmp_path / "data"  # the Gutenberg files' names, empty: the settings check lists them, never reads
    data_dir.mkdir(exist_ok=True)
    for name in ("gutenberg_classics_train.txt.gz", "gutenberg_classics_valid.txt"):
        (data_dir / name).touch()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY_OVERRIDES, f"paths.data_dir={data_dir}", *overrides],
                      return_hydra_config=True)
    cfg.paths.output_dir = str(tmp_path / "run")
    return RunConfig.from_cfg(cfg, tmp_path / "run")


def load_script(relpath: str, monkeypatch):
    """A script of the repository (e.g. "scripts/bench/bench_decode.py") as a module, its folder on sys.path as when
    it runs: its main() or helpers are then called in this process, without a fresh interpreter's imports."""
    path = ROOT / relpath
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script_inprocess(script: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`python <script> <args>` (a path from the repo root) run in this process: its __main__ block, Hydra and
    the one-line error handling included, without a fresh interpreter's imports. For command lines that end
    before any model work (argument errors). Returns (exit code, stdout, stderr)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                     reason="Triton is not installed (CPU-only torch)")


def worst_of(*errors: float) -> float:
    """The largest of the errors, a NaN counted as infinite. Python's max() passes over a NaN that is not its first
    argument (max(0.0, nan) == 0.0), so a kernel whose output went NaN would read as exact against its reference;
    every comparison that keeps a running largest difference goes through here."""
    return math.inf if any(math.isnan(e) for e in errors) else max(errors)


# the compiled CPU step is refused below the torch that computes its gradients right (training/compile.py)
needs_trusted_cpu_compile = pytest.mark.skipif(cpu_compile_problem() is not None, reason=str(cpu_compile_problem()))


def interpreter_unusable() -> str | None:
    """Why Triton's CPU interpreter cannot run some of our kernels in this environment, or None. Before Triton 3.7 it turns
    a scalar argument into a Python int with int() of a one-element array (a kernel's `range(start, end)` over
    runtime bounds), which NumPy 2.x refuses ("only 0-dimensional arrays can be converted"): the GPU image's
    Triton 3.6 with its NumPy. The kernels themselves run there; the CUDA tests check them."""
    import importlib.metadata

    import numpy as np

    version = tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2])
    try:
        int(np.zeros(1, dtype=np.int64))
    except TypeError:
        if version < (3, 7):
            return (f"Triton {importlib.metadata.version('triton')}'s interpreter cannot run these kernels with "
                    f"NumPy {np.__version__} (int() of a one-element array; fixed in Triton 3.7)")
    return None


def max_diff_under_interpreter(module: str, compare: str | list[str]) -> float | dict[str, float]:
    """Runs tests/<module>.py's `compare()` (a kernel against its reference, returning the largest difference) in a
    fresh interpreter with TRITON_INTERPRET=1 (Triton reads it at import), so the kernel runs on CPU tensors.
    Several compare functions (a list) share one interpreter, whose start-up (torch + Triton) is most of the
    time; then the result is {name: largest difference}. Skips the calling test where it failed for the
    interpreter's known defect (interpreter_unusable), and only then."""
    names = [compare] if isinstance(compare, str) else list(compare)
    code = ("import sys; sys.path.insert(0, 'tests'); from deepseek_mini.kernels import runtime; "
            "assert runtime.INTERPRET and runtime.triton is not None; "
            f"import {module} as m; "
            f"[print('MAXDIFF', name, getattr(m, name)()) for name in {names!r}]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    why = interpreter_unusable()
    if proc.returncode != 0 and why is not None and "only 0-dimensional arrays can be converted" in proc.stderr:
        pytest.skip(why)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    diffs = {line.split()[1]: float(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("MAXDIFF")}
    assert list(diffs) == names, proc.stdout[-2000:]
    assert not any(math.isnan(d) for d in diffs.values()), diffs  # NaN compares false with any tolerance, but say so
    return diffs[compare] if isinstance(compare, str) else diffs


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer / token cache shared by the CLI tests of a session (they reuse it, as users do)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save (test_plots, test_sweep_report), kept open for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    yield figs
    for fig in figs:
        if fig is not None:
            close(fig)
