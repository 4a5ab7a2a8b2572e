"""Scoring a model on the dev set (used by training and by `moelora eval`), and the `eval`
command itself: re-score a run, score a base model, or score a predictions file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from datasets import Dataset
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from moelora.adapters import get_method, method_names
from moelora.analysis.routing import write_routing
from moelora.config import EvalConfig, EvalRunConfig, GenerationRunConfig, TrainConfig
from moelora.data.batching import answer_tokens, batches_on
from moelora.data.pipeline import check_files, prepare_data, read_eval_rows
from moelora.data.reader import check_text_file
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError
from moelora.evaluate.generate import generate_answers
from moelora.evaluate.promptcblue import empty_target_note, score_predictions, scorers_of
from moelora.evaluate.report import write_predictions, write_report
from moelora.hardware import make_accelerator
from moelora.launch import launch_this_command, needs_launch
from moelora.log import get_logger
from moelora.modeling import COMPUTE_DTYPES, load_base_model, load_tokenizer
from moelora.rundir import (
    RUN_GROUPS,
    LoadedRun,
    RunSettings,
    guard_eval_output,
    load_run,
    read_run,
)

log = get_logger(__name__)


def inference_stage(method: str, force_domain: bool) -> str | None:
    """The adapter stage to score with: as trained (None), or with `eval.force_domain` the
    method's stage that gates each row by its own domain expert (MoDULA's `domain`)."""
    if not force_domain:
        return None
    stage = get_method(method).forced_stage
    if stage is None:
        having = [m for m in method_names() if get_method(m).forced_stage is not None]
        raise UserError(
            f"eval.force_domain=true is for {', '.join(having)} (methods with domain experts), "
            f"not {method}; remove it."
        )
    return stage


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


def check_generation_hardware(cfg: GenerationRunConfig, command: str) -> bool:
    """Refuse DeepSpeed for a generating command, and launch it when the hardware asks for
    several processes. Returns True when this process launched the others (nothing left to do)."""
    if cfg.hardware.strategy == "deepspeed":
        raise UserError(
            f"moelora {command} generates with whole model copies, not under DeepSpeed "
            f"(hardware={cfg.hardware.name}); use hardware=ddp to share the rows between GPUs."
        )
    if needs_launch(cfg.hardware):
        launch_this_command(cfg.hardware, command, f"output_dir={cfg.output_dir}")
        return True
    return False


def start_placement(cfg: GenerationRunConfig) -> tuple[Accelerator, bool, tuple]:
    """(accelerator, on_cpu, placement): the arguments after `on_cpu` that `load_base_model`
    and `load_run` take to put a base on this process's device in the run's precision."""
    accelerator = make_accelerator(cfg.hardware)
    precision = COMPUTE_DTYPES[accelerator.mixed_precision]
    placement = (cfg.hardware.quantization, accelerator.device, precision)
    return accelerator, accelerator.device.type == "cpu", placement


def open_run(
    cfg: GenerationRunConfig, run_dir: str, settings: RunSettings
) -> tuple[Accelerator, LoadedRun]:
    """(accelerator, LoadedRun): the run's model on this process's device, at the adapter stage
    its eval settings score with; a QLoRA run on a full-precision base (or back) gets a note."""
    stage = inference_stage(settings.method, settings.eval.force_domain)
    accelerator, on_cpu, placement = start_placement(cfg)
    run = load_run(run_dir, cfg.cache_dir, on_cpu, *placement, settings)
    quantization = cfg.hardware.quantization
    if settings.quantization != quantization:
        log.info(
            f"note: the run trained on a {settings.quantization or 'full-precision'} base "
            f"and is scored on a {quantization or 'full-precision'} one; "
            f"hardware.quantization={settings.quantization or 'null'} scores it as trained."
        )
    run.model.set_stage(stage)
    if not quantization:  # a 4-bit base is placed while loading
        run.model.to(accelerator.device)
    return accelerator, run


def evaluate_command(raw: DictConfig) -> None:
    cfg: EvalRunConfig = OmegaConf.to_object(raw)  # type: ignore[assignment]
    out_dir = Path(cfg.output_dir)
    guard_eval_output(out_dir)
    if cfg.predictions:
        _score_file(cfg, out_dir)
        return
    if check_generation_hardware(cfg, "eval"):
        return
    if cfg.run_dir:  # the run's own settings, with the command line's keys on top
        settings = read_run(cfg.run_dir, command_line_changes())
        check_files(settings.data, ("eval",))  # before the model loads
        accelerator, run = open_run(cfg, cfg.run_dir, settings)
        model, tokenizer, registry = run.model, run.tokenizer, run.registry
        data_cfg, eval_cfg = settings.data, settings.eval
        title = f"run {cfg.run_dir} ({settings.method})"
    else:
        accelerator, on_cpu, placement = start_placement(cfg)
        tokenizer = load_tokenizer(cfg.model)
        model = load_base_model(cfg.model, tokenizer, cfg.cache_dir, on_cpu, *placement)
        if not cfg.hardware.quantization:  # a 4-bit base is placed while loading
            model.to(accelerator.device)
        data_cfg, eval_cfg = cfg.data, cfg.eval
        title = f"base model {cfg.model.name_or_path}"
        registry = TaskRegistry.from_rows(read_eval_rows(data_cfg))
    data = prepare_data(data_cfg, tokenizer, registry)
    if accelerator.is_main_process:
        log_empty_targets(data.eval)
    scores = score_model(
        model,
        tokenizer,
        data.eval,
        eval_cfg,
        data_cfg.max_target_length,
        accelerator,
        "eval",
        out_dir,
    )
    figures = {}
    if cfg.run_dir:  # what the run's gates do on the rows scored here
        main, batch = accelerator.is_main_process, eval_cfg.batch_size
        figures = write_routing(model, data.eval, batch, registry.tasks, out_dir, title, main)
    if accelerator.is_main_process:
        columns = report_columns("score", scores)
        write_report(out_dir, f"moelora eval: {title}", columns, {"source": title}, figures)
        log.info((out_dir / "report.md").read_text())


def command_line_changes() -> dict[str, Any]:
    """The model./data./eval. keys given on the command line, as typed (an interpolation is
    resolved against the run's config): they apply on top of the run's own settings
    (`data.root=` where the dev set now lives, `model.name_or_path=` where the base now is)."""
    if not HydraConfig.initialized():
        return {}
    parser = OverridesParser.create()
    changes = {}
    for override in parser.parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        group = key.split(".")[0]
        if group not in RUN_GROUPS or override.is_delete():
            continue
        if key == group:
            raise UserError(
                f"{group}={override.value()} would replace the settings run_dir's run was "
                f"trained with; change single keys instead ({group}.<key>=...)."
            )
        changes[key] = override.value()
    return changes


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
    log.info((out_dir / "report.md").read_text())
