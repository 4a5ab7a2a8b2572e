"""Reading a finished training run back: its config, task registry, base model and adapter.
Used by `moelora eval run_dir=...` and `moelora export run_dir=...`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from moelora.adapters import AdaptedModel, load_adapter
from moelora.config import DataConfig, ModelConfig
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError
from moelora.modeling import load_base_model, load_tokenizer


@dataclass
class LoadedRun:
    model: AdaptedModel
    tokenizer: PreTrainedTokenizerBase
    model_cfg: ModelConfig
    data_cfg: DataConfig
    registry: TaskRegistry
    method: str


def guard_run_dir(run_dir: str | Path, resume: bool) -> None:
    """Refuse to train into a folder that already holds a run unless resuming it, so an old
    adapter or checkpoint is never overwritten by accident."""
    run_dir = Path(run_dir)
    if not resume and ((run_dir / "adapter").exists() or (run_dir / "checkpoints").exists()):
        raise UserError(
            f"run_dir={run_dir} already holds a training run; pass trainer.resume=true to "
            f"continue it, or choose a new run_dir."
        )


def load_run(run_dir: str | Path, cache_dir: str, on_cpu: bool) -> LoadedRun:
    """The run's base model with its trained adapter, as the run's own config describes them."""
    run_dir = Path(run_dir)
    for needed in ("config.yaml", "tasks.json", "adapter"):
        if not (run_dir / needed).exists():
            raise UserError(
                f"run_dir={run_dir} has no {needed}; point run_dir at a finished training run."
            )
    saved = OmegaConf.load(run_dir / "config.yaml")
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved.model))
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), saved.data))
    tokenizer = load_tokenizer(model_cfg)
    base = load_base_model(model_cfg, tokenizer, cache_dir, on_cpu)
    model, _ = load_adapter(run_dir / "adapter", base)
    registry = TaskRegistry.load(run_dir / "tasks.json")
    return LoadedRun(model, tokenizer, model_cfg, data_cfg, registry, str(saved.method.name))
