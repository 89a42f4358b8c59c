"""Reliability: exact resume, atomic checkpoints, early config checks, training faults, one-line CLI errors.

* `cli_entry(main, config_name)` wraps a `@hydra.main` function for the entry points. It resolves
  `ckpt_path=last` / `resume=true` without `hydra.run.dir=` to the latest run that has
  `checkpoints/last.ckpt` (and makes that run's directory the output directory), and turns Hydra's
  multi-line composition errors (unknown key, bad override, missing group option) into one
  `error: ...` line with exit status 2. `HYDRA_FULL_ERROR=1` keeps Hydra's own output.
* `check_config(cfg)` runs the cheap checks that must fail before any data preparation.
* `resolve_ckpt_path` / `check_checkpoint_file`: `ckpt_path=last`, and a truncated or corrupt file named
  in one line before any heavy work.
* `AtomicCheckpointIO`: checkpoints are written to `<path>.tmp-<pid>`, fsynced, then renamed, so a crash
  during a save never leaves a partial `last.ckpt`.
* `RNGStateCallback`: torch / numpy / python (and CUDA) RNG states in the checkpoint (Lightning does not
  restore them), stored as tensors and plain containers so `weights_only` loading still works.
* `NonFiniteLossGuard`: stops on a NaN/Inf loss and refuses to checkpoint the bad state.
* `ResumableCSVLogger`: on resume, keeps the run's `metrics.csv` rows before the resume step and appends.
* `FaultInjector` (tests only, `DSMINI_FAULT` env var): `kill_at_step:N`, `nan_at_step:N`, `oom_at_step:N`,
  optionally `,job:K` to hit only job K of a multirun.
"""

from __future__ import annotations

import csv
import functools
import glob
import logging
import os
import random
import re
import signal
import socket
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig

from deepseek_mini.checkpoint import CheckpointError
from deepseek_mini.config import ConfigError

log = logging.getLogger(__name__)

WANDB_RUN_ID_FILE = "wandb_run_id.txt"


class TrainingFault(RuntimeError):
    """A fault while training (non-finite loss, out of memory): one-line message, exit status 1."""


class NonFiniteLossError(TrainingFault):
    pass


# ---------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same directory, fsync, then os.replace onto the target.

    Unlike Lightning's default (which serialises the whole checkpoint into memory first) this streams to
    disk, and the rename makes `last.ckpt` either the old or the new complete file, never a partial one.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:  # pragma: no cover (platforms without directory fsync)
            pass


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """A readable, complete torch zip checkpoint, or CheckpointError naming the file (no unpickling)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .ckpt file (e.g. {path}/last.ckpt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"cannot read checkpoint {path}: empty file")
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint")
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # CRC of every member: catches truncation and bit rot
        if bad is not None:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt member {bad}")
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile, OSError, ...
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {msg}") from None
    return path


def resolve_ckpt_path(ckpt_path: Any, output_dir: Path, resume: bool = False) -> Path | None:
    """cfg.ckpt_path (`null`, `last` or a file) -> a checked checkpoint file in this run, or None.

    `last` (or resume=true) means `<output dir>/checkpoints/last.ckpt`. Without `hydra.run.dir=`,
    `cli_entry` has already pointed the output dir at the latest run that has one.
    """
    if ckpt_path in (None, "", "null"):
        if not resume:
            return None
        ckpt_path = "last"
    if str(ckpt_path) == "last":
        path = output_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise CheckpointError(f"ckpt_path=last: no checkpoint {path}; resume with hydra.run.dir=<run dir> "
                                  "ckpt_path=last, or give ckpt_path=<file>")
        return check_checkpoint_file(path)
    return check_checkpoint_file(Path(str(ckpt_path)).expanduser().resolve())


def checkpoint_global_step(path: Path) -> int | None:
    """The global step stored in a Lightning checkpoint (memory-mapped, so the weights are not read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {one_line(e, 200)}") from None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if step is not None else None


def latest_run_with_checkpoint(runs_dir: Path) -> Path | None:
    """The most recently written run dir under `runs_dir` that has checkpoints/last.ckpt."""
    found = [Path(p).parent.parent for p in glob.glob(str(runs_dir / "*" / "checkpoints" / "last.ckpt"))]
    return max(found, key=lambda d: (d / "checkpoints" / "last.ckpt").stat().st_mtime) if found else None


# ---------------------------------------------------------------------- config checks
def _get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part)
    return default if node is None else node


