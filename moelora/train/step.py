"""One optimizer step's forward and backward, and what it tells the loop: the losses, the tokens
seen, whether everything was finite, and whether any process was asked to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from moelora.data.batching import answer_tokens, real_tokens
from moelora.train.checkpoint import TrainState


@dataclass
class StepResult:
    """Every process's view of the step is the same (the numbers are reduced over processes)."""

    loss: float  # the LM loss over the answer tokens of the whole step
    aux: dict[str, float]  # each aux loss, averaged over micro-batches and processes
    tokens: int
    grad_norm: float | None  # None where DeepSpeed clips inside its engine
    stop: bool  # some process received a stop signal

    @property
    def finite(self) -> bool:
        values = [self.loss, *self.aux.values()]
        if self.grad_norm is not None:
            values.append(self.grad_norm)
        return all(math.isfinite(v) for v in values)

    def parts(self) -> str:
        """The loss parts for a message: `lm_loss=nan, grad_norm=inf, load_balance=0.0123`."""
        parts = {"lm_loss": self.loss, "grad_norm": self.grad_norm, **self.aux}
        return ", ".join(f"{k}={v:.4g}" for k, v in parts.items() if v is not None)


def forward_backward(
    model, micro: list[dict], accelerator: Accelerator, max_grad_norm: float, stop: bool
) -> StepResult:
    """Forward/backward over one step's micro-batches, leaving the gradients ready to apply.

    The LM loss is normalised by the answer tokens of the whole step on all processes, so any
    split into micro-batches, accumulation steps and processes gives the same gradient as one
    big batch (a mean of per-micro-batch means would not). Aux losses are averaged over the
    micro-batches and processes. `accelerator.accumulate` syncs gradients (DDP) or steps the engine
    (DeepSpeed) on the last micro-batch only; both divide the loss by the accumulation steps,
    which the scale here undoes, and both average over processes, which `world` undoes.
    The gradient norm is measured (and clipped when `max_grad_norm` > 0) for the finite check;
    this process's `stop` request travels in the same reduction as the logged numbers.
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
    # An infinite bound measures without clipping (the gradients are multiplied by exactly 1).
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = None if norm is None else float(norm)
    seen = sum(real_tokens(b) for b in micro)
    return _reduced(accelerator, lm_sum, total, aux_sums, seen, grad_norm, stop)


def _reduced(
    accelerator: Accelerator,
    lm_sum: float,
    total: int,
    aux_sums: dict[str, float],
    seen: int,
    grad_norm: float | None,
    stop: bool,
) -> StepResult:
    """What is logged covers every process's rows, as one big batch would: the sums of all
    processes in one reduction (the stop request too)."""
    names = sorted(aux_sums)
    stats = torch.tensor(
        [lm_sum, seen, float(stop), *(aux_sums[n] for n in names)],
        dtype=torch.float64,
        device=accelerator.device,
    )
    summed = accelerator.reduce(stats, reduction="sum").tolist()
    world = accelerator.num_processes
    aux = {name: value / world for name, value in zip(names, summed[3:], strict=True)}
    return StepResult(summed[0] / max(total, 1), aux, int(summed[1]), grad_norm, summed[2] > 0)


def add_to_window(state: TrainState, result: StepResult) -> None:
    """Keep a good step's losses for the next log line (in the state, so resume keeps them)."""
    state.window_loss.append(result.loss)
    for name, value in result.aux.items():
        state.window_aux.setdefault(name, []).append(value)


def flush_window(state: TrainState) -> dict[str, float]:
    """The averages since the last log line (nothing when every step since was skipped)."""
    logs = {}
    if state.window_loss:
        logs["train/loss"] = sum(state.window_loss) / len(state.window_loss)
    logs |= {f"train/{name}": sum(v) / len(v) for name, v in state.window_aux.items() if v}
    state.window_loss, state.window_aux = [], {}
    return logs
