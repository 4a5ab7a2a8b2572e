"""Everything a training run needs before its first step, built whole by `setup_run`: the
processes, the data and its mixture, the base with the method's adapters, and the run directory
(config.yaml, tasks.json, trackers, checkpoints)."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from moelora import atomic
from moelora.adapters import (
    AdaptedModel,
    Method,
    find_targets,
    load_adapter_weights,
    method_of,
)
from moelora.adapters.attention import use_row_attention
from moelora.config import TrainConfig, to_container
from moelora.data.batching import fill_rates
from moelora.data.mixture import MixtureSampler
from moelora.data.pipeline import PreparedData, check_files, prepare_data
from moelora.data.tasks import TaskRegistry, check_added_domains
from moelora.errors import UserError
from moelora.evaluate.scoring import log_empty_targets, with_summary
from moelora.hardware import (
    base_placement,
    built_whole,
    deepspeed_of,
    fill_model_sizes,
    make_accelerator,
    place_model,
    save_deepspeed_config,
)
from moelora.log import get_logger
from moelora.modeling import base_skeleton, load_base_model, load_tokenizer
from moelora.rundir import check_resume_config, read_init_run
from moelora.train.checkpoint import Checkpointer, TrainState, check_free_space
from moelora.train.history import HISTORY_FILE, History
from moelora.train.trackers import check_installed, init_trackers, make_trackers

log = get_logger(__name__)

BEFORE_FILE = "scores_before.json"  # the base model's scores, written once, kept across resumes


@dataclass
class Run:
    """What the recipe's steps share; `resume_from` is the newest checkpoint's position when the
    run resumes, None when it starts."""

    cfg: TrainConfig
    raw: DictConfig
    method: Method
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    sampler: MixtureSampler
    fill: dict[str, float]  # real tokens' share of the batch tensors: "none" and data.packing
    model: AdaptedModel
    adapter_parameters: int  # trainable when built (stages freeze some later)
    checkpointer: Checkpointer
    history: History
    resume_from: TrainState | None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def setup_run(cfg: TrainConfig, raw: DictConfig, resuming: bool) -> Run:
    """Check the run's files, start the processes, read the data, build the model and open the
    run directory; cheap checks come before anything loads."""
    if resuming:
        check_resume_config(cfg.run_dir, to_container(raw))
    check_files(cfg.data)
    check_installed(cfg.trainer.log_with)
    _check_targets(cfg)
    init_from = cfg.trainer.init_adapter_from
    earlier = read_init_run(init_from, cfg.method) if init_from else None
    trainer = cfg.trainer
    accelerator = make_accelerator(cfg.hardware, Path(cfg.run_dir), make_trackers(cfg), trainer)
    accelerator.wait_for_everyone()  # every rank has read config.yaml before rank 0 rewrites it
    set_seed(trainer.seed)
    tokenizer = load_tokenizer(cfg.model)
    method = method_of(cfg.method)
    data, sampler, fill = read_data(cfg, tokenizer, method, earlier, accelerator.num_processes)
    model = build_model(cfg, tokenizer, data.registry, accelerator)
    adapter_parameters = model.num_trainable_parameters()
    log.info(f"method {cfg.method.name}: {adapter_parameters:,} adapter parameters")
    write_run_files(cfg, raw, accelerator, data.registry, resuming)
    checkpointer = Checkpointer(
        accelerator, model, Path(cfg.run_dir) / "checkpoints", trainer.keep_checkpoints
    )
    resume_from = checkpointer.latest_state() if resuming else None
    history = History(Path(cfg.run_dir), accelerator.is_main_process)
    if resume_from is not None:  # steps after the checkpoint are trained (and logged) again
        history.keep_until(resume_from.global_step)
    saves = _checkpoints_on_disk(cfg, method)
    check_free_space(checkpointer.root, adapter_parameters, saves)
    start_trackers(accelerator, raw, sampler, fill)  # last: no check after it leaves a run open
    return Run(
        cfg, raw, method, accelerator, tokenizer, data, sampler, fill, model,
        adapter_parameters, checkpointer, history, resume_from,
    )  # fmt: skip


def _check_targets(cfg: TrainConfig) -> None:
    """The method's targets must match Linears of the base (its roles be known for the base's
    family), checked on its weightless skeleton before anything loads."""
    skeleton = base_skeleton(cfg.model)
    if skeleton is not None:
        try:
            find_targets(skeleton, cfg.method, quiet=True)
        except ValueError as err:
            raise UserError(str(err)) from None


def read_data(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    method: Method,
    earlier: TaskRegistry | None,
    world: int,
) -> tuple[PreparedData, MixtureSampler, dict[str, float]]:
    """Tokenize the splits (an earlier run's task and domain ids kept, new ones appended), draw
    the mixture and measure how full its batches are; says what it found."""
    data = prepare_data(cfg.data, tokenizer, extend=earlier)
    if cfg.eval.enabled:  # fail now, not after training, on a summary the eval set cannot give
        with_summary(
            {"per_task": dict.fromkeys(data.eval["task_dataset"], 0.0)}, cfg.eval.summary_tasks
        )
    sampler = MixtureSampler(data.train["task_dataset"], cfg.data.mixture, cfg.trainer.seed)
    if earlier is not None and method.uses_domains:
        present = {data.registry.domain_of[task] for task in sampler.rows_of}
        check_added_domains(earlier.domains, present, method.added_domains())
    fill = fill_rates(data.train, sampler, cfg.data, cfg.trainer.batch_size, cfg.trainer.seed)
    describe_data(data, sampler, cfg, world, fill)
    if cfg.eval.enabled:
        log_empty_targets(data.eval)
    return data, sampler, fill


def build_model(
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    registry: TaskRegistry,
    accelerator: Accelerator,
) -> AdaptedModel:
    """Load the base model, wrap it with the method's adapters and place it."""
    tiny = cfg.model.name_or_path == "tiny"  # built and warmed up here, not loaded
    with built_whole(accelerator) if tiny else contextlib.nullcontext():
        placement = base_placement(accelerator, cfg.hardware)
        base = load_base_model(cfg.model, tokenizer, cfg.cache_dir, *placement)
    if hasattr(next(base.parameters()), "ds_id"):
        log.info("base model loaded straight into ZeRO-3 partitions (deepspeed.zero.Init)")
    if cfg.data.packing == "packed" and use_row_attention(base):
        log.info("packed rows attend one by one (attention implementation moelora_rows)")
    try:
        model = AdaptedModel(base, cfg.method, len(registry.tasks), len(registry.domains))
        if cfg.trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if cfg.trainer.compile:
            log.info(f"trainer.compile: compiling each {', '.join(model.compile_layers())}")
    except ValueError as err:  # no module matches the targets; a base without repeated blocks
        raise UserError(str(err)) from None
    place_model(model, cfg.hardware, accelerator)
    if (live_deepspeed := deepspeed_of(accelerator)) is not None:
        fill_model_sizes(live_deepspeed, base.config.hidden_size)
    return model


def write_run_files(
    cfg: TrainConfig,
    raw: DictConfig,
    accelerator: Accelerator,
    registry: TaskRegistry,
    resuming: bool,
) -> None:
    """Sweep what a killed process left, write config.yaml and tasks.json; a fresh start also
    drops an unfinished earlier attempt's history and base scores."""
    run_dir = Path(cfg.run_dir)
    if accelerator.is_main_process:
        for folder in (run_dir, run_dir / "checkpoints"):
            atomic.clean_leftovers(folder)
        if not resuming:
            for stale in (run_dir / HISTORY_FILE, run_dir / BEFORE_FILE):
                stale.unlink(missing_ok=True)
        atomic.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(to_container(raw)))
        registry.save(run_dir / "tasks.json")
    save_deepspeed_config(accelerator, run_dir)


