"""The schemas of whole commands (train, eval, predict, export), built from the groups, and the
checks that need several groups at once."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from moelora.adapters.config import AdapterConfig
from moelora.adapters.methods import inference_stage, method_of
from moelora.config.groups import (
    DataConfig,
    EvalConfig,
    HardwareConfig,
    ModelConfig,
    TrainerConfig,
)
from moelora.errors import UserError


@dataclass
class TrainConfig:
    method: AdapterConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = MISSING
    cache_dir: str = MISSING

    def __post_init__(self) -> None:
        """Settings of several groups that contradict each other, or the method's stages."""
        method = method_of(self.method)
        inference_stage(self.method.name, self.eval.force_domain)  # a misplaced force_domain
        if method.added_domains() and not self.trainer.init_adapter_from:
            raise UserError(
                f"method.add_domains={method.added_domains()} adds domains to an earlier run; "
                f"pass trainer.init_adapter_from=<that run's directory>."
            )
        if self.trainer.compile and method.aux_losses:
            raise UserError(
                f"trainer.compile=true cannot serve {self.method.name}: its routers append aux "
                "losses to one list per forward, which torch.compile specializes per layer (a "
                "recompile each, then eager); use it with lora or moelora, or set "
                "trainer.compile=false."
            )
        stages = method.stages()
        if self.hardware.strategy == "deepspeed" and len(stages) > 1:
            raise UserError(
                f"under DeepSpeed a run trains one stage (the engine owns the optimizer and the "
                f"weights), not method.stages={stages}; run MoDULA's stages as separate runs, "
                f"method.stages=[universal], then [domain], then [router], each with "
                f"trainer.init_adapter_from=<the previous run>, or use hardware=ddp."
            )


@dataclass
class GenerationRunConfig:
    """What `eval` and `predict` share: model, data and eval settings (a run's own, with the
    command line's keys on top, when run_dir is given), the hardware and where to write."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = MISSING
    cache_dir: str = MISSING


@dataclass
class EvalRunConfig(GenerationRunConfig):
    """`moelora eval`: score a training run, a base model, or a predictions file."""

    run_dir: str | None = None  # a training run to re-score (its config and adapter are used)
    predictions: str | None = None  # a JSONL of {sample_id, prediction} to score without a model


@dataclass
class PredictConfig(GenerationRunConfig):
    """`moelora predict`: a run's answers for rows without targets (a test split), or for one
    prompt typed on the command line."""

    run_dir: str = MISSING
    input: str | None = None  # one prompt to answer on the console instead of the eval files
    task: str | None = None  # the task of that prompt (needed by task-routed methods)


@dataclass
class ExportConfig:
    """`moelora export`: one task's adapter of a run as a PEFT LoRA adapter and/or merged model."""

    run_dir: str = MISSING
    task: str | None = None  # required for task-gated methods (moelora)
    formats: list[str] = field(default_factory=lambda: ["peft"])  # peft | merged
    output_dir: str = MISSING
    cache_dir: str = MISSING
