"""The training recipe, readable top to bottom in `train`: prepare (checks, processes, data) ->
build (model + adapters) -> open the run directory -> score the base -> (start from an earlier
run's adapter) -> train each stage (with checkpoints) -> save the adapter -> score -> report.
The steps share one `Run`; training progress across stages is a `Progress`.

Launch: `moelora train +experiment=demo` on one device, or through a distributed launcher:
`accelerate launch -m moelora train +experiment=cmedical hardware=...`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from moelora import atomic, run_lock
from moelora.adapters import AdaptedModel, Method, load_adapter_weights, method_of
from moelora.adapters.attention import use_row_attention
from moelora.analysis.routing import write_routing
from moelora.config import TrainConfig, to_container
from moelora.data.batching import fill_rates, loss_loader
from moelora.data.mixture import STAGE_ROWS, MixtureSampler, stage_sampler
from moelora.data.pipeline import PreparedData, check_files, prepare_data
from moelora.data.tasks import check_added_domains
from moelora.errors import STOPPED_EXIT_CODE, RunStopped, UserError
from moelora.evaluate.report import write_report
from moelora.evaluate.run import (
    eval_loss,
    inference_stage,
    log_empty_targets,
    report_columns,
    score_model,
    with_summary,
)
from moelora.hardware import (
    built_whole,
    deepspeed_of,
    fill_model_sizes,
    is_zero3,
    make_accelerator,
    save_deepspeed_config,
)
from moelora.launch import launch_this_command, needs_launch
from moelora.log import get_logger
from moelora.modeling import COMPUTE_DTYPES, load_base_model, load_tokenizer
from moelora.resume import FINISHED_FILE, plan_run
from moelora.rundir import check_resume_config, read_init_run
from moelora.signals import StopRequest, interrupted
from moelora.train.checkpoint import (
    Checkpointer,
    TrainState,
    check_free_space,
    save_final_adapter,
)
from moelora.train.history import HISTORY_FILE, History
from moelora.train.step import StepResult, add_to_window, flush_window, forward_backward

log = get_logger(__name__)

CURVES_FILE = "curves.png"


def load_train_config(raw: DictConfig) -> TrainConfig:
    """The typed config; a method preset that contradicts itself stops here, before any work."""
    try:
        cfg = OmegaConf.to_object(raw)
    except ValueError as err:
        raise UserError(str(err)) from None
    method = method_of(cfg.method)
    added = method.added_domains()
    if added and not cfg.trainer.init_adapter_from:
        raise UserError(
            f"method.add_domains={added} adds domains to an earlier run; "
            f"pass trainer.init_adapter_from=<that run's directory>."
        )
    inference_stage(cfg.method.name, cfg.eval.force_domain)  # refuses a misplaced override
    if cfg.trainer.compile and method.aux_losses:
        raise UserError(
            f"trainer.compile=true cannot serve {cfg.method.name}: its routers append aux losses "
            "to one list per forward, which torch.compile specializes per layer (a recompile "
            "each, then eager); use it with lora or moelora, or set trainer.compile=false."
        )
    stages = method.stages()
    if cfg.hardware.strategy == "deepspeed" and len(stages) > 1:
        raise UserError(
            f"under DeepSpeed a run trains one stage (the engine owns the optimizer and the "
            f"weights), not method.stages={stages}; run MoDULA's stages as "
            f"separate runs, method.stages=[universal], then [domain], then [router], each with "
            f"trainer.init_adapter_from=<the previous run>, or use hardware=ddp."
        )
    return cfg  # type: ignore[return-value]


@dataclass
class Run:
    """What the recipe's steps share: the typed config, the processes, the data and the model."""

    cfg: TrainConfig
    raw: DictConfig
    method: Method
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    sampler: MixtureSampler
    fill: dict[str, float]  # real tokens' share of the batch tensors: "none" and data.packing
    model: AdaptedModel | None = None
    checkpointer: Checkpointer | None = None
    adapter_parameters: int = 0  # trainable when built (stages freeze some later)
    resume_from: TrainState | None = None  # the newest checkpoint's position, when resuming
    history: History | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def before_file(self) -> Path:
        """The base model's scores, {scorer: scores}; written once, kept across resumes."""
        return self.run_dir / "scores_before.json"