def check_config(cfg: DictConfig, model_cfg) -> None:
    """Cheap checks that must fail before data preparation: sizes, seq_len vs positions, ckpt_path."""
    for key in ("data.seq_len", "data.batch_size", "trainer.max_steps", "trainer.val_check_interval",
                "trainer.log_every_n_steps", "trainer.accumulate_grad_batches"):
        value = _get(cfg, key)
        if value is None or isinstance(value, float) and key == "trainer.val_check_interval":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            if key == "trainer.max_steps" and value == -1:
                raise ConfigError("trainer.max_steps=-1: training is step-based, set a positive number of steps")
            raise ConfigError(f"{key}={value!r}: must be a positive integer")
    from deepseek_mini.training.module import adamw_kind, check_bf16_weights, compile_mode, moments_dtype

    try:
        compile_mode(cfg.get("compile", False))
        adamw_kind(_get(cfg, "optim.fused", "auto"), on_cuda=False)
        check_bf16_weights(_get(cfg, "optim.bf16_weights", "auto"))
        # as on a GPU with the Triton step: a bad value or betas fail here, before data preparation
        moments_dtype(_get(cfg, "optim.moments_dtype", "auto"), "triton", tuple(_get(cfg, "optim.betas", (0.9, 0.95))))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seq_len = _get(cfg, "data.seq_len")
    if seq_len is not None and seq_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len={seq_len} exceeds model.max_position_embeddings="
                          f"{model_cfg.max_position_embeddings}: lower data.seq_len or raise the model's")


# ---------------------------------------------------------------------- callbacks
class RNGStateCallback(L.Callback):
    """Saves and restores the torch, CUDA, numpy and python RNG states with the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "torch" in state:
            torch.set_rng_state(state["torch"].cpu())
        if "numpy" in state:
            s = state["numpy"]
            np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                                 s["cached_gaussian"]))
        if "python" in state:
            s = state["python"]
            random.setstate((s["version"], tuple(s["internal"]), s["gauss"]))
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda])
        log.info("restored RNG states from the checkpoint")


class NonFiniteLossGuard(L.Callback):
    """Stops training on a NaN/Inf training loss; never lets a checkpoint of the bad state be written.

    On CPU the loss is checked every step. On a GPU a device-side flag is accumulated every step (no
    host sync) and read every `check_every` steps (default: trainer.log_every_n_steps) and before every
    checkpoint save, where the weights are checked too.
    """

    def __init__(self, ckpt_dir: str | os.PathLike | None = None, check_every: int | None = None):
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.check_every = check_every
        self._bad: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None

    def _fail(self, trainer, what: str) -> None:
        last = self.ckpt_dir / "last.ckpt" if self.ckpt_dir else None
        kept = f"last good checkpoint: {last}" if last is not None and last.is_file() else "no checkpoint saved yet"
        raise NonFiniteLossError(f"{what} at step {trainer.global_step}; training stopped, {kept}")

    def _kind(self) -> str:
        loss = self._last_loss
        if loss is not None and torch.isnan(loss).any():
            return "nan"
        if loss is not None and torch.isinf(loss).any():
            return "inf"
        return "nan/inf"

    def _check(self, trainer) -> None:
        if self._bad is not None and bool(self._bad):
            self._fail(trainer, f"non-finite loss ({self._kind()})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        self._bad = bad if self._bad is None else self._bad | bad
        self._last_loss = loss
        every = self.check_every or max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if loss.device.type == "cpu" or trainer.global_step % every == 0:
            self._check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._check(trainer)
        flags = [torch.isfinite(p.detach()).all() for p in pl_module.parameters()]
        if flags and not bool(torch.stack(flags).all()):
            self._fail(trainer, "non-finite weights")


class FaultInjector(L.Callback):
    """Test hook (DSMINI_FAULT): kill the process, poison the weights or raise an OOM at a given step."""

    def __init__(self, spec: dict[str, int]):
        self.spec = spec

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step + 1  # the step this batch makes
        if self.spec.get("oom_at_step") == step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by DSMINI_FAULT)")
        if self.spec.get("nan_at_step") == step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.spec.get("kill_at_step") == trainer.global_step:
            os.kill(os.getpid(), signal.SIGKILL)


def fault_injector_from_env(job_num: int | None = None) -> FaultInjector | None:
    spec_str = os.environ.get("DSMINI_FAULT", "").strip()
    if not spec_str:
        return None
    spec = {}
    for part in spec_str.split(","):
        key, _, value = part.partition(":")
        spec[key.strip()] = int(value)
    if "job" in spec and spec.pop("job") != (job_num if job_num is not None else 0):
        return None
    log.warning("DSMINI_FAULT=%s: injecting a fault (test hook)", spec_str)
    return FaultInjector(spec)


# ---------------------------------------------------------------------- loggers
class ResumableCSVLogger(CSVLogger):
    """CSVLogger that, when resuming at `resume_step`, keeps the earlier rows of metrics.csv and appends.

    Lightning's writer deletes an existing metrics.csv; rows logged after the checkpoint by the
    interrupted run (steps >= resume_step) are dropped because the resumed run logs them again.
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        old = Path(self.log_dir) / "metrics.csv"
        rows, keys = [], []
        if self._resume_step is not None and old.is_file():
            with open(old, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < self._resume_step]
        exp = CSVLogger.experiment.fget(self)
        if keys:
            with open(exp.metrics_file_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            exp.metrics_keys = sorted(keys)
            log.info("csv logger: kept %d rows of %s before step %d", len(rows), old, self._resume_step)
        return exp


def read_wandb_run_id(run_dir: Path) -> str | None:
    p = run_dir / WANDB_RUN_ID_FILE
    if p.is_file():
        value = p.read_text().strip()
        return value or None
    return None


def write_wandb_run_id(run_dir: Path, run_id: str) -> None:
    (run_dir / WANDB_RUN_ID_FILE).write_text(f"{run_id}\n")


def wandb_online_problem(timeout: float = 3.0) -> str | None:
    """Why online wandb logging cannot work here (no key, host unreachable), or None if it may."""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators(urlparse(base).hostname or "api.wandb.ai") is not None
        except Exception:
            has_key = False
    if not has_key:
        return "no wandb API key found (wandb login / WANDB_API_KEY)"
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return None  # wandb will not go online anyway: no network probe
    url = urlparse(base)
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot reach {host}:{port} ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------- errors
def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text[:limit] or type(exc).__name__


def fault_message(exc: BaseException) -> str:
    if is_oom(exc):
        return f"CUDA out of memory ({one_line(exc, 200)}); lower data.batch_size or the model size"
    return one_line(exc)


def _hydra_error_line(ex: BaseException) -> str:
    msg = str(ex)
    m = re.search(r"Could not override '([^']+)'", msg)
    cause = ex.__cause__
    cause_first = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
    if m and "not in struct" in cause_first:
        key = m.group(1)
        return f"unknown config key '{key}' (check the spelling; to add a new key use +{key}=...)"
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    if lines and lines[0].startswith("In ") and "Could not find" in msg:  # missing group option
        opts = []
        for x in lines[1:]:
            if x.startswith("Config search path"):
                break
            if not x.startswith("Available options"):
                opts.append(x)
        return f"{lines[0]} (available: {', '.join(opts)})" if opts else lines[0]
    text = "; ".join(lines)
    if cause_first and cause_first not in text:
        text = f"{text}: {cause_first}"
    if "Error parsing override" in text:  # e.g. prompt=def main(
        text = (f"{text.split('; See https')[0]} (quote a value with ( ) , = or spaces as 'key=\"...\"'; "
                "a prompt can also come from prompt_file=<path>, or prompt_file=- for stdin)")
    return text[:500]


def _preflight_resume(argv: list[str], config_dir: str, config_name: str) -> list[str]:
    """`ckpt_path=last` / `resume=true` without hydra.run.dir: continue in the latest run with a checkpoint."""
    overrides = [a for a in argv if not a.startswith("-")]
    wants_last = any(a in ("ckpt_path=last", "resume=true", "resume=True") for a in overrides)
    if not wants_last or any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in overrides) \
            or any(a in ("-m", "--multirun") for a in argv):
        return argv
    from hydra import compose, initialize_config_dir

    plain = [a for a in overrides if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=plain)
    runs = Path(str(cfg.paths.log_dir)) / str(cfg.task_name) / "runs"
    run_dir = latest_run_with_checkpoint(runs)
    if run_dir is None:
        raise CheckpointError(f"ckpt_path=last: no run under {runs} has checkpoints/last.ckpt "
                              "(give hydra.run.dir=<run dir> or ckpt_path=<file>)")
    print(f"resuming the latest run: {run_dir}", file=sys.stderr)
    return [*argv, f"hydra.run.dir={run_dir}"]


