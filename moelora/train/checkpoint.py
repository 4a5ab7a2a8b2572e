"""Checkpoints that hold only what training changes: the adapter, optimizer, scheduler, RNG and
the position in the data stream (with the losses not yet logged). Written to a temporary folder
and renamed, so a crash or a failed write mid-save never leaves a half checkpoint that resume
would pick up, and the previous checkpoint stays the newest complete one."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from moelora.adapters import load_adapter_weights, save_adapter
from moelora.errors import UserError
from moelora.hardware import deepspeed_of, gathered
from moelora.log import get_logger

log = get_logger(__name__)

STATE_FILE = "trainer_state.json"


def save_whole_adapter(
    accelerator: Accelerator, model, directory: Path, metadata: dict | None = None
) -> None:
    """Write the adapter (weights + config) from the main process; every process must call it,
    since under ZeRO-3 the adapter's tensors are gathered from all of them first."""
    unwrapped = accelerator.unwrap_model(model)
    with gathered(accelerator, [p for _, p in unwrapped.named_adapter_parameters()]):
        if accelerator.is_main_process:
            save_adapter(unwrapped, directory, metadata)


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


def complete_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root` that were written to the end, oldest first."""
    if not root.is_dir():
        return []
    found = (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return sorted(p for p in found if (p / STATE_FILE).is_file())


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
        (disk full, permission) removes the temporary folder and stops in one sentence."""
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
        except (OSError, RuntimeError) as err:  # torch's writer raises RuntimeError on a full disk
            failure = str(err).splitlines()[0] if str(err) else type(err).__name__
        # Every process writes its own RNG file into `tmp`: all must finish before the rename.
        if self._any(failure is not None):
            self._give_up(tmp, final, failure)
        if main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _any(self, flag: bool) -> bool:
        """Whether `flag` holds on any process (a barrier too)."""
        local = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(local, reduction="sum").item() > 0)

    def _give_up(self, tmp: Path, final: Path, failure: str | None) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        previous = self.checkpoints()
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(
            f"writing checkpoint {final} failed ({failure or 'on another process'}); {kept}; "
            f"free space under {self.root} or fix its permissions, then resume with "
            f"trainer.resume=true."
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
        return TrainState(**json.loads((found[-1] / STATE_FILE).read_text()))

    def load_latest(self) -> TrainState:
        """Restore the newest checkpoint. Under DeepSpeed the engine restores the adapter with
        its optimizer partitions (the frozen base was left out, hence non-strict)."""
        latest = self.checkpoints()[-1]
        if self._deepspeed:
            self.accelerator.load_state(str(latest), load_module_strict=False)
        else:
            self.accelerator.load_state(str(latest))
            load_adapter_weights(self.accelerator.unwrap_model(self.model), latest)
        return TrainState(**json.loads((latest / STATE_FILE).read_text()))
