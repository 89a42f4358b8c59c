"""Guards around the training loop: non-finite losses, interrupts, and the fault-injection test hook.

* `NonFiniteLossGuard`: stops on a NaN/Inf loss or gradient norm and refuses to checkpoint the bad state.
* `InterruptCheckpoint`: Ctrl-C (SIGINT) or SIGTERM stops training at the next step boundary through
  Lightning's own SIGTERM path (`trainer.received_sigterm` -> `SIGTERMException` -> `on_exception`), where
  last.ckpt is saved; train() then writes results.json (`"status": "interrupted"`) and prints the resume
  command. A second Ctrl-C stops at once.
* `StopBeforeFit`: SIGTERM before fit() starts stops the run with one line (exit status 143), as Ctrl-C does.
* `RestoreSignalHandlers`: train() leaves the SIGINT / SIGTERM handlers as it found them, however it ends.
* `FaultInjector` (tests only, `DSMINI_FAULT` env var): `kill_at_step:N`, `nan_at_step:N`, `oom_at_step:N`,
  `sigint_at_step:N`, `sigterm_at_step:N`, optionally `,job:K` to hit only job K of a multirun.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from deepseek_mini.training.errors import NonFiniteLossError

log = logging.getLogger(__name__)


class NonFiniteLossGuard(L.Callback):
    """Stops training on a NaN/Inf training loss or gradient norm; never lets a checkpoint of the bad state be
    written.

    On CPU the loss is checked every step. On a GPU a device-side flag is accumulated every step (no
    host sync) and read every `check_every` steps (default: trainer.log_every_n_steps) and before every
    checkpoint save, where the weights are checked too. The gradient norm is the one LitDeepSeek computed
    for this step (`last_grad_norm`: every step when gradients are clipped, at logging steps otherwise). A
    non-finite norm with finite losses is the silent case: clipping by it zeroes the update, so the run went on
    without learning (DDP with per-block CUDA graphs on two H200s: norm inf from step 19, "completed").
    """

    def __init__(self, ckpt_dir: str | os.PathLike | None = None, check_every: int | None = None):
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.check_every = check_every
        self._bad: torch.Tensor | None = None
        self._last_loss: torch.Tensor | None = None
        self._bad_norm: torch.Tensor | None = None  # device flags, as _bad: no host sync between checks
        self._nan_norm: torch.Tensor | None = None

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
        if self._bad_norm is not None and bool(self._bad_norm):
            kind = "nan" if self._nan_norm is not None and bool(self._nan_norm) else "inf"
            self._fail(trainer, f"non-finite gradient norm ({kind})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        self._bad = bad if self._bad is None else self._bad | bad
        self._last_loss = loss
        norm = getattr(pl_module, "last_grad_norm", None)
        if isinstance(norm, torch.Tensor):  # this step's norm (the module sets it again when it computes one)
            pl_module.last_grad_norm = None
            bad, nan = ~torch.isfinite(norm), torch.isnan(norm)
            self._bad_norm = bad if self._bad_norm is None else self._bad_norm | bad
            self._nan_norm = nan if self._nan_norm is None else self._nan_norm | nan
        every = self.check_every or max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if loss.device.type == "cpu" or trainer.global_step % every == 0:
            self._check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._check(trainer)
        flags = [torch.isfinite(p.detach()).all() for p in pl_module.parameters()]
        if flags and not bool(torch.stack(flags).all()):
            self._fail(trainer, "non-finite weights")


class InterruptCheckpoint(L.Callback):
    """SIGINT / SIGTERM: finish the current step, save `ckpt_path`, and let train() report the interrupt.

    Lightning already turns SIGTERM into a stop at the next step boundary (and tells every DDP rank); a first
    Ctrl-C is routed the same way instead of Lightning's KeyboardInterrupt, which can land mid-step and saves
    nothing. `signal_name` and `saved` say what happened once fit() has raised SIGTERMException.
    """

    def __init__(self, ckpt_path: str | os.PathLike):
        self.ckpt_path = Path(ckpt_path)
        self.signal_name: str | None = None
        self.saved: Path | None = None
        self._previous = None

    def on_fit_start(self, trainer, pl_module):
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigint(signum, frame):
            if self.signal_name is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self.signal_name = "SIGINT"
            log.warning("Ctrl-C: stopping after this step and saving %s (Ctrl-C again to stop at once)",
                        self.ckpt_path)
            trainer._signal_connector.received_sigterm = True

        self._previous = signal.signal(signal.SIGINT, on_sigint)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        self.signal_name = self.signal_name or "SIGTERM"
        trainer.save_checkpoint(self.ckpt_path)  # at a step boundary: exactly what ckpt_path=last resumes
        self.saved = self.ckpt_path
        log.info("%s: saved %s at step %d", self.signal_name, self.ckpt_path, trainer.global_step)


class StopBeforeFit:
    """SIGTERM before training starts (data preparation, building, the validation before fit) stops the run as
    Ctrl-C does there: train() prints one line and exits with 143, where the default action would kill the
    process without a word. From fit() on, Lightning's SIGTERM handling and InterruptCheckpoint take over (a
    checkpoint at the next step boundary). A handler someone else installed (a cluster launcher's) is kept."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = None

    def __enter__(self) -> StopBeforeFit:
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            def on_sigterm(signum, frame):
                self.signal_name = "SIGTERM"
                raise KeyboardInterrupt  # Lightning's validate() turns it into its interrupted exit, as Ctrl-C

            self._previous = signal.signal(signal.SIGTERM, on_sigterm)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False


class RestoreSignalHandlers:
    """The SIGINT and SIGTERM handlers as they were before train(), put back when it returns or raises. A failure
    Lightning does not route through on_exception (a checkpoint that cannot be written at fit's end) left
    InterruptCheckpoint's handler installed, bound to a finished trainer: in the next job of a sweep, or the next
    train() of a script, Ctrl-C only set a flag on that old trainer and was otherwise ignored."""

    def __enter__(self) -> RestoreSignalHandlers:
        main = threading.current_thread() is threading.main_thread()
        self._saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._saved.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        return False


class FaultInjector(L.Callback):
    """Test hook (DSMINI_FAULT): kill or interrupt the process, poison the weights or raise an OOM at a step."""

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
        for key, sig in (("kill_at_step", signal.SIGKILL), ("sigint_at_step", signal.SIGINT),
                         ("sigterm_at_step", signal.SIGTERM)):
            if self.spec.get(key) == trainer.global_step:
                os.kill(os.getpid(), sig)


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
