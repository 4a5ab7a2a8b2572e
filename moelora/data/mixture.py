"""Mix task datasets into one training stream: each epoch draws a fresh, seeded sample whose
per-task counts follow the chosen strategy (proportional, uniform, temperature, explicit weights),
after per-task caps and minimums."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from moelora.config import MixtureConfig
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError


def task_probabilities(sizes: dict[str, int], cfg: MixtureConfig) -> dict[str, float]:
    """p_t per task: proportional to the (capped/raised) size n_t, uniform, n_t^(1/T), or w_t.
    The strategy and temperature were checked by `MixtureConfig`."""
    n = {t: float(_effective_size(s, cfg)) for t, s in sizes.items()}
    if cfg.strategy == "proportional":
        raw = n
    elif cfg.strategy == "uniform":
        raw = dict.fromkeys(n, 1.0)
    elif cfg.strategy == "temperature":
        raw = {t: v ** (1.0 / cfg.temperature) for t, v in n.items()}
    else:
        missing = sorted(set(n) - set(cfg.weights))
        if missing:
            raise UserError(
                f"data.mixture.weights has no weight for {missing}; give every training task one."
            )
        raw = {t: float(cfg.weights[t]) for t in n}
    total = sum(raw.values())
    if total <= 0:
        raise UserError("data.mixture gives every task zero weight; give some task a weight > 0.")
    return {t: v / total for t, v in raw.items()}


def _effective_size(size: int, cfg: MixtureConfig) -> int:
    if cfg.max_per_task is not None:
        size = min(size, cfg.max_per_task)
    if cfg.min_per_task is not None:
        size = max(size, cfg.min_per_task)
    return size


def task_counts(sizes: dict[str, int], cfg: MixtureConfig) -> dict[str, int]:
    """Rows per task in one epoch: p_t times the epoch size, rounded by largest remainder so the
    counts add up exactly, then held to the per-task cap and minimum."""
    probs = task_probabilities(sizes, cfg)
    total = cfg.epoch_size or sum(_effective_size(s, cfg) for s in sizes.values())
    exact = {t: p * total for t, p in probs.items()}
    counts = {t: int(v) for t, v in exact.items()}
    by_remainder = sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)
    for t in by_remainder[: total - sum(counts.values())]:
        counts[t] += 1
    return {t: _effective_size(c, cfg) if c else c for t, c in counts.items()}


def balanced_over_domains(domain_of: dict[str, str], cfg: MixtureConfig) -> MixtureConfig:
    """The mixture for MoDULA's router stage: every domain equally often, its tasks sharing its
    share, so the router is not trained mostly on the largest domain."""
    per_domain: dict[str, int] = {}
    for domain in domain_of.values():
        per_domain[domain] = per_domain.get(domain, 0) + 1
    weights = {task: 1.0 / per_domain[domain] for task, domain in domain_of.items()}
    return MixtureConfig(strategy="weights", weights=weights, epoch_size=cfg.epoch_size)


# What a training stage can draw (`Method.stage_rows`), and how the log line says it.
STAGE_ROWS = {
    "mixture": "the mixture",
    "added_domains": "only the added domains' rows",
    "balanced_domains": "rows per domain balanced",
}


def stage_sampler(
    rows: str,
    task_of_row: Sequence[str],
    registry: TaskRegistry,
    cfg: MixtureConfig,
    seed: int,
    added_domains: Collection[str] = (),
) -> MixtureSampler:
    """The sampler of a stage that draws `rows` (see `Method.stage_rows`)."""
    if rows == "added_domains":
        tasks = registry.tasks_in(added_domains)
        return MixtureSampler(task_of_row, cfg, seed, only_tasks=tasks)
    if rows == "balanced_domains":
        present = {task: registry.domain_of[task] for task in dict.fromkeys(task_of_row)}
        return MixtureSampler(task_of_row, balanced_over_domains(present, cfg), seed)
    if rows != "mixture":
        raise ValueError(f"stage rows {rows!r} are unknown; use one of {', '.join(STAGE_ROWS)}.")
    return MixtureSampler(task_of_row, cfg, seed)


class MixtureSampler(Sampler[int]):
    """Row indices of one epoch: `count_t` rows of each task (without replacement while the task
    has rows left, then again from a fresh permutation), shuffled together; `set_epoch` redraws.

    With `only_tasks`, the mixture is drawn from the rows of those tasks alone (indices still
    point into the whole `task_of_row`), e.g. MoDULA's domain stage for added domains.
    """

    def __init__(
        self,
        task_of_row: Sequence[str],
        cfg: MixtureConfig,
        seed: int,
        only_tasks: Collection[str] | None = None,
    ) -> None:
        self.rows_of: dict[str, list[int]] = {}
        for index, task in enumerate(task_of_row):
            if only_tasks is None or task in only_tasks:
                self.rows_of.setdefault(task, []).append(index)
        if not self.rows_of:
            raise UserError("the training set is empty after filtering; check data.tasks.")
        self.counts = task_counts({t: len(r) for t, r in self.rows_of.items()}, cfg)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        picked: list[int] = []
        for task in sorted(self.rows_of):
            rows, need = self.rows_of[task], self.counts[task]
            while need > 0:
                order = torch.randperm(len(rows), generator=generator)[:need].tolist()
                picked += [rows[i] for i in order]
                need -= len(order)
        shuffle = torch.randperm(len(picked), generator=generator).tolist()
        return iter([picked[i] for i in shuffle])
