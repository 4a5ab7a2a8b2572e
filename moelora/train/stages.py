"""A method's training stages: which stages a run still trains, the rows each stage draws, and
the objects one stage trains with (a fresh optimizer over what the stage trains, its loader and
schedule), prepared by accelerate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import get_scheduler

from moelora.data.batching import loss_loader
from moelora.data.mixture import STAGE_ROWS, MixtureSampler, stage_sampler
from moelora.log import get_logger
from moelora.train.setup import Run

log = get_logger(__name__)


@dataclass
class Stage:
    """One stage's prepared objects."""

    index: int
    name: str | None
    model: torch.nn.Module  # wrapped by accelerate (DDP, a DeepSpeed engine) or the model
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    scheduler: torch.optim.lr_scheduler.LRScheduler


def stages_to_train(run: Run) -> list[tuple[int, str | None]]:
    """(index, name) of the method's stages this run trains: all of them, or when resuming the
    checkpoint's stage and those after it."""
    first = run.resume_from.stage if run.resume_from is not None else 0
    return [(i, name) for i, name in enumerate(run.method.stages()) if i >= first]


def enter_stage(run: Run, name: str | None) -> None:
    """Set the adapter to stage `name` (the domain stage of added domains: their experts only)."""
    registry = run.data.registry
    ids = [registry.domains.index(d) for d in run.method.added_domains()]
    run.model.set_stage(name, domains=ids or None)


def stage_rows(run: Run, name: str | None) -> MixtureSampler:
    """The rows stage `name` draws: the run's mixture, or the method's choice for the stage."""
    rows = run.method.stage_rows(name)
    if rows == "mixture":
        return run.sampler
    cfg, registry, added = run.cfg, run.data.registry, run.method.added_domains()
    task_of_row = run.data.train["task_dataset"]
    sampler = stage_sampler(rows, task_of_row, registry, cfg.data.mixture, cfg.trainer.seed, added)
    log.info(f"{name} stage: {STAGE_ROWS[rows]}, per task {sampler.counts}")
    return sampler


def start_stage(run: Run, index: int, name: str | None) -> Stage:
    """Enter the stage, then prepare the model, a fresh optimizer over what it trains, the loader
    of its rows and the schedule."""
    t, accelerator, model = run.cfg.trainer, run.accelerator, run.model
    enter_stage(run, name)
    accelerator.free_memory()
    loader = loss_loader(
        run.data.train,
        t.batch_size,
        model.base_model.config.pad_token_id or 0,
        run.cfg.data,
        sampler=stage_rows(run, name),
        seed=t.seed,
        # Its own generator: creating an iterator would otherwise draw from the global RNG and
        # shift dropout masks after a resume.
        generator=torch.Generator().manual_seed(t.seed),
    )
    optimizer = torch.optim.AdamW(
        model.trainable_parameters(), lr=t.lr, weight_decay=t.weight_decay
    )
    scheduler = get_scheduler(
        t.scheduler if t.scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
        num_training_steps=t.max_steps,
    )
    return Stage(index, name, *accelerator.prepare(model, optimizer, loader, scheduler))
