"""The step loop of one stage: `trainer.max_steps` optimizer steps of `grad_accum` micro-batches,
each logged, measured and checkpointed on its schedule; a non-finite step is skipped, a stop
signal ends the stage after the current step with a checkpoint (`moelora.signals`)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from moelora.errors import STOPPED_EXIT_CODE, RunStopped
from moelora.evaluate.scoring import eval_loss
from moelora.log import get_logger
from moelora.signals import StopRequest, interrupted
from moelora.train.checkpoint import TrainState
from moelora.train.setup import Run
from moelora.train.stages import Stage
from moelora.train.step import StepResult, add_to_window, flush_window, forward_backward

log = get_logger(__name__)


@dataclass
class Progress:
    """What training has done so far, across stages."""

    state: TrainState = field(default_factory=TrainState)
    tokens: int = 0
    seconds: float = 0.0


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


def epoch_batches(accelerator: Accelerator, loader, state: TrainState):
    """The current epoch's batches not used yet. The epoch goes through the prepared loader:
    it re-sets its sampler's epoch from its own counter whenever it is iterated."""
    loader.set_epoch(state.epoch)
    return accelerator.skip_first_batches(loader, state.batches_in_epoch)
