"""Checkpoints that hold only what training changes: the adapter, optimizer, scheduler, RNG and
the position in the data stream (with the losses not yet logged). Written to a temporary folder
and renamed, so a crash or a failed write mid-save never leaves a half checkpoint that resume
would pick up, and the previous checkpoint stays the newest complete one. Every process agrees
on a failed write, so all of them stop with the same line."""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from moelora.adapters import load_adapter_weights, save_adapter
from moelora.atomic import WriteFailed, atomic, error_words, io_errors
from moelora.errors import STOPPED_EXIT_CODE, DamagedFile, RunStopped, UserError
from moelora.hardware import deepspeed_of, gathered
from moelora.log import get_logger
from moelora.resume import STATE_FILE, complete_checkpoints

log = get_logger(__name__)


def save_whole_adapter(
    accelerator: Accelerator, model, directory: Path, metadata: dict | None = None
) -> None:
    """Write the adapter (weights + config) from the main process; every process must call it,
    since under ZeRO-3 the adapter's tensors are gathered from all of them first."""
    unwrapped = accelerator.unwrap_model(model)
    with gathered(accelerator, [p for _, p in unwrapped.named_adapter_parameters()]):
        if accelerator.is_main_process:
            save_adapter(unwrapped, directory, metadata)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (a barrier too)."""
    local = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(local, reduction="sum").item() > 0)


def save_final_adapter(accelerator: Accelerator, model, directory: Path, metadata: dict) -> None:
    """The run's adapter, written whole or not at all (the main process writes a temporary
    folder and renames it); a failed write stops every process with the same line."""
    failure: WriteFailed | None = None
    main = accelerator.is_main_process
    try:
        with atomic(directory) if main else contextlib.nullcontext(directory) as target:
            save_whole_adapter(accelerator, model, target, metadata)
    except WriteFailed as err:
        failure = err
    if any_process(accelerator, failure is not None):
        raise failure or WriteFailed(directory, OSError("the write failed on another process"))


@dataclass
class TrainState:
    """Where training stands; `batches_in_epoch` lets resume skip what the epoch already used,
    and the window holds the losses since the last log line, so a resumed run logs the same."""

    stage: int = 0
    step: int = 0  # optimizer steps within the stage
    epoch: int = 0
    batches_in_epoch: int = 0
    global_step: int = 0
    window_loss: list[float] = field(default_factory=list)
    window_aux: dict[str, list[float]] = field(default_factory=dict)
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, in all
    bad_in_a_row: int = 0


def check_free_space(root: Path, adapter_parameters: int, saves: int) -> None:
    """Warn when the disk under `root` looks too small for `saves` checkpoints (the adapter and
    its two Adam moments) and the final adapter, before training starts."""
    needed = 4 * adapter_parameters * (3 * saves + 1)
    probe = root if root.exists() else root.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        log.warning(
            f"{probe} has {free / 2**30:.2f} GiB free, and the checkpoints and adapter need "
            f"about {needed / 2**30:.2f} GiB; free space or lower trainer.keep_checkpoints."
        )


class Checkpointer:
    """Saves and restores through `accelerator.save_state`/`load_state`, with hooks that swap the
    full model weights (never written) for the adapter's own tensors. Every process must call
    `save` (under ZeRO-3 the adapter is gathered from all of them)."""

    def __init__(self, accelerator: Accelerator, model, root: Path, keep: int) -> None:
        self.accelerator, self.model, self.root, self.keep = accelerator, model, root, keep
        self._deepspeed = deepspeed_of(accelerator) is not None
        accelerator.register_save_state_pre_hook(self._skip_model_weights)
        accelerator.register_load_state_pre_hook(self._skip_model_load)

    @staticmethod
    def _skip_model_weights(models: list, weights: list, output_dir: str) -> None:
        weights.clear()

    @staticmethod
    def _skip_model_load(models: list, input_dir: str) -> None:
        models.clear()

    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.root)

    def save(self, state: TrainState) -> Path:
        """Write `tmp-<step>`, then rename it `step-<step>`. A write that fails on any process
        (disk full, permission) removes the temporary folder and stops in one sentence (exit
        code 3); `tmp-*` folders of a killed process are swept at the next start."""
        final = self.root / f"step-{state.global_step:08d}"
        tmp = self.root / f"tmp-{state.global_step:08d}"
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        failure = None
        try:
            # DeepSpeed writes its own engine checkpoint: keep the frozen base out of it.
            deepspeed = {"exclude_frozen_parameters": True} if self._deepspeed else {}
            self.accelerator.save_state(str(tmp), **deepspeed)
            save_whole_adapter(self.accelerator, self.model, tmp)
            if main:
                (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        except (*io_errors(), RuntimeError) as err:  # torch's writer: RuntimeError
            failure = error_words(err, self.root)
        # Every process writes its own RNG file into `tmp`: all must finish before the rename.
        if any_process(self.accelerator, failure is not None):
            self._give_up(tmp, final, failure)
        if main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _give_up(self, tmp: Path, final: Path, failure: str | None) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        previous = self.checkpoints()
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise RunStopped(
            f"writing {final} failed ({failure or 'on another process'}); {kept}; "
            f"free space under {self.root} or fix its permissions, then run the same command "
            f"with trainer.resume=auto.",
            STOPPED_EXIT_CODE,
        )

    def latest_state(self) -> TrainState | None:
        """The newest checkpoint's position, read without loading anything heavy. Stops when
        its ZeRO partitions were written by another number of processes than this run has."""
        found = self.checkpoints()
        if not found:
            return None
        if self._deepspeed:
            saved_by = len(list(found[-1].rglob("*zero_pp_rank_*optim_states.pt")))
            if saved_by != self.accelerator.num_processes:
                raise UserError(
                    f"{found[-1]} holds ZeRO partitions from {saved_by} processes, this run has "
                    f"{self.accelerator.num_processes}; resume with "
                    f"hardware.num_processes={saved_by}."
                )
        try:
            return _read_state(found[-1])
        except (OSError, ValueError, TypeError) as err:  # cut short, not JSON, other fields
            raise self._damaged(found, err) from None

    def load_latest(self) -> TrainState:
        """Restore the newest checkpoint. Under DeepSpeed the engine restores the adapter with
        its optimizer partitions (the frozen base was left out, hence non-strict). A damaged
        file stops in one line that says how to fall back to the checkpoint before it."""
        found = self.checkpoints()
        latest = found[-1]
        try:
            if self._deepspeed:
                self.accelerator.load_state(str(latest), load_module_strict=False)
            else:
                self.accelerator.load_state(str(latest))
                load_adapter_weights(self.accelerator.unwrap_model(self.model), latest)
            return _read_state(latest)
        except (*io_errors(), RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as err:
            raise self._damaged(found, err) from None

    def _damaged(self, found: list[Path], err: BaseException) -> UserError:
        """The newest checkpoint cannot be read: say which file and how to use the one before."""
        words = (
            f"{err.path.name}: {err.words}" if isinstance(err, DamagedFile) else error_words(err)
        )
        earlier = f"to resume from {found[-2]}" if len(found) > 1 else "to start over"
        return UserError(
            f"checkpoint {found[-1]} is damaged ({words}); move it out of {self.root} "
            f"{earlier}, or restore it from a backup."
        )


def _read_state(checkpoint: Path) -> TrainState:
    return TrainState(**json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")))
