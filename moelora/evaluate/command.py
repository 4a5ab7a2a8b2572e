"""`moelora eval`: re-score a training run, score a base model, or score a predictions file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from moelora.analysis.routing import write_routing
from moelora.config import DataConfig, EvalConfig, EvalRunConfig, load_config
from moelora.data.pipeline import check_files, prepare_data, read_eval_rows
from moelora.data.reader import check_text_file
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError
from moelora.evaluate.loading import check_generation_hardware, command_line_changes, open_run
from moelora.evaluate.report import write_report
from moelora.evaluate.scoring import log_empty_targets, report_columns, score_model, score_rows
from moelora.hardware import base_placement, make_accelerator, place_model
from moelora.log import get_logger
from moelora.modeling import load_base_model, load_tokenizer
from moelora.rundir import guard_eval_output, read_run

log = get_logger(__name__)


@dataclass
class Scored:
    """What `moelora eval` scores: a run's model (with its own data and eval settings) or a base."""

    accelerator: Accelerator
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    registry: TaskRegistry
    data: DataConfig
    eval: EvalConfig
    title: str
    is_run: bool


def evaluate_command(raw: DictConfig) -> None:
    cfg: EvalRunConfig = load_config(raw)
    out_dir = Path(cfg.output_dir)
    guard_eval_output(out_dir)
    if cfg.predictions:
        _score_file(cfg, out_dir)
        return
    if check_generation_hardware(cfg, "eval"):
        return
    scored = _open_run(cfg) if cfg.run_dir else _open_base(cfg)
    accelerator, main = scored.accelerator, scored.accelerator.is_main_process
    data = prepare_data(scored.data, scored.tokenizer, scored.registry)
    if main:
        log_empty_targets(data.eval)
    limit = scored.data.max_target_length
    scores = score_model(
        scored.model, scored.tokenizer, data.eval, scored.eval, limit, accelerator, "eval", out_dir
    )
    figures = {}
    if scored.is_run:  # what the run's gates do on the rows scored here
        tasks, batch = scored.registry.tasks, scored.eval.batch_size
        figures = write_routing(scored.model, data.eval, batch, tasks, out_dir, scored.title, main)
    if main:
        columns, info = report_columns("score", scores), {"source": scored.title}
        write_report(out_dir, f"moelora eval: {scored.title}", columns, info, figures)


def _open_run(cfg: EvalRunConfig) -> Scored:
    """A run with its own settings, the command line's keys on top; its eval files are checked
    before the model loads."""
    settings = read_run(cfg.run_dir, command_line_changes())
    check_files(settings.data, ("eval",))
    accelerator, run = open_run(cfg, cfg.run_dir, settings)
    title = f"run {cfg.run_dir} ({settings.method})"
    return Scored(
        accelerator,
        run.model,
        run.tokenizer,
        run.registry,
        settings.data,
        settings.eval,
        title,
        True,
    )


def _open_base(cfg: EvalRunConfig) -> Scored:
    """The base model alone, scored on the tasks of its eval rows."""
    accelerator = make_accelerator(cfg.hardware)
    tokenizer = load_tokenizer(cfg.model)
    placement = base_placement(accelerator, cfg.hardware)
    model = load_base_model(cfg.model, tokenizer, cfg.cache_dir, *placement)
    place_model(model, cfg.hardware, accelerator)
    registry = TaskRegistry.from_rows(read_eval_rows(cfg.data))
    title = f"base model {cfg.model.name_or_path}"
    return Scored(accelerator, model, tokenizer, registry, cfg.data, cfg.eval, title, False)


def _score_file(cfg: EvalRunConfig, out_dir: Path) -> None:
    """Score `{sample_id, prediction}` rows against the gold dev set, no model involved."""
    path = Path(cfg.predictions)
    if not path.is_file():
        raise UserError(f"predictions='{path}' does not exist; pass a JSONL of predictions.")
    check_text_file(path)
    gold = list(read_eval_rows(cfg.data))
    by_id = {row["sample_id"]: row for row in gold}
    gold_files = ", ".join(str(Path(cfg.data.root) / name) for name in cfg.data.eval_files)
    predicted: dict[str, str] = {}
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                sample_id, text = str(record["sample_id"]), record["prediction"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"{path}:{number} is not a JSON object with sample_id and prediction."
                ) from None
            if sample_id not in by_id:
                raise UserError(
                    f"{path}:{number} has sample_id {sample_id}, which is not in the gold set "
                    f"({cfg.data.dataset or gold_files}); check data= and data.root=."
                )
            predicted[sample_id] = text
    missing = len(gold) - len(predicted)
    if missing:
        log.warning(f"{missing} gold rows have no prediction and score as empty answers")
    log_empty_targets(gold)
    scored = score_rows(gold, [predicted.get(r["sample_id"], "") for r in gold], cfg.eval)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = report_columns("score", scored)
    write_report(out_dir, f"moelora eval: {path.name}", columns, {"source": str(path)})