def cli_entry(main, config_dir: str | os.PathLike, config_name: str):
    """Run a `@hydra.main` function with one-line errors for composition problems and `last` resolution."""

    @functools.wraps(main)
    def wrapped():
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        full = os.environ.get("HYDRA_FULL_ERROR") == "1"
        try:
            if config_name == "train":
                sys.argv[1:] = _preflight_resume(sys.argv[1:], str(config_dir), config_name)
        except (CheckpointError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except (HydraException, OmegaConfBaseException) as e:
            if full:
                raise
            print(f"error: {_hydra_error_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        if full:
            return main()
        os.environ["HYDRA_FULL_ERROR"] = "1"  # let Hydra raise instead of printing; we print one line
        try:
            return main()
        except (HydraException, OmegaConfBaseException) as e:
            print(f"error: {_hydra_error_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)

    return wrapped


__all__ = ["AtomicCheckpointIO", "FaultInjector", "NonFiniteLossError", "NonFiniteLossGuard", "RNGStateCallback",
           "ResumableCSVLogger", "TrainingFault", "check_checkpoint_file", "check_config", "cli_entry",
           "fault_injector_from_env", "fault_message", "is_oom", "latest_run_with_checkpoint",
           "read_wandb_run_id", "resolve_ckpt_path", "wandb_online_problem", "write_wandb_run_id"]
