"""The config groups' schemas (model, data, hardware, trainer, eval): each checks its own values
in `__post_init__`, naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from moelora.errors import UserError, check_choice, check_range

STRATEGIES = ("single", "ddp", "deepspeed")
LAUNCHERS = ("accelerate", "torchrun", "deepspeed")
SCHEDULERS = ("cosine", "linear", "constant")
TRACKERS = ("tensorboard", "mlflow", "wandb", "none")
TEMPLATES = ("auto", "chat", "plain")
PACKINGS = ("none", "grouped", "packed")
LENGTH_POLICIES = ("truncate_input", "drop", "error")
SCORER_CHOICES = ("official", "lenient", "both")
TINY_ARCHITECTURES = ("llama", "qwen2")  # transformers model types the tiny base can take
MIXTURE_STRATEGIES = ("proportional", "uniform", "temperature", "weights")


@dataclass
class TinyModelConfig:
    """A small decoder-only transformer built from a transformers config (random weights)."""

    architecture: str = "llama"  # llama | qwen2
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0
    # Full-parameter warm-up of the random base on plain text, so adapters start from a model that
    # already "reads" the language (as with a real pretrained LLM). Cached; 0 disables it.
    pretrain_steps: int = 0
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 32
    pretrain_files: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choice("model.tiny.architecture", self.architecture, TINY_ARCHITECTURES)
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            check_range(f"model.tiny.{key}", getattr(self, key), 1)
        check_range("model.tiny.max_position_embeddings", self.max_position_embeddings, 1)
        check_range("model.tiny.pretrain_steps", self.pretrain_steps, 0)
        check_range("model.tiny.pretrain_lr", self.pretrain_lr, 0, above=True)
        check_range("model.tiny.pretrain_batch_size", self.pretrain_batch_size, 1)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.tiny.hidden_size={self.hidden_size}, num_heads={self.num_heads} and "
                f"num_kv_heads={self.num_kv_heads} do not divide evenly; pick hidden_size a "
                f"multiple of num_heads and num_heads a multiple of num_kv_heads."
            )


@dataclass
class ModelConfig:
    name: str = MISSING
    # "tiny" builds `tiny` below; anything else is a local folder or a hub id for from_pretrained.
    name_or_path: str = MISSING
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class MixtureConfig:
    """How task datasets are mixed into one training stream (see moelora.data.mixture)."""

    strategy: str = "proportional"  # proportional | uniform | temperature | weights
    temperature: float = 1.0
    weights: dict[str, float] = field(default_factory=dict)
    max_per_task: int | None = None
    min_per_task: int | None = None
    epoch_size: int | None = None  # rows drawn per epoch; default: the sum of the task sizes

    def __post_init__(self) -> None:
        key = "data.mixture"
        check_choice(f"{key}.strategy", self.strategy, MIXTURE_STRATEGIES)
        check_range(f"{key}.temperature", self.temperature, 0, above=True)
        for task, weight in self.weights.items():
            check_range(f"{key}.weights.{task}", weight, 0)
        check_range(f"{key}.max_per_task", self.max_per_task, 1, optional=True)
        check_range(f"{key}.min_per_task", self.min_per_task, 0, optional=True)
        check_range(f"{key}.epoch_size", self.epoch_size, 1, optional=True)


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    # Files (or folders of them, or `save_to_disk` folders) under root, one list per split ...
    train_files: list[str] = field(default_factory=lambda: ["train.jsonl"])
    eval_files: list[str] = field(default_factory=lambda: ["dev.jsonl"])
    # ... or a `datasets` name / local folder for load_dataset, whose splits replace the files.
    dataset: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    # Rows held out of training to choose settings by (a sweep's objective), scored like the eval
    # set and reported apart from it: a share of each task's training rows, drawn with
    # validation_seed (the same rows whatever trainer.seed), or files under root.
    validation: float = 0.0
    validation_files: list[str] | None = None
    validation_seed: int = 0
    tasks: list[str] | None = None  # train on these tasks only (default: all in the files)
    eval_tasks: list[str] | None = None  # score these tasks only (default: data.tasks, or all)
    max_eval_samples_per_task: int | None = None
    max_source_length: int = 256
    max_target_length: int = 64
    # truncate_input: cut the input's start, drop (and count) rows whose target alone is too long;
    # drop: drop (and count) every row over a limit; error: stop at the first such row.
    length_policy: str = "truncate_input"
    template: str = "auto"  # auto (chat template if the tokenizer has one) | chat | plain
    system_prompt: str | None = None
    domains: dict[str, str] = field(default_factory=dict)  # task -> domain (default: task_type)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    # How a batch's rows become tensors (training and eval loss): none (each row padded to the
    # batch's longest), grouped (rows of similar length batched together, within windows of
    # group_window batches of the epoch's order), or packed (the batch's rows concatenated
    # into sequences of at most pack_length tokens, attention kept within each row).
    packing: str = "none"
    pack_length: int | None = None  # default: max_source_length + max_target_length
    group_window: int = 50

    def __post_init__(self) -> None:
        check_choice("data.template", self.template, TEMPLATES)
        check_choice("data.length_policy", self.length_policy, LENGTH_POLICIES)
        check_choice("data.packing", self.packing, PACKINGS)
        check_range("data.pack_length", self.pack_length, 2, optional=True)
        check_range("data.group_window", self.group_window, 1)
        check_range("data.validation", self.validation, 0, 1, below=True)
        if self.validation and self.validation_files:
            raise UserError(
                "data.validation and data.validation_files both choose the validation rows; "
                "set one of them."
            )
        check_range("data.max_source_length", self.max_source_length, 1)
        check_range("data.max_target_length", self.max_target_length, 1)
        check_range(
            "data.max_eval_samples_per_task", self.max_eval_samples_per_task, 1, optional=True
        )

    @property
    def packed_length(self) -> int | None:
        """The most tokens of a packed sequence, when packing; a longer row follows the length
        policy like one over the source/target limits."""
        if self.packing != "packed":
            return None
        return self.pack_length or self.max_source_length + self.max_target_length


@dataclass
class HardwareConfig:
    """How a run uses the machine(s): device, precision, process layout and engine."""

    name: str = MISSING
    cpu: bool = False  # force CPU even where a GPU is present
    mixed_precision: str = "no"  # no | bf16 | fp16 (turned off on a CPU)
    strategy: str = "single"  # single | ddp | deepspeed
    num_processes: int = 1  # per machine (torchrun's --nproc_per_node)
    num_machines: int = 1
    launcher: str = "accelerate"  # accelerate | torchrun | deepspeed: the command to launch with
    main_process_port: int = 29500
    # A DeepSpeed config (strategy=deepspeed); batch, accumulation, clipping, precision and the
    # model-size buckets may be "auto" and are filled from trainer/model settings.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    quantization: str | None = None  # nf4: a bitsandbytes 4-bit base under the adapters (QLoRA)

    def __post_init__(self) -> None:
        """Stop on a contradictory hardware preset before anything is loaded."""
        check_choice("hardware.strategy", self.strategy, STRATEGIES)
        check_choice("hardware.launcher", self.launcher, LAUNCHERS)
        if self.strategy == "deepspeed" and not self.deepspeed.get("zero_optimization"):
            raise UserError(
                "hardware.strategy=deepspeed needs hardware.deepspeed.zero_optimization; start "
                "from hardware=zero2 or hardware=zero3."
            )
        if self.quantization is not None:
            check_choice("hardware.quantization", self.quantization, ("nf4",))
        if self.quantization and self.strategy == "deepspeed":
            raise UserError(
                "a 4-bit base (hardware.quantization=nf4) cannot be partitioned by DeepSpeed; use "
                "hardware=qlora_4bit with hardware.strategy=single or ddp."
            )
        check_range("hardware.num_processes", self.num_processes, 1)
        check_range("hardware.num_machines", self.num_machines, 1)
        check_range("hardware.main_process_port", self.main_process_port, 1, 65535)


@dataclass
class TrainerConfig:
    seed: int = 42
    max_steps: int = 100
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # torch.compile each decoder layer of the base (with its adapters) for training; the first
    # steps compile (minutes on a CPU). Measured in BENCHMARKS.md.
    compile: bool = False
    log_every: int = 10
    eval_every: int = 0  # eval loss every N steps (0: only at the end)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # the newest N checkpoints stay; 0 keeps every one
    # true: continue from the newest checkpoint in run_dir; auto: continue when there is one,
    # else start (one job script for first start and restart alike).
    resume: Any = False
    # Steps with a non-finite loss or gradient are skipped; this many in a row stop the run.
    max_bad_steps: int = 5
    # An earlier run directory whose adapter initialises this one (tensors that do not fit, e.g.
    # added domain experts or a resized router, keep their init); needed by method.add_domains.
    init_adapter_from: str | None = None
    # Experiment trackers: tensorboard, mlflow, wandb (README: Experiment trackers).
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str | None = None  # the run's name in MLflow and W&B (default: method and folder)

    def __post_init__(self) -> None:
        check_choice("trainer.scheduler", self.scheduler, SCHEDULERS)
        for tracker in self.log_with:
            check_choice("trainer.log_with", tracker, TRACKERS)
        if self.resume not in (True, False, "auto"):
            raise UserError(f"trainer.resume={self.resume} is unknown; use true, false or auto.")
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "max_bad_steps"):
            check_range(f"trainer.{key}", getattr(self, key), 1)
        check_range("trainer.lr", self.lr, 0, above=True)
        check_range("trainer.weight_decay", self.weight_decay, 0)
        check_range("trainer.warmup_ratio", self.warmup_ratio, 0, 1, below=True)
        check_range("trainer.max_grad_norm", self.max_grad_norm, 0)
        check_range("trainer.eval_every", self.eval_every, 0)
        check_range("trainer.save_every", self.save_every, 0)
        check_range("trainer.keep_checkpoints", self.keep_checkpoints, 0)


@dataclass
class EvalConfig:
    enabled: bool = True  # score the dev set after training
    before: bool = True  # also score the untouched base model (the "before" row)
    batch_size: int = 32
    max_new_tokens: int | None = None  # default: data.max_target_length
    # modula/modula_res: score each row with its own domain's expert (the domain of its task)
    # instead of the token router -- the "--domain override" for when the domain is known.
    force_domain: bool = False
    # Also report the mean over these tasks (cmedical: the 8 tasks the MOELoRA paper scores).
    summary_tasks: list[str] | None = None
    # How answers are read: official (the PromptCBLUE scorer, leaderboard numbers), lenient
    # (kinder to messy output), or both (official is the headline, lenient a second column).
    scorer: str = "official"
    # Generate each task's (or domain's) rows with its static gate folded into the base weights
    # (base-model speed; the weights are restored bitwise). false: through the adapter.
    fold: bool = True

    def __post_init__(self) -> None:
        check_choice("eval.scorer", self.scorer, SCORER_CHOICES)
        check_range("eval.batch_size", self.batch_size, 1)
        check_range("eval.max_new_tokens", self.max_new_tokens, 1, optional=True)
