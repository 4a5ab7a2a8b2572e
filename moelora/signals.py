"""Stopping cleanly when a cluster takes the machine back.

SIGTERM (a scheduler's pre-emption or `scancel`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
`--signal=USR1@<seconds>` warning) become a request that the training loop honours after the
current optimizer step: every process writes the checkpoint, then the run exits with
128 + the signal's number. A second signal stops at once, leaving the checkpoints as they are.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

from moelora.errors import RunStopped
from moelora.log import get_logger

log = get_logger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# One Ctrl-C reaches every process of the terminal's group, and a launcher forwards it again a
# moment later: signals this close to the first one are the same request, not a second one.
SAME_REQUEST_SECONDS = 2.0


def interrupted(signum: int, message: str) -> RunStopped:
    """Training stopped on a signal after writing a checkpoint: exit with 128 + its number, as
    a shell reports a process ended by that signal."""
    return RunStopped(message, 128 + signum)


class StopRequest:
    """The signal this process has received, if any; a context manager that installs the
    handlers (in the main thread only) and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            log.warning(
                f"{signal.Signals(signum).name} received: finishing this step and writing a "
                f"checkpoint (a second signal stops at once)"
            )
        elif now - self._first_at > SAME_REQUEST_SECONDS:
            os._exit(128 + signum)  # at once: no checkpoint is touched
