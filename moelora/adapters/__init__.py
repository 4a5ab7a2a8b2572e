"""Gated LoRA experts for any HF causal LM: one layer, one gate per method (docs/methods.md)."""

from moelora.adapters.config import AdapterConfig
from moelora.adapters.export import export_peft_adapter, fixed_gates, merge_adapter
from moelora.adapters.gates import DomainGate, SharedTaskWeights, TaskGate, TopKRouter, UnitGate
from moelora.adapters.inject import build_layer, find_targets, inject_adapters
from moelora.adapters.layer import GatedLoRALinear
from moelora.adapters.losses import (
    ExpertContrastive,
    contrastive_losses,
    importance_loss,
    load_balance_loss,
)
from moelora.adapters.methods import (
    LayerParts,
    Method,
    get_method,
    inference_stage,
    method_config,
    method_names,
    method_of,
    register_method,
)
from moelora.adapters.model import AdaptedModel
from moelora.adapters.routing import Routing, RoutingState
from moelora.adapters.storage import load_adapter, load_adapter_weights, save_adapter

__all__ = [
    "AdaptedModel",
    "AdapterConfig",
    "DomainGate",
    "ExpertContrastive",
    "GatedLoRALinear",
    "LayerParts",
    "Method",
    "Routing",
    "RoutingState",
    "SharedTaskWeights",
    "TaskGate",
    "TopKRouter",
    "UnitGate",
    "build_layer",
    "contrastive_losses",
    "export_peft_adapter",
    "find_targets",
    "fixed_gates",
    "get_method",
    "inference_stage",
    "inject_adapters",
    "load_adapter",
    "load_adapter_weights",
    "importance_loss",
    "load_balance_loss",
    "merge_adapter",
    "method_config",
    "method_names",
    "method_of",
    "register_method",
    "save_adapter",
]