@dataclass
class Progress:
    """What training has done so far, across stages."""

    state: TrainState = field(default_factory=TrainState)
    tokens: int = 0
    seconds: float = 0.0


def train(raw_cfg: DictConfig) -> dict:
    """Run the whole recipe; returns what metrics.json holds (a sweep's objective can use it).
    The run directory is locked against a second run for as long as this one runs."""
    cfg = load_train_config(raw_cfg)
    run_lock.acquire(cfg.run_dir)
    try:
        return _train(cfg, raw_cfg)
    finally:
        run_lock.release(cfg.run_dir)


def _train(cfg: TrainConfig, raw_cfg: DictConfig) -> dict:
    plan = plan_run(cfg.run_dir, cfg.trainer.resume)
    if plan.action == "finished":
        log.info(f"trainer.resume=auto: {cfg.run_dir} has finished already; nothing to do")
        return _read_json(Path(cfg.run_dir) / FINISHED_FILE) or {}
    if cfg.trainer.resume == "auto":
        where = f"resuming from {plan.checkpoint}" if plan.resumes else "starting"
        log.info(f"trainer.resume=auto: {where}")
    cfg.trainer.resume = plan.resumes
    if needs_launch(cfg.hardware):
        launch_this_command(cfg.hardware, "train", f"run_dir={cfg.run_dir}")
        return _read_json(Path(cfg.run_dir) / "metrics.json") or {}
    run = prepare(cfg, raw_cfg)
    build(run)
    open_run_dir(run)
    on_prepared = score_before(run)
    if cfg.trainer.init_adapter_from:  # after the "before" scores, which stay the base model's
        _init_adapter(run.model, cfg.trainer.init_adapter_from)
    progress = train_stages(run, on_prepared)
    save(run)
    return report(run, progress, score_after(run))


def prepare(cfg: TrainConfig, raw_cfg: DictConfig) -> Run:
    """Check the run's settings and files, start the processes, read and tokenize the data."""
    if cfg.trainer.resume:
        check_resume_config(cfg.run_dir, to_container(raw_cfg))
    check_files(cfg.data)
    init_from = cfg.trainer.init_adapter_from
    earlier = read_init_run(init_from, cfg.method) if init_from else None
    run_dir, trainer = Path(cfg.run_dir), cfg.trainer
    accelerator = make_accelerator(cfg.hardware, run_dir, trainer.log_with, trainer)
    accelerator.wait_for_everyone()  # every rank has read config.yaml before rank 0 rewrites it
    set_seed(cfg.trainer.seed)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, extend=earlier)  # earlier ids kept, new appended
    if cfg.eval.enabled:  # fail now, not after training, on a summary the eval set cannot give
        with_summary(
            {"per_task": dict.fromkeys(data.eval["task_dataset"], 0.0)}, cfg.eval.summary_tasks
        )
    sampler = MixtureSampler(data.train["task_dataset"], cfg.data.mixture, cfg.trainer.seed)
    method = method_of(cfg.method)
    if earlier is not None and method.uses_domains:
        present = {data.registry.domain_of[task] for task in sampler.rows_of}
        check_added_domains(earlier.domains, present, method.added_domains())
    fill = fill_rates(data.train, sampler, cfg.data, cfg.trainer.batch_size, cfg.trainer.seed)
    _describe_data(data, sampler, cfg, accelerator.num_processes, fill)
    if cfg.eval.enabled:
        log_empty_targets(data.eval)
    return Run(cfg, raw_cfg, method, accelerator, tokenizer, data, sampler, fill)


