"""What the generating commands (eval, predict) share: the hardware check and launch, a run's
model on this process's device, and the command line's keys on top of a run's settings."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from moelora.adapters import inference_stage
from moelora.config import GenerationRunConfig
from moelora.errors import UserError
from moelora.hardware import base_placement, make_accelerator, place_model
from moelora.launch import launch_this_command, needs_launch
from moelora.log import get_logger
from moelora.rundir import RUN_GROUPS, LoadedRun, RunSettings, load_run

log = get_logger(__name__)


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


def open_run(
    cfg: GenerationRunConfig, run_dir: str, settings: RunSettings
) -> tuple[Accelerator, LoadedRun]:
    """(accelerator, LoadedRun): the run's model on this process's device, at the adapter stage
    its eval settings score with; a QLoRA run on a full-precision base (or back) gets a note."""
    stage = inference_stage(settings.method, settings.eval.force_domain)
    accelerator = make_accelerator(cfg.hardware)
    placement = base_placement(accelerator, cfg.hardware)
    run = load_run(run_dir, cfg.cache_dir, *placement, settings)
    quantization = cfg.hardware.quantization
    if settings.quantization != quantization:
        log.info(
            f"note: the run trained on a {settings.quantization or 'full-precision'} base "
            f"and is scored on a {quantization or 'full-precision'} one; "
            f"hardware.quantization={settings.quantization or 'null'} scores it as trained."
        )
    run.model.set_stage(stage)
    place_model(run.model, cfg.hardware, accelerator)
    return accelerator, run


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
