"""From the data config to tokenized train and eval sets plus the task registry: everything that
can fail on bad data runs here, before the model is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from moelora.config import DataConfig
from moelora.data.formatting import LengthReport, PromptFormatter, tokenize_split
from moelora.data.holdout import hold_out
from moelora.data.reader import load_named_split, load_split, only_tasks, resolve_files
from moelora.data.tasks import TaskRegistry


@dataclass
class PreparedData:
    registry: TaskRegistry
    train: Dataset | None
    eval: Dataset
    reports: dict[str, LengthReport]
    validation: Dataset | None = None  # held-out training rows (data.validation*), when asked


def check_files(cfg: DataConfig, splits: tuple[str, ...] = ("train", "eval")) -> None:
    """Fail on a missing data folder or file before anything slow (tokenizer, model) is loaded."""
    for split in splits if not cfg.dataset else ():
        resolve_files(cfg.root, getattr(cfg, f"{split}_files"), f"data.{split}_files")
    if cfg.validation_files and "train" in splits:
        resolve_files(cfg.root, cfg.validation_files, "data.validation_files")


def read_split(cfg: DataConfig, split: str) -> Dataset:
    """The `train` or `eval` rows, from `data.dataset`'s splits or from the files under
    `data.root`; eval keeps `data.eval_tasks`, else the training tasks `data.tasks`, else all."""
    tasks = cfg.tasks
    if split == "eval" and cfg.eval_tasks is not None:
        tasks = cfg.eval_tasks
    if cfg.dataset:
        key = f"data.{split}_split"
        return only_tasks(load_named_split(cfg.dataset, getattr(cfg, key[5:]), key), tasks, key)
    key = f"data.{split}_files"
    return load_split(cfg.root, getattr(cfg, key[5:]), key, tasks)


def read_rows_to_answer(cfg: DataConfig) -> Dataset:
    """Every row of the eval files (or `data.dataset`'s eval split) in order, targets optional:
    what `moelora predict` answers (no task filter, no per-task limit)."""
    if cfg.dataset:
        return load_named_split(cfg.dataset, cfg.eval_split, "data.eval_split", needs_target=False)
    return load_split(cfg.root, cfg.eval_files, "data.eval_files", None, needs_target=False)


def _first_per_task(rows: Dataset, limit: int | None) -> Dataset:
    if limit is None:
        return rows
    seen: dict[str, int] = {}
    keep = []
    for index, task in enumerate(rows["task_dataset"]):
        seen[task] = seen.get(task, 0) + 1
        if seen[task] <= limit:
            keep.append(index)
    return rows.select(keep)


def read_eval_rows(cfg: DataConfig) -> Dataset:
    """The dev rows to score, at most `data.max_eval_samples_per_task` of each task."""
    return _first_per_task(read_split(cfg, "eval"), cfg.max_eval_samples_per_task)


def prepare_data(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    registry: TaskRegistry | None = None,
    extend: TaskRegistry | None = None,
) -> PreparedData:
    """Read, validate and tokenize. Without a registry (training) it is built from the training
    rows, as an extension of `extend` (an earlier run's registry) when given; with one
    (re-scoring a run) the training files are not read."""
    formatter = PromptFormatter(tokenizer, cfg)
    reports: dict[str, LengthReport] = {}
    train = validation = None
    if registry is None:
        rows, held = read_training_rows(cfg)
        registry = TaskRegistry.from_rows(rows, cfg.domains)
        if extend is not None:
            registry = extend.extend(registry)
        train, reports["train"] = tokenize_split(rows, formatter, registry, "train", True)
        if held is not None:
            validation, reports["validation"] = tokenize_split(
                held, formatter, registry, "validation", False
            )
    eval_rows = read_eval_rows(cfg)
    evaluation, reports["eval"] = tokenize_split(eval_rows, formatter, registry, "eval", False)
    return PreparedData(registry, train, evaluation, reports, validation)


def read_training_rows(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """(rows to train on, validation rows or None): `data.validation` holds a share of each
    task's training rows out; `data.validation_files` reads them (a task the training rows do
    not have stops when they are tokenized)."""
    rows = read_split(cfg, "train")
    if cfg.validation:
        return hold_out(rows, cfg.validation, cfg.validation_seed)
    if cfg.validation_files:
        return rows, load_split(cfg.root, cfg.validation_files, "data.validation_files", None)
    return rows, None