def build(run: Run) -> None:
    """Load the base model, wrap it with the method's adapters and place it."""
    cfg, accelerator, registry = run.cfg, run.accelerator, run.data.registry
    tiny = cfg.model.name_or_path == "tiny"  # built and warmed up here, not loaded
    with built_whole(accelerator) if tiny else contextlib.nullcontext():
        base = load_base_model(
            cfg.model,
            run.tokenizer,
            cfg.cache_dir,
            accelerator.device.type == "cpu",
            cfg.hardware.quantization,
            accelerator.device,
            COMPUTE_DTYPES[accelerator.mixed_precision],
        )
    if hasattr(next(base.parameters()), "ds_id"):
        log.info("base model loaded straight into ZeRO-3 partitions (deepspeed.zero.Init)")
    if cfg.data.packing == "packed" and use_row_attention(base):
        log.info("packed rows attend one by one (attention implementation moelora_rows)")
    try:
        model = AdaptedModel(base, cfg.method, len(registry.tasks), len(registry.domains))
    except ValueError as err:  # e.g. no module matches method.target_modules
        raise UserError(str(err)) from None
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if cfg.trainer.compile:
        try:
            log.info(f"trainer.compile: compiling each {', '.join(model.compile_layers())}")
        except ValueError as err:  # a base without repeated blocks
            raise UserError(str(err)) from None
    if not cfg.hardware.quantization:  # a 4-bit base is placed while loading
        model.to(accelerator.device)
    if (live_deepspeed := deepspeed_of(accelerator)) is not None:
        fill_model_sizes(live_deepspeed, base.config.hidden_size)
    run.model, run.adapter_parameters = model, model.num_trainable_parameters()
    log.info(f"method {cfg.method.name}: {run.adapter_parameters:,} adapter parameters")


def open_run_dir(run: Run) -> None:
    """Sweep what a killed process left, write config.yaml and tasks.json (a fresh start also
    drops an unfinished earlier attempt's history and base scores), start the trackers and find
    a checkpoint to resume."""
    cfg, accelerator = run.cfg, run.accelerator
    if accelerator.is_main_process:
        for folder in (run.run_dir, run.run_dir / "checkpoints"):
            atomic.clean_leftovers(folder)
        if not cfg.trainer.resume:
            for stale in (run.run_dir / HISTORY_FILE, run.before_file):
                stale.unlink(missing_ok=True)
        atomic.write_text(run.run_dir / "config.yaml", OmegaConf.to_yaml(to_container(run.raw)))
        run.data.registry.save(run.run_dir / "tasks.json")
    save_deepspeed_config(accelerator, run.run_dir)
    accelerator.init_trackers("train", config=_flat_hparams(run.raw))
    mix = {f"data/mix/{t}": n / len(run.sampler) for t, n in run.sampler.counts.items()}
    fill = {f"data/fill/{layout}": share for layout, share in run.fill.items()}
    accelerator.log(mix | fill, step=0)
    run.checkpointer = Checkpointer(
        accelerator, run.model, run.run_dir / "checkpoints", cfg.trainer.keep_checkpoints
    )
    run.resume_from = run.checkpointer.latest_state() if cfg.trainer.resume else None
    run.history = History(run.run_dir, accelerator.is_main_process)
    if run.resume_from is not None:  # steps after the checkpoint are trained (and logged) again
        run.history.keep_until(run.resume_from.global_step)
    saves = _checkpoints_on_disk(cfg, run.method)
    check_free_space(run.checkpointer.root, run.adapter_parameters, saves)


def _score(run: Run, model: torch.nn.Module, label: str) -> dict[str, dict]:
    """Scores on the dev set by reading; predictions_<label>.jsonl in the run dir."""
    cfg = run.cfg
    limit, accelerator = cfg.data.max_target_length, run.accelerator
    return score_model(
        model, run.tokenizer, run.data.eval, cfg.eval, limit, accelerator, label, run.run_dir
    )


def _score_base(run: Run, model: torch.nn.Module) -> None:
    """Every method starts with B = 0, so the untrained adapted model is exactly its base."""
    before = _score(run, model, "before")
    if run.accelerator.is_main_process:
        atomic.write_json(run.before_file, before)


