"""What a finished training run says about itself: its info (steps, speed, losses, memory), its
figures, report.md and metrics.json."""

from __future__ import annotations

import resource

import torch
from accelerate import Accelerator

from moelora.analysis.plots import plot_curves
from moelora.analysis.routing import write_routing
from moelora.evaluate.report import write_metrics, write_report
from moelora.evaluate.scoring import eval_loss
from moelora.log import get_logger
from moelora.train.loop import Progress
from moelora.train.setup import Run
from moelora.train.trackers import report_to_trackers

log = get_logger(__name__)

CURVES_FILE = "curves.png"


def run_info(run: Run, progress: Progress) -> dict:
    """The run's facts for metrics.json and the report (every process measures the eval loss:
    under ZeRO-3 each holds a part of the model)."""
    cfg, seconds = run.cfg, progress.seconds
    losses = run.history.values("train/loss")
    return {
        "method": cfg.method.name,
        "model": cfg.model.name_or_path,
        "trainable_parameters": run.adapter_parameters,
        "steps": progress.state.global_step,
        "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(progress.tokens / max(seconds, 1e-9)),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(losses[-1], 4) if losses else None,
        "skipped_steps": progress.state.skipped_steps,
        **peak_memory(run.accelerator),
        "final_eval_loss": round(eval_loss(run.model, run.data.eval, cfg, run.accelerator), 4),
    }


def write_run_report(run: Run, info: dict, columns: dict[str, dict]) -> None:
    """The figures (training curves; the gates' routing when scored), then report.md and
    metrics.json, or metrics.json alone for an unscored run; then the trackers get their numbers and
    files. Every process must call it."""
    cfg, main = run.cfg, run.accelerator.is_main_process
    title = f"moelora run: {cfg.method.name} on {cfg.data.name}"
    figures = {}
    if main and plot_curves(run.history.read(), run.run_dir / CURVES_FILE, title):
        figures["training curves"] = CURVES_FILE
    if cfg.eval.enabled:
        tasks, batch = run.data.registry.tasks, cfg.eval.batch_size
        figures |= write_routing(run.model, run.data.eval, batch, tasks, run.run_dir, title, main)
    if main and cfg.eval.enabled:
        write_report(run.run_dir, title, columns, info, figures)
    elif main:
        write_metrics(run.run_dir, info, {})
    report_to_trackers(run.accelerator, run.run_dir)
    log.info(f"run directory: {run.run_dir}")


def peak_memory(accelerator: Accelerator) -> dict[str, float]:
    """Peak memory of rank 0 during training, in GiB: the GPU's allocator and the host RSS."""
    peaks = {"peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if accelerator.device.type == "cuda":
        peaks["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return {key: round(value, 2) for key, value in peaks.items()}
