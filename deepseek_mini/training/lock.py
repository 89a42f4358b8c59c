"""One training per run directory: an exclusive `fcntl.flock` on `<run dir>/.run.lock`.

The OS releases the lock when the process dies (kill -9 included), so a stale lock never blocks a resume.
The file holds the holder's pid, host and start time, which a refused second run names. Only the launching
process takes it: DDP ranks that Lightning or SLURM start (RANK / LOCAL_RANK / SLURM_PROCID > 0) join the
run that rank 0 holds.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from deepseek_mini.config import ConfigError

LOCK_FILE = ".run.lock"
_held: dict[Path, int] = {}  # run dir -> open fd (held until the process exits or release())


def is_launcher_rank() -> bool:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "") and value.isdigit() and int(value) > 0:
            return False
    return True


def acquire_run_lock(run_dir: str | os.PathLike) -> Path | None:
    """Lock `run_dir` for this process (a no-op if it already holds it, or on a non-zero DDP rank).

    Raises ConfigError naming the holder when another process trains there.
    """
    if not is_launcher_rank():
        return None
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return run_dir / LOCK_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's record stays readable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"hydra.run.dir={run_dir}: another training is running in this run dir ({holder}); "
                          "wait for it or use another run dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}\n".encode(), 0)
    _held[run_dir] = fd
    return path


def lock_holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds `run_dir`'s lock (its record), or None when nobody else does; nothing is created or kept."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / LOCK_FILE
    if run_dir in _held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # closing drops a lock taken here
    return None


def release_run_lock(run_dir: str | os.PathLike) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
