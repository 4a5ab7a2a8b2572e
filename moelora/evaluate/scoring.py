"""Scoring a model on the dev set: what training and `moelora eval` share (greedy answers read by
the PromptCBLUE scorers, report columns, the eval loss)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from datasets import Dataset

from moelora.config import EvalConfig, TrainConfig
from moelora.data.batching import answer_tokens, batches_on
from moelora.errors import UserError
from moelora.evaluate.generate import generate_answers
from moelora.evaluate.promptcblue import empty_target_note, score_predictions, scorers_of
from moelora.evaluate.report import write_predictions
from moelora.log import get_logger

log = get_logger(__name__)


def with_summary(scores: dict, tasks: list[str] | None) -> dict:
    """Add `summary`: the mean over `eval.summary_tasks`, each of which must have been scored."""
    if not tasks:
        return scores
    missing = [t for t in tasks if t not in scores["per_task"]]
    if missing:
        raise UserError(
            f"eval.summary_tasks names {missing}, which the eval set does not score; "
            f"use tasks from {sorted(scores['per_task'])}."
        )
    mean = sum(scores["per_task"][t] for t in tasks) / len(tasks)
    return {**scores, "summary": {"tasks": list(tasks), "overall": mean}}


def score_rows(rows, predictions: list[str], eval_cfg: EvalConfig) -> dict[str, dict]:
    """The scores of each reading `eval.scorer` asks for, by scorer name, the headline first."""
    return {
        name: with_summary(score_predictions(rows, predictions, name), eval_cfg.summary_tasks)
        for name in scorers_of(eval_cfg.scorer)
    }


def report_columns(label: str, scored: dict[str, dict]) -> dict[str, dict]:
    """Report columns of one scoring: the headline reading under `label` ("after"), any other
    under `<label>_<scorer>` ("after_lenient")."""
    if not scored:
        return {label: None}
    headline, *others = scored
    return {label: scored[headline], **{f"{label}_{name}": scored[name] for name in others}}


def log_empty_targets(rows) -> None:
    """One note line when eval rows have an empty gold target (scored as officially); a
    tokenized Dataset is read without its token columns."""
    if isinstance(rows, Dataset):
        rows = rows.select_columns(["task_dataset", "task_type", "target"])
    note = empty_target_note(rows)
    if note:
        log.info(note)


def score_model(
    model: torch.nn.Module,
    tokenizer,
    rows: Dataset,
    eval_cfg: EvalConfig,
    max_target_length: int,
    accelerator: Accelerator,
    label: str,
    out_dir: Path,
) -> dict[str, dict]:
    """Generate greedily for every eval row and score per task with each reading of
    `eval.scorer` (see `score_rows`); writes predictions_<label>.jsonl into `out_dir`."""
    max_new = eval_cfg.max_new_tokens or max_target_length
    predictions = generate_answers(
        model,
        tokenizer,
        rows,
        eval_cfg.batch_size,
        max_new,
        accelerator,
        f"scoring ({label})",
        eval_cfg.fold,
    )
    scored = score_rows(list(rows), predictions, eval_cfg)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_predictions(out_dir / f"predictions_{label}.jsonl", rows, predictions)
    return scored


@torch.no_grad()
def eval_loss(model, rows: Dataset, cfg: TrainConfig, accelerator: Accelerator) -> float:
    """Teacher-forced LM loss on the eval set, averaged over answer tokens."""
    model.eval()
    pad_id = accelerator.unwrap_model(model).base_model.config.pad_token_id or 0
    total, count = 0.0, 0
    for batch in batches_on(rows, cfg.eval.batch_size, pad_id, accelerator.device, cfg.data):
        out = model(**batch)
        n = answer_tokens(batch)
        total += float(out.lm_loss) * n
        count += n
    model.train()
    return total / max(count, 1)