def score_before(run: Run) -> Callable[[torch.nn.Module], None] | None:
    """Score the base model now, or return that scoring for when the first stage has prepared
    the model: under ZeRO-3 a loaded base is partitioned and runs only once the engine hooks it."""
    cfg = run.cfg
    if not (cfg.eval.enabled and cfg.eval.before) or run.before_file.exists():
        return None
    if not is_zero3(run.accelerator):
        _score_base(run, run.model)
        return None
    if cfg.trainer.init_adapter_from:  # by then the earlier adapter is in place
        log.info(
            "ZeRO-3 with init_adapter_from: no 'before' column; score the base with moelora eval"
        )
        return None
    return functools.partial(_score_base, run)


def train_stages(run: Run, on_prepared: Callable[[torch.nn.Module], None] | None) -> Progress:
    """Train the method's stages in order (resuming inside the checkpoint's stage), then set the
    adapter to the stage it is scored and saved in. A stop signal ends training after the
    current step with a checkpoint (see `moelora.signals`)."""
    cfg, method = run.cfg, run.method
    progress, started = Progress(), time.perf_counter()
    with StopRequest() as stop:
        for index, name in enumerate(method.stages()):
            if run.resume_from is not None and index < run.resume_from.stage:
                continue
            stage = start_stage(run, index, name, _stage_rows(run, name), on_prepared)
            on_prepared = None  # the first stage scores the base, once
            resume = run.resume_from is not None and index == run.resume_from.stage
            run_stage(run, stage, progress, resume, stop)
    progress.seconds = time.perf_counter() - started
    run.model.set_stage(inference_stage(cfg.method.name, cfg.eval.force_domain))
    return progress


def _stage_rows(run: Run, name: str | None) -> MixtureSampler:
    """Set the model to stage `name` and return the rows the stage draws."""
    method, registry, added = run.method, run.data.registry, run.method.added_domains()
    ids = [registry.domains.index(d) for d in added]
    run.model.set_stage(name, domains=ids or None)  # the domain stage: only added experts
    rows = method.stage_rows(name)
    if rows == "mixture":
        return run.sampler
    task_of_row, cfg = run.data.train["task_dataset"], run.cfg
    sampler = stage_sampler(rows, task_of_row, registry, cfg.data.mixture, cfg.trainer.seed, added)
    log.info(f"{name} stage: {STAGE_ROWS[rows]}, per task {sampler.counts}")
    return sampler


@dataclass
class Stage:
    """One stage's prepared objects: a fresh optimizer over what the stage trains."""

    index: int
    name: str | None
    model: torch.nn.Module  # wrapped by accelerate (DDP, a DeepSpeed engine) or the model
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    scheduler: torch.optim.lr_scheduler.LRScheduler


def start_stage(
    run: Run,
    index: int,
    name: str | None,
    sampler: MixtureSampler,
    on_prepared: Callable[[torch.nn.Module], None] | None,
) -> Stage:
    """Prepare the model, a fresh optimizer, the loader and the schedule of one stage;
    `on_prepared` runs once the model is prepared (wrapped or partitioned), before any step."""
    t, accelerator, model = run.cfg.trainer, run.accelerator, run.model
    accelerator.free_memory()
    loader = loss_loader(
        run.data.train,
        t.batch_size,
        model.base_model.config.pad_token_id or 0,
        run.cfg.data,
        sampler=sampler,
        seed=t.seed,
        # Its own generator: creating an iterator would otherwise draw from the global RNG and
        # shift dropout masks after a resume.
        generator=torch.Generator().manual_seed(t.seed),
    )
    optimizer = torch.optim.AdamW(
        model.trainable_parameters(), lr=t.lr, weight_decay=t.weight_decay
    )
    scheduler = get_scheduler(
        t.scheduler if t.scheduler != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=math.ceil(t.warmup_ratio * t.max_steps),
        num_training_steps=t.max_steps,
    )
    prepared = accelerator.prepare(model, optimizer, loader, scheduler)
    if on_prepared is not None:
        on_prepared(prepared[0])
    return Stage(index, name, *prepared)


