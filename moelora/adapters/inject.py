"""Injection: wrap the targeted Linears of any HF model in gated layers and freeze the rest."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from moelora.adapters.config import AdapterConfig
from moelora.adapters.families import resolve_roles
from moelora.adapters.gates import UnitGate
from moelora.adapters.layer import GatedLoRALinear, linear_dims
from moelora.adapters.methods import LayerParts, method_of
from moelora.adapters.routing import Routing
from moelora.log import get_logger

log = get_logger(__name__)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, GatedLoRALinear)


def _suffix_match(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith(f".{t}") for t in targets)


def find_targets(model: nn.Module, config: AdapterConfig, quiet: bool = False) -> dict[str, bool]:
    """Map each targeted Linear's path to whether it is a dense (plain LoRA) target. The roles
    `attention` and `mlp` among the names stand for the model family's projections
    (moelora/adapters/families.py, by `model.config.model_type`). A name no Linear has is
    warned about unless `quiet` (a check on the model's skeleton before it loads).

    Raises:
        ValueError: a role on an unknown model type, or nothing matched; the message lists the
            model's Linear names.
    """
    linears = [name for name, module in model.named_modules() if is_linear(module)]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
    names = _target_names(model, config, leaves)
    if not quiet:
        _warn_unmatched(names, linears, leaves)
    dense, targets = names["method.dense_targets"], names.get("method.target_modules", [])
    found: dict[str, bool] = {}
    for name in linears:
        if _suffix_match(name, dense):
            found[name] = True
        elif config.target_regex:
            if re.fullmatch(config.target_regex, name):
                found[name] = False
        elif _suffix_match(name, targets):
            found[name] = False
    if not found:
        raise ValueError(
            f"method.target_modules={targets} (target_regex={config.target_regex!r}, "
            f"dense_targets={dense}) matched no Linear of {type(model).__name__}; its Linear "
            f"names are {leaves} (full paths like {linears[:2]}): set method.target_modules to "
            f"some of them."
        )
    return found


def _target_fields(config: AdapterConfig) -> dict[str, list[str]]:
    fields = {"method.dense_targets": list(getattr(config, "dense_targets", []))}
    if not config.target_regex:  # a regex replaces target_modules
        fields["method.target_modules"] = list(config.target_modules)
    return fields


def _target_names(model: nn.Module, config: AdapterConfig, leaves: list[str]) -> dict:
    """The config fields' Linear names, roles resolved for the model's family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return resolve_roles(_target_fields(config), model_type, leaves)


def _warn_unmatched(names: dict[str, list[str]], linears: list[str], leaves: list[str]) -> None:
    """A name that no Linear has is most often another family's (gate_proj where GLM has one
    fused gate_up_proj): the run would train without that projection, so say so."""
    for key, wanted in names.items():
        missing = [t for t in wanted if not any(_suffix_match(n, [t]) for n in linears)]
        if missing:
            log.warning(
                f"{key} names {missing}, which no Linear of this model has (its Linear names: "
                f"{leaves}); those are left out."
            )


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
