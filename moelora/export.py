"""`moelora export`: one task's slice of a trained run as artefacts any LoRA stack can load — a
standard PEFT LoRA adapter (the task's gate folded into B) and, on request, a merged model."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoConfig

from moelora import atomic
from moelora.adapters import export_peft_adapter, get_method, merge_adapter
from moelora.config import ExportConfig, ModelConfig, load_config
from moelora.errors import UserError
from moelora.log import get_logger
from moelora.rundir import LoadedRun, load_run

log = get_logger(__name__)

FORMATS = ("peft", "merged")


def export_command(raw: DictConfig) -> None:
    cfg: ExportConfig = load_config(raw)
    unknown = [f for f in cfg.formats if f not in FORMATS]
    if unknown or not cfg.formats:
        raise UserError(f"formats={cfg.formats} must be a non-empty list from {FORMATS}.")
    run = load_run(cfg.run_dir, cfg.cache_dir, on_cpu=True)
    task_id = run.registry.task_id(cfg.task) if cfg.task is not None else None
    method = get_method(run.settings.method)
    if method.export_per in ("task", "domain") and task_id is None:
        raise UserError(
            f"a {run.settings.method} run has one adapter per {method.export_per}; pass "
            f"task=<name>, one of {run.registry.tasks}."
        )
    domain_id = None
    if method.export_per == "domain":  # the task's domain expert (plus the universal one)
        run.model.set_stage(method.forced_stage)
        task_id, domain_id = None, run.registry.domain_id(cfg.task)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_formats(run, cfg.formats, out, task_id, domain_id)
    except ValueError as err:
        raise UserError(str(err)) from None
    info = {
        "run_dir": cfg.run_dir,
        "task": cfg.task,
        "method": run.settings.method,
        "formats": cfg.formats,
    }
    atomic.write_json(out / "export.json", info)


def _write_formats(
    run: LoadedRun, formats: list[str], out: Path, task_id: int | None, domain_id: int | None
) -> None:
    """The PEFT adapter and/or the merged model (in the checkpoint's own dtype), each written
    whole or not at all."""
    if "peft" in formats:
        with atomic.atomic(out / "peft") as tmp:
            export_peft_adapter(run.model, task_id, tmp, domain_id=domain_id)
        log.info(f"PEFT LoRA adapter: {out / 'peft'}")
    if "merged" in formats:
        merged = merge_adapter(run.model, task_id, domain_id=domain_id)
        saved_dtype = _checkpoint_dtype(run.settings.model)
        if saved_dtype is not None:
            merged.to(saved_dtype)
        with atomic.atomic(out / "merged") as tmp:
            merged.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
        log.info(f"merged model: {out / 'merged'}")


def _checkpoint_dtype(cfg: ModelConfig) -> torch.dtype | None:
    """The dtype a real checkpoint was saved in (a merged model is written back in it; the run
    may have loaded it in fp32 on a CPU). None for the tiny model."""
    if cfg.name_or_path == "tiny":
        return None
    saved = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    dtype = getattr(saved, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None
