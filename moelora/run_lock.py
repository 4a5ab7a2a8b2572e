"""One process trains into a run directory at a time: `<run_dir>/.lock`, held with an OS file
lock (flock) for the life of the run. The kernel drops the lock when the process dies, even by
SIGKILL, so a requeued job never finds a stale lock; a second run started on the same folder
stops with one line naming the first's process.

Under a distributed launch only the global rank 0 takes the lock, and the processes that
`moelora train` launches itself inherit its lock (MOELORA_RUN_LOCK names the folder)."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from moelora.errors import UserError

LOCK_NAME = ".lock"
INHERITED = "MOELORA_RUN_LOCK"  # set for the processes a launching `moelora train` starts

_held: dict[Path, list[int]] = {}  # folder -> [file descriptor, times acquired, created it]


def _needs_lock(folder: Path) -> bool:
    if os.environ.get("RANK", "0") != "0":
        return False
    return os.environ.get(INHERITED) != str(folder)


def acquire(run_dir: str | Path) -> None:
    """Hold the run's lock (again, if this process holds it already); stops when another
    process holds it. Creates the folder."""
    folder = Path(run_dir).resolve()
    if folder in _held:
        _held[folder][1] += 1
        return
    if not _needs_lock(folder):
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"run_dir={run_dir} is a file, not a folder; choose a folder for the run.")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise UserError(
            f"run_dir={run_dir} is in use by {holder}; wait for that run to end (or stop it), "
            f"or choose another run_dir."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[folder] = [fd, 1, created]
    os.environ[INHERITED] = str(folder)


def release(run_dir: str | Path) -> None:
    """Give up one hold; the lock and its file go with the last one. A folder that the lock
    created and nothing else used (the command stopped before writing) is removed again."""
    folder = Path(run_dir).resolve()
    if folder not in _held:
        return
    _held[folder][1] -= 1
    if _held[folder][1] > 0:
        return
    fd, _, created = _held.pop(folder)
    (folder / LOCK_NAME).unlink(missing_ok=True)  # while still held, so no one else's goes
    if created and not any(folder.iterdir()):
        folder.rmdir()
    os.close(fd)  # closing drops the flock
    if os.environ.get(INHERITED) == str(folder):
        del os.environ[INHERITED]
