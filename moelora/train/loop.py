"""The training recipe, readable top to bottom: validate -> data -> model + adapters -> score the
base -> (start from an earlier run's adapter) -> train each stage (with checkpoints) -> save the
adapter -> score -> report.

Launch: `moelora train +experiment=demo` on one device, or through a distributed launcher:
`accelerate launch -m moelora train +experiment=cmedical hardware=...`.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler

from moelora.adapters import AdaptedModel, load_adapter_weights, method_of
from moelora.config import TrainConfig, to_container
from moelora.data.formatting import answer_tokens, loss_loader
from moelora.data.mixture import MixtureSampler, balanced_over_domains
from moelora.data.pipeline import PreparedData, check_files, prepare_data
from moelora.data.tasks import check_added_domains
from moelora.errors import UserError
from moelora.evaluate.report import write_report
from moelora.evaluate.run import (
    eval_loss,
    inference_stage,
    report_columns,
    say_empty_targets,
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
from moelora.modeling import COMPUTE_DTYPES, load_base_model, load_tokenizer
from moelora.rundir import check_resume_config, guard_run_dir, read_init_run
from moelora.train.checkpoint import Checkpointer, TrainState, save_whole_adapter


def load_train_config(raw: DictConfig) -> TrainConfig:
    """The typed config; a method preset that contradicts itself stops here, before any work."""
    try:
        cfg = OmegaConf.to_object(raw)
    except ValueError as err:
        raise UserError(str(err)) from None
    if cfg.trainer.resume and not (Path(cfg.run_dir) / "checkpoints").is_dir():
        raise UserError(
            f"trainer.resume=true, but {cfg.run_dir} has no checkpoints/; pass run_dir=<a run>."
        )
    method = method_of(cfg.method)
    added = method.added_domains()
    if added and not cfg.trainer.init_adapter_from:
        raise UserError(
            f"method.add_domains={added} adds domains to an earlier run; "
            f"pass trainer.init_adapter_from=<that run's directory>."
        )
    inference_stage(cfg.method.name, cfg.eval.force_domain)  # refuses a misplaced override
    stages = method.stages()
    if cfg.hardware.strategy == "deepspeed" and len(stages) > 1:
        raise UserError(
            f"under DeepSpeed a run trains one stage (the engine owns the optimizer and the "
            f"weights), not method.stages={stages}; run MoDULA's stages as "
            f"separate runs, method.stages=[universal], then [domain], then [router], each with "
            f"trainer.init_adapter_from=<the previous run>, or use hardware=ddp."
        )
    return cfg  # type: ignore[return-value]


def stages_of(cfg: TrainConfig) -> list[str | None]:
    """The method's training stages in order (MoDULA's three), or one unnamed stage."""
    return method_of(cfg.method).stages()


def train(raw_cfg: DictConfig) -> dict:
    """Run the whole recipe; returns what metrics.json holds (a sweep's objective can use it)."""
    cfg = load_train_config(raw_cfg)
    if needs_launch(cfg.hardware):
        launch_this_command(cfg.hardware, "train", f"run_dir={cfg.run_dir}")
        return _read_json(Path(cfg.run_dir) / "metrics.json") or {}
    guard_run_dir(cfg.run_dir, cfg.trainer.resume)
    if cfg.trainer.resume:
        check_resume_config(cfg.run_dir, to_container(raw_cfg))
    check_files(cfg.data)
    init_from = cfg.trainer.init_adapter_from
    earlier = read_init_run(init_from, cfg.method) if init_from else None
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(cfg.hardware, run_dir, cfg.trainer.log_with, cfg.trainer)
    accelerator.wait_for_everyone()  # every rank has read config.yaml before rank 0 rewrites it
    set_seed(cfg.trainer.seed)
    say = accelerator.print

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
    _describe_data(say, data, sampler, cfg, accelerator.num_processes)
    if cfg.eval.enabled:
        say_empty_targets(data.eval, say)

    tiny = cfg.model.name_or_path == "tiny"  # built and warmed up here, not loaded
    with built_whole(accelerator) if tiny else contextlib.nullcontext():
        base = load_base_model(
            cfg.model,
            tokenizer,
            cfg.cache_dir,
            accelerator.device.type == "cpu",
            cfg.hardware.quantization,
            accelerator.device,
            COMPUTE_DTYPES[accelerator.mixed_precision],
        )
    if hasattr(next(base.parameters()), "ds_id"):
        say("base model loaded straight into ZeRO-3 partitions (deepspeed.zero.Init)")
    try:
        model = AdaptedModel(base, cfg.method, len(data.registry.tasks), len(data.registry.domains))
    except ValueError as err:  # e.g. no module matches method.target_modules
        raise UserError(str(err)) from None
    adapter_parameters = model.num_trainable_parameters()
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if not cfg.hardware.quantization:  # a 4-bit base is placed while loading
        model.to(accelerator.device)
    if (live_deepspeed := deepspeed_of(accelerator)) is not None:
        fill_model_sizes(live_deepspeed, base.config.hidden_size)
    say(f"method {cfg.method.name}: {adapter_parameters:,} adapter parameters")

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_container(raw_cfg)))
        data.registry.save(run_dir / "tasks.json")
    save_deepspeed_config(accelerator, run_dir)
    accelerator.init_trackers("train", config=_flat_hparams(raw_cfg))
    accelerator.log({f"data/mix/{t}": n / len(sampler) for t, n in sampler.counts.items()}, step=0)

    checkpointer = Checkpointer(
        accelerator, model, run_dir / "checkpoints", cfg.trainer.keep_checkpoints
    )
    resume_from = checkpointer.latest_state() if cfg.trainer.resume else None
    before_file = run_dir / "scores_before.json"

    def score(scored: torch.nn.Module, label: str) -> dict[str, dict]:
        """Scores on the dev set by reading, predictions_<label>.jsonl in the run dir."""
        limit = cfg.data.max_target_length
        return score_model(
            scored, tokenizer, data.eval, cfg.eval, limit, accelerator, label, run_dir
        )

    def score_before(prepared: torch.nn.Module) -> None:
        """Every method starts with B = 0, so the untrained adapted model is exactly its base."""
        if not (cfg.eval.enabled and cfg.eval.before) or before_file.exists():
            return
        before = score(prepared, "before")
        if accelerator.is_main_process:
            before_file.write_text(json.dumps(before, ensure_ascii=False, indent=2))

    # Under ZeRO-3 a loaded base is partitioned and runs only once the engine has hooked it,
    # by when an init_adapter_from adapter is in place: then the base is not scored here.
    on_prepared = score_before if is_zero3(accelerator) else None
    if on_prepared is None:
        score_before(model)
    elif init_from and cfg.eval.enabled and cfg.eval.before:
        say("ZeRO-3 with init_adapter_from: no 'before' column; score the base with moelora eval")
        on_prepared = None
    if init_from:  # after the "before" row, which stays the base model's
        _init_adapter(say, model, init_from)
    added = [data.registry.domains.index(d) for d in method.added_domains()]

    state = TrainState()
    started = time.perf_counter()
    tokens, losses = 0, []
    for index, stage in enumerate(stages_of(cfg)):
        if resume_from is not None and index < resume_from.stage:
            continue
        model.set_stage(stage, domains=added or None)  # the domain stage: only added experts
        resume_here = resume_from is not None and index == resume_from.stage
        state, stage_tokens, stage_losses = _train_stage(
            cfg,
            accelerator,
            model,
            data,
            _stage_sampler(say, cfg, data, sampler, stage),
            checkpointer,
            index,
            state,
            stage,
            resume_here,
            on_prepared,
        )
        on_prepared = None  # the first stage run scores the base, once
        tokens += stage_tokens
        losses += stage_losses
    seconds = time.perf_counter() - started
    model.set_stage(inference_stage(cfg.method.name, cfg.eval.force_domain))

    save_whole_adapter(
        accelerator,
        model,
        run_dir / "adapter",
        {"tasks": data.registry.to_dict(), "base_model": cfg.model.name_or_path},
    )
    info = {
        "method": cfg.method.name,
        "model": cfg.model.name_or_path,
        "trainable_parameters": adapter_parameters,
        "steps": state.global_step,
        "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(tokens / max(seconds, 1e-9)),
        "train_loss_first": round(losses[0], 4) if losses else None,
        "train_loss_last": round(losses[-1], 4) if losses else None,
        **peak_memory(accelerator),
        "final_eval_loss": round(eval_loss(model, data.eval, cfg, accelerator), 4),
    }
    columns = report_columns("before", _read_json(before_file) or {})
    if cfg.eval.enabled:
        columns |= report_columns("after", score(model, "after"))
    if accelerator.is_main_process and cfg.eval.enabled:
        write_report(run_dir, f"moelora run: {cfg.method.name} on {cfg.data.name}", columns, info)
        say((run_dir / "report.md").read_text())
    elif accelerator.is_main_process:
        (run_dir / "metrics.json").write_text(json.dumps({"info": info}, indent=2))
    say(f"run directory: {run_dir}")
    accelerator.wait_for_everyone()  # then end_training destroys the process group cleanly
    accelerator.end_training()
    return {"info": info, **columns}


