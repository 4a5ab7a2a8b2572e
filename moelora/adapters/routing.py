"""The routing context: how a batch's task/domain ids and padding mask reach every adapted layer.

A batch comes in one of two layouts. A batch of rows holds one row per sequence (right-padded)
and one task/domain id per row. A packed batch concatenates several rows into each sequence;
`segments` then says, per token, which row (an index into task_ids/domain_ids) it belongs to,
-1 on padding, and every row-level quantity (a task gate's weights, a prompt's mean) is taken
per row and read back by each token of that row (`rows_to_tokens`).

`AdaptedModel` owns one `Routing`; each adapted layer keeps a reference to it. The wrapper binds a
`RoutingState` for the duration of one forward or `generate()` call. Activation checkpointing
re-runs a layer inside backward, after that call has returned, so the checkpoint function is
wrapped to re-bind the state that was live when the layer first ran (`wrap_checkpoint`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from moelora.adapters.precision import autocast_off


def expand_rows(values: Tensor, batch: int, what: str) -> Tensor:
    """Repeat per-row values to `batch` rows the way `generate()` expands beams (interleaved)."""
    rows = values.shape[0]
    if rows == batch:
        return values
    if rows == 0 or batch % rows:
        raise ValueError(f"{what} has {rows} rows but the adapted layer sees a batch of {batch}.")
    return values.repeat_interleave(batch // rows, dim=0)


@dataclass
class RoutingState:
    """What one forward needs to route, plus the auxiliary losses its layers record."""

    task_ids: Tensor | None = None
    domain_ids: Tensor | None = None
    token_mask: Tensor | None = None  # bool (batch, seq): True on real tokens
    task_weights: Tensor | None = None  # (batch, E) from the shared task gate
    collect_aux: bool = False
    aux: dict[str, list[Tensor]] = field(default_factory=dict)
    batched: dict[str, tuple[Callable, list[tuple[Tensor, ...]]]] = field(default_factory=dict)
    sampled_tokens: Tensor | None = None  # drawn once per forward, see `sample_tokens`
    prompt_mask: Tensor | None = None  # bool (batch, seq): True on real prompt tokens
    row_gates: dict[int, Tensor] = field(default_factory=dict)  # a row router's weights by gate
    segments: Tensor | None = None  # packed batch: (packs, seq) each token's row, -1 on padding

    def ids(self, key: str, batch: int) -> Tensor:
        """One id per row: the batch's rows (expanded to `batch` for beams), or a packed
        batch's rows."""
        values = getattr(self, key)
        if values is None:
            raise ValueError(
                f"this method routes by {key}: pass {key} (a LongTensor with one id per row) to "
                "AdaptedModel.forward and generate."
            )
        return values if self.segments is not None else expand_rows(values, batch, key)

    def rows_to_tokens(self, values: Tensor, x: Tensor) -> Tensor:
        """Per-row values (rows, ...) for each of x's tokens: (batch, seq, ...) read through
        `segments` in a packed batch (padding reads row 0: it is masked everywhere it counts),
        else repeated over each row's tokens."""
        if self.segments is not None:
            return values[self.segments.clamp(min=0)]
        values = expand_rows(values, x.shape[0], "the per-row values")
        return values[:, None].expand(x.shape[0], x.shape[1], *values.shape[1:])

    def mask_for(self, x: Tensor) -> Tensor | None:
        """The padding mask if it lines up with x's token positions (not in cached decoding)."""
        mask = self.token_mask
        return mask if mask is not None and mask.shape == x.shape[:-1] else None

    def prompt_mean(self, x: Tensor) -> Tensor | None:
        """The mean of x (batch, seq, d) over each row's prompt tokens, (rows, d), in fp32 (a
        router's input), or None when x is not the whole prompt (a cached decoding step)."""
        mask = self.prompt_mask
        if mask is None or mask.shape[1] != x.shape[1]:
            return None
        if self.segments is not None:  # sum each row's prompt tokens wherever they lie
            rows, tokens = self.segments[mask], x[mask].float()
            count = int(self.segments.max()) + 1
            total = tokens.new_zeros(count, x.shape[-1]).index_add_(0, rows, tokens)
            size = torch.bincount(rows, minlength=count).clamp(min=1).float()
            return total / size[:, None]
        mask = expand_rows(mask, x.shape[0], "the prompt mask")  # beams
        weight = mask.unsqueeze(-1).to(x.dtype)  # x * 0 or 1 is exact; the sum runs in fp32
        return (x * weight).sum(1, dtype=torch.float32) / weight.sum(1).float().clamp(min=1)

    def record(self, name: str, loss: Tensor) -> None:
        if self.collect_aux:
            self.aux.setdefault(name, []).append(loss)

    def record_batched(self, name: str, losses: Callable, *inputs: Tensor) -> None:
        """Record one layer's inputs to an aux loss that is computed for all layers at once
        (`losses` takes each input stacked over layers and returns one loss per layer): one
        batched computation instead of a few dozen small ops per layer."""
        if self.collect_aux:
            self.batched.setdefault(name, (losses, []))[1].append(inputs)

    def aux_losses(self) -> dict[str, Tensor]:
        """Each recorded aux loss, averaged over the layers that recorded it; the batched ones
        computed in fp32 whatever the autocast."""
        found = {name: torch.stack(values).float().mean() for name, values in self.aux.items()}
        for name, (losses, inputs) in self.batched.items():
            stacked = [torch.stack(values) for values in zip(*inputs, strict=True)]
            with autocast_off(stacked[0].device):
                found[name] = losses(*stacked).mean()
        return found

    def sample_tokens(self, x: Tensor, max_tokens: int) -> Tensor:
        """Flat indices of at most `max_tokens` real tokens of x's (batch, seq), drawn at the
        first call of a forward and reused by every later layer (and by a recomputation
        under activation checkpointing), so that the layers' batched losses line up."""
        if self.sampled_tokens is None:
            tokens = torch.arange(x.shape[:-1].numel(), device=x.device)
            mask = self.mask_for(x)
            if mask is not None:
                tokens = tokens[mask.reshape(-1)]
            keep = torch.randperm(len(tokens), device=x.device)[:max_tokens]
            self.sampled_tokens = tokens[keep]
        return self.sampled_tokens


