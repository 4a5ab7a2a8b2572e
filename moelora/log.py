"""One console logger for moelora's notes and warnings, shown once per machine.

Every module logs through `get_logger(__name__)`. Lines go to standard output as plain text
(a warning is prefixed `warning:`), and only the local main process of a distributed launch
writes them, so a 2-process run reads like a 1-process one. Set `MOELORA_LOG_LEVEL=WARNING`
to keep only warnings.
"""

from __future__ import annotations

import logging
import os
import sys

from tqdm.auto import tqdm

ROOT = "moelora"


class _Console(logging.Handler):
    """Writes to the current `sys.stdout` (tests may swap it after import), through tqdm so that
    a line printed during training does not land inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # a logging failure must not end a run
            self.handleError(record)


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return text


def _local_main(record: logging.LogRecord) -> bool:
    """Launchers (torchrun, accelerate, deepspeed) give each process its LOCAL_RANK."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def get_logger(name: str) -> logging.Logger:
    """The logger of a moelora module; the console handler is set up on first use."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        console = _Console()
        console.setFormatter(_Plain())
        console.addFilter(_local_main)
        root.addHandler(console)
        root.setLevel(os.environ.get("MOELORA_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name)
