"""Generation at the base model's speed for static gates.

A gate fixed by the task (lora, moelora) or the domain (modula with a forced domain) is a
constant per layer for every row of that task, so the adapter folds into the base weight,
W_task = W + B_cat diag(expand(g * s)) A_cat, and the rows of one task generate through plain
Linears. `folding` keeps a copy of each targeted weight and copies it back between groups and on
exit: the weights come back bitwise (a fold is never subtracted).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch

from moelora.adapters.export import fixed_gates
from moelora.adapters.model import AdaptedModel


def is_static(model: AdaptedModel) -> bool:
    """Whether every gate is fixed by the row's task/domain (in the current stage)."""
    return all(layer.gate.static for layer in model.adapted_layers.values())


def fold_blocker(model: AdaptedModel) -> str | None:
    """Why a static adapter cannot be folded into these base weights, or None when it can."""
    for layer in model.adapted_layers.values():
        weight = layer.base_layer.weight
        if hasattr(weight, "ds_id"):
            return "the base weights are partitioned by DeepSpeed ZeRO-3"
        if not weight.is_floating_point():
            return "the base is quantized"
    return None


def fold_key(model: AdaptedModel, task_ids: int | list, domain_ids: int) -> Hashable:
    """What a row's folded weights depend on: nothing (one adapter), its task or its domain."""
    per = model.method.export_per
    if per == "task":
        return tuple(task_ids) if isinstance(task_ids, list) else task_ids
    return domain_ids if per == "domain" else None


@contextmanager
def folding(model: AdaptedModel) -> Iterator[Callable[[Hashable], None]]:
    """Swap every adapted layer for its base Linear and yield `fold(key)`, which folds the
    adapter of one `fold_key` into the base weights (restoring the originals first when another
    key was folded). On exit the original weights are copied back and the layers put back.

    The originals are kept on the CPU, so folding costs no accelerator memory.
    """
    per = model.method.export_per
    layers = model.adapted_layers
    originals = {n: m.base_layer.weight.detach().to("cpu", copy=True) for n, m in layers.items()}
    base = model.base_model
    folded = False

    @torch.no_grad()
    def restore() -> None:
        for name, layer in layers.items():
            layer.base_layer.weight.copy_(originals[name])

    @torch.no_grad()
    def fold(key: Hashable) -> None:
        nonlocal folded
        if folded:  # another key's fold is in the weights
            restore()
        folded = True
        task = list(key) if isinstance(key, tuple) else key
        gates = fixed_gates(
            model, task if per == "task" else None, key if per == "domain" else None
        )
        for name, layer in layers.items():
            layer.merge(gates[name])

    try:
        for name, layer in layers.items():
            base.set_submodule(name, layer.base_layer)
        yield fold
    finally:
        restore()
        for name, layer in layers.items():
            base.set_submodule(name, layer)