def start_trackers(
    accelerator: Accelerator, raw: DictConfig, sampler: MixtureSampler, fill: dict[str, float]
) -> None:
    """The trackers (TensorBoard by default) with the config's scalars, the realised mixture
    and the batches' fill rates at step 0."""
    init_trackers(accelerator, _flat_hparams(raw))
    mix = {f"data/mix/{t}": n / len(sampler) for t, n in sampler.counts.items()}
    filled = {f"data/fill/{layout}": share for layout, share in fill.items()}
    accelerator.log(mix | filled, step=0)


def describe_data(
    data: PreparedData,
    sampler: MixtureSampler,
    cfg: TrainConfig,
    world: int,
    fill: dict[str, float],
) -> None:
    """Print the realised mixture, the length policy's effect, how much of the batches is real
    tokens, and the effective batch size."""
    log.info(f"tasks: {len(data.registry.tasks)}, domains: {data.registry.domains}")
    log.info(f"mixture ({cfg.data.mixture.strategy}), rows per epoch: {len(sampler)}")
    for task, count in sorted(sampler.counts.items()):
        log.info(f"  {task:<18}{count:>7}  ({count / len(sampler):.1%})")
    for split, report in data.reports.items():
        log.info(f"{split} set lengths (tokens):")
        for line in report.lines():
            log.info("  " + line)
    packing = cfg.data.packing
    if packing == "packed":
        packing += f" into {cfg.data.packed_length} tokens"
    log.info(
        f"batches: {packing}; real tokens fill {fill[cfg.data.packing]:.0%} of the batch tensors"
        + (f" (unpacked: {fill['none']:.0%})" if cfg.data.packing != "none" else "")
    )
    t = cfg.trainer
    log.info(
        f"effective batch: {t.batch_size} per device x {world} processes x {t.grad_accum} "
        f"accumulation = {t.batch_size * world * t.grad_accum} rows per step"
    )


def init_adapter(model: AdaptedModel, run_dir: str) -> None:
    """Start from an earlier run's adapter; what does not fit (added domain experts, a resized
    router or task embedding) keeps its init. Says what was loaded and what was not."""
    loaded, kept = load_adapter_weights(model, Path(run_dir) / "adapter", strict=False)
    local = {
        f"base_model.{path}.{name}": name
        for path, layer in model.adapted_layers.items()
        for name, _ in layer.named_parameters()
    }
    tally = Counter(local.get(name, name) for name in kept)
    log.info(
        f"initialised from {run_dir}: {len(loaded)} adapter tensors loaded, {len(kept)} new or "
        f"resized ones keep their init" + "".join(f"\n  {n} x{c}" for n, c in tally.items())
    )


def _checkpoints_on_disk(cfg: TrainConfig, method: Method) -> int:
    """How many checkpoints can lie on disk at once (one more while the next is written)."""
    t = cfg.trainer
    per_stage = t.max_steps // t.save_every + 1 if t.save_every else 1
    written = per_stage * len(method.stages())
    return min(written, t.keep_checkpoints) + 1 if t.keep_checkpoints else written + 1


def _flat_hparams(raw_cfg: DictConfig) -> dict:
    """Scalars of the config, flattened for TensorBoard's hparams (it accepts no lists)."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, int | float | str | bool):
                flat[name] = value

    walk(to_container(raw_cfg), "")
    return flat
