"""Contrastive MoELoRA (Luo et al. 2024): MoLoRA's token routing plus an InfoNCE loss that pulls
each expert's outputs together and pushes different experts' outputs apart."""

from __future__ import annotations

from dataclasses import dataclass

from moelora.adapters.config import fail, setting
from moelora.adapters.losses import ExpertContrastive
from moelora.adapters.methods.base import LayerParts, register_method
from moelora.adapters.methods.molora import MoLoRA, MoloraConfig


@dataclass
class ContrastiveConfig(MoloraConfig):
    name: str = setting("contrastive", "contrastive")
    contrastive_coef: float = setting("Weight of the experts' InfoNCE loss.", 0.01)
    contrastive_tau: float = setting("InfoNCE temperature.", 0.1)
    contrastive_tokens: int = setting(
        "Most tokens sampled per forward (shared by all layers) for the loss.", 64
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contrastive_tau <= 0 or self.contrastive_tokens < 2:
            fail("contrastive needs contrastive_tau > 0 and contrastive_tokens >= 2.")
        if self.contrastive_coef < 0:
            fail(f"contrastive_coef={self.contrastive_coef} must be at least 0 (0 = off).")


@register_method
class ContrastiveMoELoRA(MoLoRA):
    name = "contrastive"
    config_class = ContrastiveConfig
    aux_losses = {
        "load_balance": "aux_loss_coef",
        "importance": "aux_loss_coef",
        "contrastive": "contrastive_coef",
    }

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        parts = super().layer_parts(d_in, num_tasks, num_domains)
        config = self.config
        parts.contrastive = ExpertContrastive(
            config.num_experts, config.top_k, config.contrastive_tau, config.contrastive_tokens
        )
        return parts
