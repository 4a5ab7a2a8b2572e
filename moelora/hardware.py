"""The hardware strategy as an `Accelerator`: device, precision, DDP or DeepSpeed ZeRO, trackers,
and the few places where ZeRO-3's partitioned parameters need gathering."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
)

from moelora import atomic
from moelora.config import HardwareConfig, TrainerConfig
from moelora.errors import UserError
from moelora.log import get_logger

log = get_logger(__name__)

DEEPSPEED_FILE = "deepspeed.json"
# DeepSpeed keys sized from the model's hidden size h, as accelerate and transformers fill them.
_SIZED_BY_HIDDEN = {
    "reduce_bucket_size": lambda h: h * h,
    "allgather_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}


# The dtype a 4-bit base computes in, from the run's mixed precision.
COMPUTE_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_placement(
    accelerator: Accelerator, hardware: HardwareConfig
) -> tuple[bool, str | None, torch.device, torch.dtype]:
    """The arguments after the cache dir that `load_base_model` and `load_run` take to load a
    base for this process: (on_cpu, quantization, device, compute dtype of the precision)."""
    device = accelerator.device
    precision = COMPUTE_DTYPES[accelerator.mixed_precision]
    return device.type == "cpu", hardware.quantization, device, precision


def place_model(model: torch.nn.Module, hardware: HardwareConfig, accelerator: Accelerator) -> None:
    """Move a model (base and adapters) to this process's device; a 4-bit base was placed while
    loading and stays where bitsandbytes put it."""
    if not hardware.quantization:
        model.to(accelerator.device)


def on_cpu(hardware: HardwareConfig) -> bool:
    return hardware.cpu or not torch.cuda.is_available()


def world_size() -> int:
    """Processes in this run, as the launcher set them (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config(
    hardware: HardwareConfig, trainer: TrainerConfig, precision: str, processes: int
) -> dict[str, Any]:
    """hardware.deepspeed with its `auto` values filled from the trainer settings; a concrete
    value that contradicts them stops (the trainer's settings are the single source of truth)."""
    config = copy.deepcopy(hardware.deepspeed)
    wanted = {
        "train_micro_batch_size_per_gpu": trainer.batch_size,
        "gradient_accumulation_steps": trainer.grad_accum,
        "train_batch_size": trainer.batch_size * trainer.grad_accum * processes,
        "gradient_clipping": trainer.max_grad_norm,
    }
    for key, value in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise UserError(
                f"hardware.deepspeed.{key}={given} contradicts the trainer settings ({value}); "
                f"set it to auto and change trainer.* instead."
            )
        config[key] = value
    for name in ("bf16", "fp16"):
        config[name] = {**config.get(name, {}), "enabled": precision == name}
    return config


def fill_model_sizes(config: dict[str, Any], hidden_size: int) -> None:
    """Fill the bucket sizes left `auto` from the base model's hidden size (in place)."""
    zero = config.get("zero_optimization", {})
    for key, size in _SIZED_BY_HIDDEN.items():
        if zero.get(key) == "auto":
            zero[key] = size(hidden_size)


def make_accelerator(
    hardware: HardwareConfig,
    run_dir: Path | None = None,
    loggers: list[str | GeneralTracker] | None = None,
    trainer: TrainerConfig | None = None,
) -> Accelerator:
    """On a CPU, mixed precision is turned off (bf16 there is emulated and ~30x slower) and the
    process group uses gloo (accelerate picks none without a GPU). The LR schedule counts
    optimizer steps, so accelerate must not step it once per process. DeepSpeed (training only,
    `trainer` given) is configured from hardware.deepspeed; under ZeRO-3 a checkpoint then loads
    straight into partitions (`deepspeed.zero.Init`)."""
    cpu = on_cpu(hardware)
    precision = "no" if cpu else hardware.mixed_precision
    if precision != hardware.mixed_precision:
        log.info(f"no GPU: hardware.mixed_precision={hardware.mixed_precision} becomes fp32")
    loggers = [name for name in loggers or [] if name != "none"]
    project = None
    if run_dir is not None:
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and world_size() > 1 else []
    plugin, accumulation = None, None
    if trainer is not None:
        accumulation = GradientAccumulationPlugin(
            num_steps=trainer.grad_accum, sync_with_dataloader=False, adjust_scheduler=False
        )
        if hardware.strategy == "deepspeed":
            plugin = _deepspeed_plugin(hardware, trainer, precision)
    accelerator = Accelerator(
        cpu=cpu and plugin is None,
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,
        gradient_accumulation_plugin=accumulation,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        log_with=loggers or None,
        project_config=project,
    )
    _check_layout(accelerator, hardware)
    return accelerator


def _deepspeed_plugin(
    hardware: HardwareConfig, trainer: TrainerConfig, precision: str
) -> DeepSpeedPlugin:
    """hardware.deepspeed, its "auto" fields filled; ZeRO-3 loads a base into partitions."""
    if os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None):
        log.info("hardware.deepspeed is the DeepSpeed config; your accelerate config's is unused")
    config = deepspeed_config(hardware, trainer, precision, world_size())
    stage3 = config["zero_optimization"].get("stage") == 3
    return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=stage3)


def _check_layout(accelerator: Accelerator, hardware: HardwareConfig) -> None:
    """Stop when the processes are not what the launch promised: some launcher/flag mixes
    silently start independent single processes or drop DeepSpeed."""
    if accelerator.num_processes != world_size():
        raise UserError(
            f"the launcher started {world_size()} processes but they do not form one group "
            f"({accelerator.num_processes} seen); launch through `moelora train` or the "
            f"command it prints."
        )
    uses_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if accelerator.state.deepspeed_plugin is not None and not uses_deepspeed:
        raise UserError(
            f"hardware={hardware.name} asks for DeepSpeed but accelerate did not enable it; "
            f"unset ACCELERATE_USE_CPU and launch with `moelora train` or the command it prints."
        )


def deepspeed_of(accelerator: Accelerator) -> dict[str, Any] | None:
    """The live DeepSpeed config of this run (None without DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def is_zero3(accelerator: Accelerator) -> bool:
    config = deepspeed_of(accelerator)
    return bool(config) and config["zero_optimization"].get("stage") == 3


def save_deepspeed_config(accelerator: Accelerator, run_dir: Path) -> None:
    """Keep the DeepSpeed JSON the run used, every `auto` resolved."""
    config = deepspeed_of(accelerator)
    if config is not None and accelerator.is_main_process:
        atomic.write_json(run_dir / DEEPSPEED_FILE, config)


@contextlib.contextmanager
def built_whole(accelerator: Accelerator) -> Iterator[None]:
    """Models created inside are not put in ZeRO-3 partitions as they are built: for a model
    made and trained in-process (the tiny base's warm-up), partitioned later by the engine."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextlib.contextmanager
def gathered(
    accelerator: Accelerator, params: Iterable[torch.nn.Parameter], modifier_rank: int | None = None
) -> Iterator[None]:
    """Whole tensors for `params` inside the block; a no-op except under ZeRO-3, where every
    process must enter it (a collective). With `modifier_rank`, that rank's in-place changes are
    written back to the partitions on exit."""
    if not is_zero3(accelerator):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank):
        yield
