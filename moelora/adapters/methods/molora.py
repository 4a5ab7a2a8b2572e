"""MING-MOE's MoLoRA (Liao et al. 2024): E LoRA experts with a per-token top-k router, g =
softmax over the k largest of Linear(x), plus the Switch load-balancing loss."""

from __future__ import annotations

from dataclasses import dataclass

from moelora.adapters.config import ExpertConfig, fail, setting
from moelora.adapters.gates import TopKRouter
from moelora.adapters.methods.base import LayerParts, Method, register_method


@dataclass
class MoloraConfig(ExpertConfig):
    name: str = setting("molora", "molora")
    top_k: int = setting("Experts kept per token.", 2)
    aux_loss_coef: float = setting("Weight of the load-balancing loss; 0 = off.", 0.01)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.top_k <= self.num_experts:
            fail(f"top_k={self.top_k} must lie in [1, num_experts={self.num_experts}].")
        if self.aux_loss_coef < 0:
            fail(f"aux_loss_coef={self.aux_loss_coef} must be at least 0 (0 = off).")


@register_method
class MoLoRA(Method):
    name = "molora"
    config_class = MoloraConfig
    aux_losses = {"load_balance": "aux_loss_coef"}
    export_per = None

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        config, num = self.config, self.config.num_experts
        gate = TopKRouter(d_in, num, config.top_k)
        return LayerParts([config.rank_per_expert] * num, [config.expert_scaling] * num, gate)
