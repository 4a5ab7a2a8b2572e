"""Reading a finished training run back: its config, task registry, base model and adapter.
Used by `moelora eval run_dir=...` and `moelora export run_dir=...`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from moelora.adapters import AdaptedModel, AdapterConfig, get_method, load_adapter
from moelora.adapters.config import SHAPE_FIELDS
from moelora.adapters.storage import CONFIG_NAME, WEIGHTS_NAME
from moelora.atomic import error_words
from moelora.config import DataConfig, EvalConfig, ModelConfig
from moelora.data.tasks import TaskRegistry
from moelora.errors import DamagedFile, UserError
from moelora.modeling import load_base_model, load_tokenizer


def read_run_file(path: Path) -> Any:
    """One of a run's own JSON or YAML files; a damaged one stops in one line naming it."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text(encoding="utf-8"))
        return OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise DamagedFile(path, error_words(err), "restore it, or train the run again.") from None


def require_finished_run(run_dir: str | Path, key: str, needed: tuple[str, ...]) -> Path:
    """The run folder that config key `key` names, once it holds every path in `needed`."""
    run_dir = Path(run_dir)
    for name in needed:
        if not (run_dir / name).exists():
            raise UserError(
                f"{key}={run_dir} has no {name}; point {key} at a finished training run."
            )
    return run_dir


def read_init_run(run_dir: str | Path, method: AdapterConfig) -> TaskRegistry:
    """The task registry of the earlier run that `trainer.init_adapter_from` names, once its
    adapter is known to fit this run's method (same method and sizes)."""
    key = "trainer.init_adapter_from"
    run_dir = require_finished_run(
        run_dir, key, ("tasks.json", f"adapter/{CONFIG_NAME}", f"adapter/{WEIGHTS_NAME}")
    )
    saved = read_run_file(run_dir / "adapter" / CONFIG_NAME)["method"]
    differ = [
        f"{name}={saved.get(name)!r} there, {getattr(method, name)!r} here"
        for name in SHAPE_FIELDS
        if hasattr(method, name) and saved.get(name) != getattr(method, name)
    ]
    if differ:
        raise UserError(
            f"{key}={run_dir} holds a {saved.get('name')} adapter that does not fit this run's "
            f"method ({'; '.join(differ)}); use the earlier run's method and sizes."
        )
    return TaskRegistry.load(run_dir / "tasks.json")


def check_resume_config(run_dir: str | Path, current: dict) -> None:
    """On resume, the method and data must be the run's own: a checkpoint's adapter, stages and
    task ids only fit the config they were made with. Trainer settings may change."""
    saved_file = Path(run_dir) / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.to_container(read_run_file(saved_file))
    was, now = saved["method"].get("name"), current["method"].get("name")
    if was != now:
        raise UserError(
            f"trainer.resume: {run_dir} is a {was} run, and this command asks for method={now}; "
            f"resume with method={was}, or choose a new run_dir for {now}."
        )
    for group in ("method", "data"):
        # A key the saved config lacks (a run made before the key existed) had its default.
        defaults = _defaults(DataConfig if group == "data" else get_method(now).config_class)
        was_set = defaults | saved[group]
        changed = sorted(
            k for k in set(was_set) | set(current[group]) if was_set.get(k) != current[group].get(k)
        )
        if changed:
            raise UserError(
                f"trainer.resume=true, but {group}.{changed[0]} differs from {saved_file}; "
                f"resume with the run's own {group} settings."
            )


def _defaults(schema: type) -> dict[str, Any]:
    """The plain default of each field of a config dataclass that has one."""
    found = {}
    for spec in fields(schema):
        if spec.default is not MISSING:
            found[spec.name] = spec.default
        elif spec.default_factory is not MISSING:
            value = spec.default_factory()
            if not is_dataclass(value):
                found[spec.name] = value
    return found


# The parts of a run's config that `moelora eval run_dir=...` reuses (and lets you change).
RUN_GROUPS = ("model", "data", "eval")


def guard_eval_output(output_dir: str | Path) -> None:
    """Eval writes metrics.json and report.md: never over a training run's own."""
    output_dir = Path(output_dir)
    if (output_dir / "adapter").exists() or (output_dir / "checkpoints").exists():
        raise UserError(
            f"output_dir={output_dir} holds a training run, whose report eval would overwrite; "
            f"choose another output_dir."
        )


@dataclass
class RunSettings:
    """What a finished run's config.yaml says it was trained and scored with."""

    model: ModelConfig
    data: DataConfig
    eval: EvalConfig
    method: str
    quantization: str | None  # the base the adapter was trained on: None or nf4


def read_run(run_dir: str | Path, changes: Mapping[str, Any] | None = None) -> RunSettings:
    """The run's settings with `changes` ({"data.root": ...}) on top, interpolations resolved
    against the run: the same adapter scored on a moved dataset or a model at another path."""
    run_dir = require_finished_run(run_dir, "run_dir", ("config.yaml", "tasks.json", "adapter"))
    saved = read_run_file(run_dir / "config.yaml")
    for key, value in (changes or {}).items():
        OmegaConf.update(saved, key, value, merge=False)
    OmegaConf.resolve(saved)
    typed = {
        group: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), saved[group]))
        for group, schema in zip(RUN_GROUPS, (ModelConfig, DataConfig, EvalConfig), strict=True)
    }
    return RunSettings(
        **typed,  # type: ignore[arg-type]
        method=str(saved.method.name),
        quantization=OmegaConf.select(saved, "hardware.quantization"),
    )


@dataclass
class LoadedRun:
    model: AdaptedModel
    tokenizer: PreTrainedTokenizerBase
    registry: TaskRegistry
    settings: RunSettings


def load_run(
    run_dir: str | Path,
    cache_dir: str,
    on_cpu: bool,
    quantization: str | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    settings: RunSettings | None = None,
) -> LoadedRun:
    """The run's base model with its trained adapter, as `settings` (default: `read_run`)
    describe them; `quantization` etc. as in `load_base_model` (a QLoRA run is scored on its
    4-bit base)."""
    settings = settings or read_run(run_dir)
    tokenizer = load_tokenizer(settings.model)
    base = load_base_model(
        settings.model, tokenizer, cache_dir, on_cpu, quantization, device, compute_dtype
    )
    model, _ = load_adapter(Path(run_dir) / "adapter", base)
    registry = TaskRegistry.load(Path(run_dir) / "tasks.json")
    return LoadedRun(model, tokenizer, registry, settings)
