"""The hardware strategy as an `Accelerator`: device, precision and trackers from `hardware=`."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from moelora.config import HardwareConfig


def make_accelerator(
    hardware: HardwareConfig, run_dir: Path | None = None, loggers: list[str] | None = None
) -> Accelerator:
    """On a CPU, mixed precision is turned off: bf16 there is emulated and ~30x slower than fp32.
    The LR schedule counts optimizer steps, so accelerate must not step it once per process."""
    on_cpu = hardware.cpu or not torch.cuda.is_available()
    precision = "no" if on_cpu else hardware.mixed_precision
    if precision != hardware.mixed_precision:
        print(f"no GPU: hardware.mixed_precision={hardware.mixed_precision} becomes fp32")
    loggers = [name for name in loggers or [] if name != "none"]
    project = None
    if run_dir is not None:
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,
        log_with=loggers or None,
        project_config=project,
    )
