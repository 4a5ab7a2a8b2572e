"""Gated LoRA experts for any HF causal LM: one layer, one gate per method (see design.md)."""

from moelora.adapters.config import METHODS, STAGES, AdapterConfig
from moelora.adapters.export import export_peft_adapter, fixed_gates, merge_adapter
from moelora.adapters.gates import DomainGate, SharedTaskWeights, TaskGate, TopKRouter, UnitGate
from moelora.adapters.inject import build_layer, find_targets, inject_adapters
from moelora.adapters.layer import GatedLoRALinear
from moelora.adapters.losses import ExpertContrastive, expert_contrastive_loss, load_balance_loss
from moelora.adapters.model import AdaptedModel
from moelora.adapters.routing import Routing, RoutingState
from moelora.adapters.storage import load_adapter, load_adapter_weights, save_adapter

__all__ = [
    "METHODS",
    "STAGES",
    "AdaptedModel",
    "AdapterConfig",
    "DomainGate",
    "ExpertContrastive",
    "GatedLoRALinear",
    "Routing",
    "RoutingState",
    "SharedTaskWeights",
    "TaskGate",
    "TopKRouter",
    "UnitGate",
    "build_layer",
    "expert_contrastive_loss",
    "export_peft_adapter",
    "find_targets",
    "fixed_gates",
    "inject_adapters",
    "load_adapter",
    "load_adapter_weights",
    "load_balance_loss",
    "merge_adapter",
    "save_adapter",
]