def run_stage(run: Run, stage: Stage, progress: Progress, resume: bool, stop: StopRequest) -> None:
    """`trainer.max_steps` optimizer steps of one stage, from the checkpoint when resuming."""
    t, accelerator = run.cfg.trainer, run.accelerator
    if resume:
        progress.state = run.checkpointer.load_latest()
        log.info(f"resumed at step {progress.state.global_step} (stage {stage.name or 'main'})")
    else:
        before = progress.state
        progress.state = TrainState(
            stage=stage.index, global_step=before.global_step, skipped_steps=before.skipped_steps
        )
    bar = tqdm(
        total=t.max_steps,
        initial=progress.state.step,
        desc=f"training {stage.name or ''}".strip(),
        disable=not accelerator.is_local_main_process,
    )
    stage.model.train()
    with bar:  # closed before a stop's message
        _steps(run, stage, progress, stop, bar)


def _steps(run: Run, stage: Stage, progress: Progress, stop: StopRequest, bar) -> None:
    """The optimizer steps left in the stage: `grad_accum` micro-batches each."""
    t, accelerator, state, micro = run.cfg.trainer, run.accelerator, progress.state, []
    while state.step < t.max_steps:
        for batch in epoch_batches(accelerator, stage.loader, state):
            state.batches_in_epoch += 1
            micro.append(batch)
            if len(micro) < t.grad_accum:
                continue
            model, max_norm = stage.model, t.max_grad_norm
            result = forward_backward(model, micro, accelerator, max_norm, stop.signum is not None)
            micro = []
            _apply(run, stage, state, result)
            progress.tokens += result.tokens
            state.step += 1
            state.global_step += 1
            bar.update(1)
            saved = _after_step(run, stage, state, bar)
            if result.stop:
                _stop_on_signal(run, state, stop.signum, saved)
            if state.step >= t.max_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0


def _apply(run: Run, stage: Stage, state: TrainState, result: StepResult) -> None:
    """Step the optimizer and the schedule with a finite step; skip (and count) one with a
    non-finite loss or gradient; stop after `trainer.max_bad_steps` of those in a row, leaving
    the last good checkpoint as it is."""
    if result.finite:
        stage.optimizer.step()
        if not run.accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step taken
            stage.scheduler.step()
        state.bad_in_a_row = 0
        add_to_window(state, result)
    else:
        state.skipped_steps += 1
        state.bad_in_a_row += 1
        log.warning(f"step {state.global_step + 1} skipped: non-finite ({result.parts()})")
    stage.optimizer.zero_grad(set_to_none=True)
    if state.bad_in_a_row >= run.cfg.trainer.max_bad_steps:
        found = run.checkpointer.checkpoints()
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
        raise RunStopped(
            f"training stopped at step {state.global_step + 1}: {state.bad_in_a_row} steps in a "
            f"row had a non-finite loss or gradient ({result.parts()}); {last}; lower "
            f"trainer.lr or check the data, then resume with trainer.resume=true.",
            STOPPED_EXIT_CODE,
        )


def _stop_on_signal(run: Run, state: TrainState, signum: int | None, saved: Path | None) -> None:
    """Every process got the request in the same step: checkpoint (unless this step just did)
    and stop. A process that did not receive the signal itself reports SIGTERM."""
    path = saved or run.checkpointer.save(state)
    signum = signum or signal.SIGTERM
    raise interrupted(
        signum,
        f"{signal.Signals(signum).name} at step {state.global_step}; checkpoint {path}; resume "
        f"with the same command and trainer.resume=true (or trainer.resume=auto).",
    )


def _after_step(run: Run, stage: Stage, state: TrainState, bar) -> Path | None:
    """Log every `log_every` steps, measure the eval loss every `eval_every`, checkpoint every
    `save_every` and at the stage's end; returns the checkpoint written, if any."""
    t, accelerator = run.cfg.trainer, run.accelerator
    last = state.step == t.max_steps
    if state.step % t.log_every == 0 or last:
        logs = flush_window(state) | {"train/lr": stage.scheduler.get_last_lr()[0]}
        if state.skipped_steps:
            logs["train/skipped_steps"] = state.skipped_steps
        if "train/loss" in logs:
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
        accelerator.log(logs, step=state.global_step)
        run.history.append(state.global_step, logs)
    if t.eval_every and state.step % t.eval_every == 0:
        loss = eval_loss(stage.model, run.data.eval, run.cfg, accelerator)
        accelerator.log({"eval/loss": loss}, step=state.global_step)
        run.history.append(state.global_step, {"eval/loss": loss})
        stage.model.train()
    if (t.save_every and state.step % t.save_every == 0) or last:
        return run.checkpointer.save(state)
    return None


