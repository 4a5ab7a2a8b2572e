"""The validation rows: a seeded share of each task's training rows held out of training, the
same rows whatever the training seed, so runs and sweeps compare on one set."""

from __future__ import annotations

import zlib

import numpy as np
from datasets import Dataset


def hold_out(rows: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """(training rows, validation rows): round(share x n) of each task's n rows, at least one
    and never all of them (a task with one row stays in training). Each task draws with its
    own generator (seed, task name), so adding a task leaves the others' rows as they were;
    both parts keep the file order."""
    by_task: dict[str, list[int]] = {}
    for index, task in enumerate(rows["task_dataset"]):
        by_task.setdefault(task, []).append(index)
    held: set[int] = set()
    for task, indices in by_task.items():
        count = min(max(1, round(share * len(indices))), len(indices) - 1)
        generator = np.random.default_rng([seed, zlib.crc32(task.encode())])
        held |= set(generator.choice(indices, size=count, replace=False).tolist())
    kept = [i for i in range(len(rows)) if i not in held]
    return rows.select(kept), rows.select(sorted(held))