def peak_memory(accelerator: Accelerator) -> dict[str, float]:
    """Peak memory of rank 0 during training, in GiB: the GPU's allocator and the host RSS."""
    peaks = {"peak_host_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if accelerator.device.type == "cuda":
        peaks["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
    return {key: round(value, 2) for key, value in peaks.items()}


def _init_adapter(say, model: AdaptedModel, run_dir: str) -> None:
    """Start from an earlier run's adapter; what does not fit (added domain experts, a resized
    router or task embedding) keeps its init. Says what was loaded and what was not."""
    loaded, kept = load_adapter_weights(model, Path(run_dir) / "adapter", strict=False)
    local = {
        f"base_model.{path}.{name}": name
        for path, layer in model.adapted_layers.items()
        for name, _ in layer.named_parameters()
    }
    tally = Counter(local.get(name, name) for name in kept)
    say(
        f"initialised from {run_dir}: {len(loaded)} adapter tensors loaded, {len(kept)} new or "
        f"resized ones keep their init" + "".join(f"\n  {n} x{c}" for n, c in tally.items())
    )


def _stage_sampler(
    say, cfg: TrainConfig, data: PreparedData, sampler: MixtureSampler, stage: str | None
) -> MixtureSampler:
    """The rows a stage draws: the mixture; for MoDULA's `domain` stage with add_domains, the
    mixture over the added domains' rows only; for `router`, every domain equally often."""
    task_of_row, seed = data.train["task_dataset"], cfg.trainer.seed
    added = method_of(cfg.method).added_domains()
    if stage == "domain" and added:
        tasks = data.registry.tasks_in(added)
        sampler = MixtureSampler(task_of_row, cfg.data.mixture, seed, only_tasks=tasks)
        say(f"domain stage: only the added domains' rows, per task {sampler.counts}")
    elif stage == "router":
        present = {task: data.registry.domain_of[task] for task in sampler.rows_of}
        mix = balanced_over_domains(present, cfg.data.mixture)
        sampler = MixtureSampler(task_of_row, mix, seed)
        say(f"router stage: rows per domain balanced, per task {sampler.counts}")
    return sampler


def _train_stage(
    cfg: TrainConfig,
    accelerator: Accelerator,
    model: AdaptedModel,
    data: PreparedData,
    sampler: MixtureSampler,
    checkpointer: Checkpointer,
    stage_index: int,
    state: TrainState,
    stage: str | None,
    resume: bool,
    on_prepared: Callable[[torch.nn.Module], None] | None = None,
) -> tuple[TrainState, int, list[float]]:
    """One stage: a fresh optimizer over what the stage trains, `trainer.max_steps` steps.
    `on_prepared` runs once the model is prepared (wrapped or partitioned), before any step.
    Returns the state, the tokens seen and the logged (windowed) training losses."""
    t = cfg.trainer
    accelerator.free_memory()
    loader = loss_loader(
        data.train,
        t.batch_size,
        model.base_model.config.pad_token_id or 0,
        sampler=sampler,
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
    prepared, optimizer, loader, scheduler = accelerator.prepare(
        model, optimizer, loader, scheduler
    )
    if on_prepared is not None:
        on_prepared(prepared)
    if resume:
        state = checkpointer.load_latest()
        accelerator.print(f"resumed at step {state.global_step} (stage {stage or 'main'})")
    else:
        state = TrainState(stage=stage_index, global_step=state.global_step)

    label = f"training {stage or ''}".strip()
    bar = tqdm(
        total=t.max_steps,
        initial=state.step,
        desc=label,
        disable=not accelerator.is_local_main_process,
    )
    tokens, window, window_aux, logged, micro = 0, [], {}, [], []
    prepared.train()
    while state.step < t.max_steps:
        for batch in epoch_batches(accelerator, loader, state):
            state.batches_in_epoch += 1
            micro.append(batch)
            if len(micro) < t.grad_accum:
                continue
            loss, aux, step_tokens = _optimizer_step(prepared, micro, accelerator, t.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step taken
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro = []
            tokens += step_tokens
            window.append(loss)
            for name, value in aux.items():
                window_aux.setdefault(name, []).append(value)
            state.step += 1
            state.global_step += 1
            bar.update(1)
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                logs = {"train/loss": sum(window) / len(window)}
                logs["train/lr"] = scheduler.get_last_lr()[0]
                logs |= {f"train/{k}": sum(v) / len(v) for k, v in window_aux.items()}
                bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
                logged.append(logs["train/loss"])
                accelerator.log(logs, step=state.global_step)
                window, window_aux = [], {}
            if t.eval_every and state.step % t.eval_every == 0:
                loss = eval_loss(prepared, data.eval, cfg, accelerator)
                accelerator.log({"eval/loss": loss}, step=state.global_step)
                prepared.train()
            if (t.save_every and state.step % t.save_every == 0) or state.step == t.max_steps:
                checkpointer.save(state)
            if state.step >= t.max_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    bar.close()
    return state, tokens, logged


def epoch_batches(accelerator: Accelerator, loader, state: TrainState):
    """The current epoch's batches not used yet. The epoch goes through the prepared loader:
    it re-sets its sampler's epoch from its own counter whenever it is iterated."""
    loader.set_epoch(state.epoch)
    return accelerator.skip_first_batches(loader, state.batches_in_epoch)


def _optimizer_step(
    model, micro: list[dict], accelerator: Accelerator, max_grad_norm: float
) -> tuple[float, dict[str, float], int]:
    """Forward/backward over one step's micro-batches, leaving the gradients ready to apply.

    The LM loss is normalised by the answer tokens of the whole step on all processes, so any
    split into micro-batches, accumulation steps and processes gives the same gradient as one
    big batch (a mean of per-micro-batch means would not). Aux losses are averaged over the
    micro-batches and processes. `accelerator.accumulate` syncs gradients (DDP) or steps the engine
    (DeepSpeed) on the last micro-batch only; both divide the loss by the accumulation steps,
    which the scale here undoes, and both average over processes, which `world` undoes.
    Returns the step's LM loss, its aux losses and the tokens it saw.
    """
    counts = [answer_tokens(b) for b in micro]
    local = torch.tensor(sum(counts), device=accelerator.device)
    total = int(accelerator.reduce(local, reduction="sum"))
    world, steps = accelerator.num_processes, len(micro)
    lm_sum, aux_sums = 0.0, {}
    for batch, count in zip(micro, counts, strict=True):
        with accelerator.accumulate(model):
            out = model(**batch)
            loss = out.lm_loss * (count * world * steps / max(total, 1))
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            accelerator.backward(loss)
        lm_sum += float(out.lm_loss.detach()) * count
        for name, value in out.aux_losses.items():
            aux_sums[name] = aux_sums.get(name, 0.0) + float(value) / steps
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    # What is logged covers every process's rows, as one big batch would.
    names = sorted(aux_sums)
    seen = sum(int(b["attention_mask"].sum()) for b in micro)
    stats = torch.tensor(
        [lm_sum, seen, *(aux_sums[n] for n in names)], dtype=torch.float64, device=local.device
    )
    summed = accelerator.reduce(stats, reduction="sum").tolist()
    aux = {name: value / world for name, value in zip(names, summed[2:], strict=True)}
    return summed[0] / max(total, 1), aux, int(summed[1])


def _describe_data(say, data: PreparedData, sampler: MixtureSampler, cfg: TrainConfig, world: int):
    """Print the realised mixture, the length policy's effect and the effective batch size."""
    say(f"tasks: {len(data.registry.tasks)}, domains: {data.registry.domains}")
    say(f"mixture ({cfg.data.mixture.strategy}), rows per epoch: {len(sampler)}")
    for task, count in sorted(sampler.counts.items()):
        say(f"  {task:<18}{count:>7}  ({count / len(sampler):.1%})")
    for split, report in data.reports.items():
        say(f"{split} set lengths (tokens):")
        for line in report.lines():
            say("  " + line)
    t = cfg.trainer
    say(
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