def _checkpoints_on_disk(cfg: TrainConfig, method: Method) -> int:
    """How many checkpoints can lie on disk at once (one more while the next is written)."""
    t = cfg.trainer
    per_stage = t.max_steps // t.save_every + 1 if t.save_every else 1
    written = per_stage * len(method.stages())
    return min(written, t.keep_checkpoints) + 1 if t.keep_checkpoints else written + 1


def save(run: Run) -> None:
    """The trained adapter, with the task registry and the base it belongs to."""
    metadata = {"tasks": run.data.registry.to_dict(), "base_model": run.cfg.model.name_or_path}
    save_final_adapter(run.accelerator, run.model, run.run_dir / "adapter", metadata)


def score_after(run: Run) -> dict[str, dict]:
    """Report columns: the base's scores (from scores_before.json) and the trained model's."""
    columns = report_columns("before", _read_json(run.before_file) or {})
    if run.cfg.eval.enabled:
        columns |= report_columns("after", _score(run, run.model, "after"))
    return columns


def report(run: Run, progress: Progress, columns: dict[str, dict]) -> dict:
    """Write metrics.json (and report.md when scored), show the report, end the trackers."""
    cfg, accelerator = run.cfg, run.accelerator
    accelerator.wait_for_everyone()  # the main process has written the history
    losses = run.history.values("train/loss")
    seconds = progress.seconds
    info = {
        "method": cfg.method.name,
        "model": cfg.model.name_or_path,
        "trainable_parameters": run.adapter_parameters,
        "steps": progress.state.global_step,
        "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(progress.tokens / max(seconds, 1e-9)),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(losses[-1], 4) if losses else None,
        "skipped_steps": progress.state.skipped_steps,
        **peak_memory(accelerator),
        "final_eval_loss": round(eval_loss(run.model, run.data.eval, cfg, accelerator), 4),
    }
    title = f"moelora run: {cfg.method.name} on {cfg.data.name}"
    figures = _draw_figures(run, title) if accelerator.is_main_process else {}
    if cfg.eval.enabled:
        tasks, main = run.data.registry.tasks, accelerator.is_main_process
        batch = cfg.eval.batch_size
        figures |= write_routing(run.model, run.data.eval, batch, tasks, run.run_dir, title, main)
    if accelerator.is_main_process and cfg.eval.enabled:
        write_report(run.run_dir, title, columns, info, figures)
        log.info((run.run_dir / "report.md").read_text())
    elif accelerator.is_main_process:
        atomic.write_json(run.run_dir / FINISHED_FILE, {"info": info})
    log.info(f"run directory: {run.run_dir}")
    accelerator.wait_for_everyone()  # then end_training destroys the process group cleanly
    accelerator.end_training()
    return {"info": info, **columns}


def _draw_figures(run: Run, title: str) -> dict[str, str]:
    """The run's pictures beside its logs (caption -> file name): the training curves."""
    from moelora.analysis.plots import plot_curves

    figures = {}
    if plot_curves(run.history.read(), run.run_dir / CURVES_FILE, title):
        figures["training curves"] = CURVES_FILE
    return figures


def peak_memory(accelerator: Accelerator) -> dict[str, float]:
    """Peak memory of rank 0 during training, in GiB: the GPU's allocator and the host RSS."""
    peaks = {"peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if accelerator.device.type == "cuda":
        peaks["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return {key: round(value, 2) for key, value in peaks.items()}


def _init_adapter(model: AdaptedModel, run_dir: str) -> None:
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


def epoch_batches(accelerator: Accelerator, loader, state: TrainState):
    """The current epoch's batches not used yet. The epoch goes through the prepared loader:
    it re-sets its sampler's epoch from its own counter whenever it is iterated."""
    loader.set_epoch(state.epoch)
    return accelerator.skip_first_batches(loader, state.batches_in_epoch)


def _describe_data(
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


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None
