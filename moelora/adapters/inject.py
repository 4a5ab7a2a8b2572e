"""Injection: wrap the targeted Linears of any HF model in gated layers and freeze the rest."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from moelora.adapters.config import MODULA, AdapterConfig
from moelora.adapters.gates import DomainGate, SharedTaskWeights, TaskGate, TopKRouter, UnitGate
from moelora.adapters.layer import GatedLoRALinear, linear_dims
from moelora.adapters.losses import ExpertContrastive
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
    found: dict[str, bool] = {}
    for name in linears:
        if _suffix_match(name, config.dense_targets):
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
            f"{config.target_regex!r}, dense_targets={list(config.dense_targets)}) matched no "
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
    """The method's experts, scalings and gate around one base Linear."""
    d_in, _ = linear_dims(base_layer)
    r, num = config.rank_per_expert, config.num_experts
    groups, contrastive = None, None
    if config.name in MODULA:
        ranks = [config.universal_rank] + [config.domain_rank] * num_domains
        scales = [config.scaling(rank) for rank in ranks]
        groups = [1] * len(ranks)
        gate = DomainGate(d_in, num_domains, config.name == "modula_res", config.router_top_k)
    elif dense or config.name == "lora":
        ranks, scales, gate = [r], [config.scaling(r)], UnitGate()
    else:
        ranks, scales = [r] * num, [config.expert_scaling] * num
        if config.name == "moelora" and config.gate_scope == "shared":
            gate = SharedTaskWeights()
        elif config.name == "moelora":
            gate = TaskGate(num_tasks, num, config.task_embedding_dim)
        else:
            gate = TopKRouter(d_in, num, config.top_k)
        if config.name == "contrastive":
            contrastive = ExpertContrastive(num, config.contrastive_tau, config.contrastive_tokens)
    gate = gate.to(base_layer.weight.device)
    return GatedLoRALinear(
        base_layer, ranks, scales, gate, routing, config.dropout, config.init, groups, contrastive
    )


def inject_adapters(
    model: nn.Module, config: AdapterConfig, routing: Routing, num_tasks: int, num_domains: int
) -> dict[str, GatedLoRALinear]:
    """Freeze every parameter of `model`, then replace each targeted Linear by a gated layer."""
    model.requires_grad_(False)
    layers = {}
    for name, dense in find_targets(model, config).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = build_layer(getattr(parent, child), config, routing, num_tasks, num_domains, dense)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers
