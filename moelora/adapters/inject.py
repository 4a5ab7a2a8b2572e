"""Injection: wrap the targeted Linears of any HF model in gated layers and freeze the rest."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from moelora.adapters.config import AdapterConfig
from moelora.adapters.gates import UnitGate
from moelora.adapters.layer import GatedLoRALinear, linear_dims
from moelora.adapters.methods import LayerParts, method_of
from moelora.adapters.routing import Routing


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, GatedLoRALinear)


def _suffix_match(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith(f".{t}") for t in targets)


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, bool]:
    """Map each targeted Linear's path to whether it is a dense (plain LoRA) target.

    Raises:
        ValueError: nothing matched; the message lists the model's Linear names.
    """
    linears = [name for name, module in model.named_modules() if is_linear(module)]
    dense = list(getattr(config, "dense_targets", []))  # methods with equal experts have them
    found: dict[str, bool] = {}
    for name in linears:
        if _suffix_match(name, dense):
            found[name] = True
        elif config.target_regex:
            if re.fullmatch(config.target_regex, name):
                found[name] = False
        elif _suffix_match(name, config.target_modules):
            found[name] = False
    if not found:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(
            f"method.target_modules={list(config.target_modules)} (target_regex="
            f"{config.target_regex!r}, dense_targets={dense}) matched no "
            f"Linear of {type(model).__name__}; its Linear names are {leaves} "
            f"(full paths like {linears[:2]}): set method.target_modules to some of them."
        )
    return found


def build_layer(
    base_layer: nn.Module,
    config: AdapterConfig,
    routing: Routing,
    num_tasks: int,
    num_domains: int,
    dense: bool = False,
) -> GatedLoRALinear:
    """The method's experts, scalings and gate around one base Linear (a dense target: one
    plain LoRA expert of rank rank_per_expert)."""
    d_in, _ = linear_dims(base_layer)
    if dense:
        rank = config.rank_per_expert
        parts = LayerParts([rank], [config.scaling(rank)], UnitGate())
    else:
        parts = method_of(config).layer_parts(d_in, num_tasks, num_domains)
    gate = parts.gate.to(base_layer.weight.device)
    return GatedLoRALinear(
        base_layer,
        parts.ranks,
        parts.scales,
        gate,
        routing,
        config.dropout,
        config.init,
        parts.group_sizes,
        parts.contrastive,
        parts.gather,
    )


def inject_adapters(
    model: nn.Module, config: AdapterConfig, routing: Routing, num_tasks: int, num_domains: int
) -> dict[str, GatedLoRALinear]:
    """Freeze every parameter of `model`, then replace each targeted Linear by a gated layer."""
    model.requires_grad_(False)
    layers = {}
    for name, dense in find_targets(model, config).items():
        layer = build_layer(
            model.get_submodule(name), config, routing, num_tasks, num_domains, dense
        )
        model.set_submodule(name, layer)
        layers[name] = layer
    return layers
