"""Typed schemas for every config group and command, registered with Hydra so that a misspelt key
or a wrong type fails at start with the key's name, before any model is loaded."""

from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moelora.adapters.methods import METHOD_REGISTRY
from moelora.config.commands import (
    EvalRunConfig,
    ExportConfig,
    GenerationRunConfig,
    PredictConfig,
    TrainConfig,
)
from moelora.config.groups import (
    DataConfig,
    EvalConfig,
    HardwareConfig,
    MixtureConfig,
    ModelConfig,
    TinyModelConfig,
    TrainerConfig,
)
from moelora.errors import UserError
from moelora.paths import DATA_DIR

__all__ = [
    "DataConfig",
    "EvalConfig",
    "EvalRunConfig",
    "ExportConfig",
    "GenerationRunConfig",
    "HardwareConfig",
    "MixtureConfig",
    "ModelConfig",
    "PredictConfig",
    "TinyModelConfig",
    "TrainConfig",
    "TrainerConfig",
    "load_config",
    "register_configs",
    "to_container",
]


def register_configs() -> None:
    """Register the schemas that train.yaml/eval.yaml name first in their defaults lists, and
    each registered method's schema as `method_schema/<name>`, which its `configs/method/`
    yaml names first in its defaults list."""
    cs = ConfigStore.instance()
    for name, method in METHOD_REGISTRY.items():
        cs.store(group="method_schema", name=name, node=method.config_class)
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalRunConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="export_schema", node=ExportConfig)
    if not OmegaConf.has_resolver("moelora_data"):
        OmegaConf.register_new_resolver("moelora_data", lambda sub="": str(DATA_DIR / sub))
    if not OmegaConf.has_resolver("moelora_devices"):
        OmegaConf.register_new_resolver("moelora_devices", _visible_gpus)


def _visible_gpus() -> int:
    """Processes per machine for the multi-device presets: every visible GPU (1 without one)."""
    import torch

    return max(torch.cuda.device_count(), 1)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved config as plain Python, for saving in the run directory."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def load_config(raw: DictConfig) -> Any:
    """The typed config of a composed one: every schema's checks have run."""
    try:
        return OmegaConf.to_object(raw)
    except ValueError as err:
        raise UserError(str(err)) from None
