"""`moelora predict`: a trained run's answers for rows that have no target (PromptCBLUE's test
split), written as `predictions.jsonl` and as the submission file the official
post-processing reads; or the answer to one prompt, on the console."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from datasets import Dataset
from omegaconf import DictConfig

from moelora.adapters import get_method, method_names
from moelora.atomic import atomic
from moelora.config import PredictConfig, load_config
from moelora.data.formatting import PromptFormatter, tokenize_split
from moelora.data.pipeline import check_files, read_rows_to_answer
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError
from moelora.evaluate.generate import generate_answers
from moelora.evaluate.loading import check_generation_hardware, command_line_changes, open_run
from moelora.evaluate.report import write_predictions
from moelora.log import get_logger
from moelora.rundir import RunSettings, guard_eval_output, read_run

log = get_logger(__name__)

SUBMISSION_NAME = "test_predictions.json"
"""The official PromptCBLUE submission: JSON Lines, each input row with its answer in `target`."""
SUBMISSION_FIELDS = ("input", "target", "answer_choices", "task_type", "task_dataset", "sample_id")


def predict_command(raw: DictConfig) -> None:
    cfg: PredictConfig = load_config(raw)
    out_dir = Path(cfg.output_dir)
    guard_eval_output(out_dir)
    if check_generation_hardware(cfg, "predict"):
        return
    settings = read_run(cfg.run_dir, command_line_changes())
    if cfg.input is None:
        check_files(settings.data, ("eval",))  # before the model loads
        rows = read_rows_to_answer(settings.data)
    else:
        rows = Dataset.from_list([_typed_row(cfg.input, cfg.task)])
    accelerator, run = open_run(cfg, cfg.run_dir, settings)
    registry = _registry_for(run.registry, rows, settings)
    data_cfg = settings.data
    if data_cfg.length_policy == "drop":  # every row gets an answer: cut long prompts instead
        data_cfg = replace(data_cfg, length_policy="truncate_input")
    formatter = PromptFormatter(run.tokenizer, data_cfg)
    prompts, _ = tokenize_split(rows, formatter, registry, "predict", with_answer=False)
    answers = generate_answers(
        run.model,
        run.tokenizer,
        prompts,
        settings.eval.batch_size,
        settings.eval.max_new_tokens or data_cfg.max_target_length,
        accelerator,
        "predicting",
        settings.eval.fold,
    )
    if not accelerator.is_main_process:
        return
    if cfg.input is not None:
        print(answers[0])
        return
    _write_answers(out_dir, rows, answers, f"run {cfg.run_dir} ({settings.method})")


def _write_answers(out_dir: Path, rows: Dataset, answers: list[str], source: str) -> None:
    """predictions.jsonl (with the gold targets, if any) and the official submission file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(out_dir / "predictions.jsonl", rows, answers)
    write_submission(out_dir / SUBMISSION_NAME, rows, answers)
    log.info(
        f"{len(answers)} answers from {source}: "
        f"{out_dir / 'predictions.jsonl'} and {out_dir / SUBMISSION_NAME}"
    )


def write_submission(path: Path, rows: Dataset, answers: list[str]) -> None:
    """Every row with its fields, in input order, the generated answer in `target`."""
    with atomic(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row, answer in zip(rows, answers, strict=True):
            record = {field: row[field] for field in SUBMISSION_FIELDS} | {"target": answer}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _typed_row(text: str, task: str | None) -> dict:
    """The one row `input="..." task=<name>` asks about; a typed "\\n" is a line break."""
    if not text.strip():
        raise UserError('input="" is empty; pass the prompt to answer, input="...".')
    return {
        "input": text.replace("\\n", "\n"),
        "target": "",
        "answer_choices": None,
        "task_type": "",
        "task_dataset": task or "",
        "sample_id": "input",
    }


def _registry_for(registry: TaskRegistry, rows: Dataset, settings: RunSettings) -> TaskRegistry:
    """The run's registry, extended by the tasks of `rows` it never saw when the model does not
    route by task: those rows get ids the model does not read. A task-routed model (or MoDULA
    scored per domain) refuses them."""
    unseen = [t for t in dict.fromkeys(rows["task_dataset"]) if t not in registry.domain_of]
    if not unseen:
        return registry
    task = repr(unseen[0]) if unseen[0] else "(none given: pass task=<name>)"
    if get_method(settings.method).routes_by_task:
        others = ", ".join(m for m in method_names() if not get_method(m).routes_by_task)
        raise UserError(
            f"task {task} is not one of the run's training tasks {registry.tasks}, and "
            f"{settings.method} picks its experts by task id; use one of them, or a run of a "
            f"method that does not ({others})."
        )
    if settings.eval.force_domain:
        raise UserError(
            f"task {task} is not one of the run's training tasks {registry.tasks}, so it has "
            f"no domain expert for eval.force_domain=true; use one of them, or "
            f"eval.force_domain=false to route by token."
        )
    first_domain = registry.domain_of[registry.tasks[0]]
    return TaskRegistry(
        registry.tasks + unseen,
        {**registry.domain_of, **dict.fromkeys(unseen, first_domain)},
        registry.domains,
    )
