"""LoRA (Hu et al. 2021), the baseline: one expert, no gate. y = W x + s B A x, s = alpha / r."""

from __future__ import annotations

from dataclasses import dataclass

from moelora.adapters.config import ExpertConfig, fail, setting
from moelora.adapters.gates import UnitGate
from moelora.adapters.methods.base import LayerParts, Method, register_method


@dataclass
class LoraConfig(ExpertConfig):
    name: str = setting("lora", "lora")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts != 1:
            fail(f"lora has one expert but num_experts={self.num_experts}; set it to 1.")


@register_method
class LoRA(Method):
    name = "lora"
    config_class = LoraConfig

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        rank = self.config.rank_per_expert
        return LayerParts([rank], [self.config.scaling(rank)], UnitGate())