class Routing:
    """Holds the live `RoutingState`; one per `AdaptedModel`, never module-global."""

    def __init__(self) -> None:
        self._state: RoutingState | None = None

    @property
    def state(self) -> RoutingState:
        if self._state is None:
            raise RuntimeError(
                "an adapted layer ran outside AdaptedModel.forward/generate; call the wrapper, "
                "not its base_model, so that task ids reach the gates."
            )
        return self._state

    @contextmanager
    def bind(self, state: RoutingState) -> Iterator[RoutingState]:
        previous, self._state = self._state, state
        try:
            yield state
        finally:
            self._state = previous

    def wrap_checkpoint(self, checkpoint_fn: Callable) -> Callable:
        """Wrap a `_gradient_checkpointing_func` so recomputation sees the original routing.

        The first call of the checkpointed function is the forward; later calls are recomputations
        in backward. They re-bind the captured state and compute the aux losses again (checkpoint
        refills the forward graph's saved tensors from the same ops) into a discarded dict.
        """
        if getattr(checkpoint_fn, "_moelora_routing", None) is self:
            return checkpoint_fn
        if getattr(checkpoint_fn, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "reentrant activation checkpointing cannot backpropagate through gates shared "
                "across layers; enable it with {'use_reentrant': False}."
            )

        @functools.wraps(checkpoint_fn)
        def checkpoint(function: Callable, *args, **kwargs):
            captured = self._state
            calls = 0

            def run(*a, **k):
                nonlocal calls
                calls += 1
                if captured is None:
                    return function(*a, **k)
                state = captured if calls == 1 else replace(captured, aux={}, batched={})
                with self.bind(state):
                    return function(*a, **k)

            return checkpoint_fn(run, *args, **kwargs)

        checkpoint._moelora_routing = self
        return checkpoint


def attach_checkpointing(model: torch.nn.Module, routing: Routing) -> None:
    """Wrap every checkpointing function the model has set (cheap when already wrapped)."""
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = routing.wrap_checkpoint(fn)
