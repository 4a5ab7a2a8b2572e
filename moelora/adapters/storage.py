"""Saving and loading an adapter: safetensors weights plus a self-describing JSON config. A
damaged or incomplete file stops in one sentence that names it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from moelora.adapters.methods import method_config
from moelora.adapters.model import AdaptedModel
from moelora.atomic import error_words, io_errors
from moelora.errors import DamagedFile

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def save_adapter(model: AdaptedModel, directory: str | Path, metadata: dict | None = None) -> None:
    """Write `adapter_model.safetensors` and `adapter_config.json` (method, sizes, metadata).

    `metadata` must be JSON-serialisable (e.g. the task registry). Under ZeRO-3 gather the
    adapter parameters first: this reads the local tensors.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in model.adapter_state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    description = {
        "method": asdict(model.config),
        "num_tasks": model.num_tasks,
        "num_domains": model.num_domains,
        "metadata": metadata or {},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(description, indent=2, ensure_ascii=False))


def load_adapter(directory: str | Path, base: PreTrainedModel) -> tuple[AdaptedModel, dict]:
    """Rebuild the adapted model on `base` from a saved adapter; returns (model, metadata)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}; pass a saved adapter folder.")
    try:
        description = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        raise _damaged(directory / CONFIG_NAME, err) from None
    config = method_config(description["method"], strict=False)
    model = AdaptedModel(base, config, description["num_tasks"], description["num_domains"])
    load_adapter_weights(model, directory)
    return model, description["metadata"]


def load_adapter_weights(
    model: AdaptedModel, directory: str | Path, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy a saved adapter's tensors into an already built model; returns (loaded, kept) names.

    strict=False skips tensors that do not fit (new experts, a resized router), which keep their
    init: how a run starts from an earlier run's adapter (`trainer.init_adapter_from`).
    """
    path = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(str(path), device=str(model.device))
    except io_errors() as err:  # OSError or safetensors' error: missing, cut short, damaged
        raise _damaged(path, err) from None
    kept = model.load_adapter_state_dict(state, strict=strict)
    loaded = [name for name, _ in model.named_adapter_parameters() if name not in kept]
    return loaded, kept


def _damaged(path: Path, err: BaseException) -> DamagedFile:
    return DamagedFile(path, error_words(err), "train or copy the adapter again.")
