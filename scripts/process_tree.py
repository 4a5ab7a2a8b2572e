"""Run a command with a time limit that ends its whole process tree.

A bench step starts `moelora train`, which starts a launcher, which starts the training
process: killing only the first would leave the others holding the GPU. psutil (a dependency of
accelerate) finds the descendants.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass

import psutil


@dataclass
class Finished:
    returncode: int | None  # None: stopped at the time limit
    stdout: str
    stderr: str
    seconds: float


def kill_tree(pid: int) -> None:
    """Kill a process and every descendant, children first."""
    try:
        root = psutil.Process(pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(family, timeout=10)


def run_limited(command: list[str], limit: float, **popen) -> Finished:
    """Run `command` to its end or for `limit` seconds; the output printed until then is kept."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    try:
        stdout, stderr = process.communicate(timeout=max(limit, 1))
        code: int | None = process.returncode
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        stdout, stderr = process.communicate()
        code = None
    return Finished(code, stdout, stderr, time.perf_counter() - start)
