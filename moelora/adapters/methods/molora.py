"""MING-MOE's MoLoRA (Liao et al. 2024): E LoRA experts with a per-token top-k router, g =
softmax over the k largest of Linear(x), plus the Switch load-balancing loss."""

from __future__ import annotations

from dataclasses import dataclass

from moelora.adapters.config import ExpertConfig, fail, setting
from moelora.adapters.gates import TopKRouter
from moelora.adapters.methods.base import LayerParts, Method, register_method
from moelora.errors import check_choice
from moelora.log import get_logger

log = get_logger(__name__)

GATHER_RANK_PER_CHOICE = 256  # `auto` gathers once num_experts * rank_per_expert >= this * top_k


@dataclass
class MoloraConfig(ExpertConfig):
    name: str = setting("molora", "molora")
    top_k: int = setting("Experts kept per token.", 2)
    aux_loss_coef: float = setting("Weight of the load-balancing loss; 0 = off.", 0.01)
    expert_compute: str = setting(
        "`dense` (every expert's ranks, masked: cost grows with num_experts), `gather` (only "
        "the chosen experts' ranks, one small product per expert) or `auto` (gather when "
        f"num_experts * rank_per_expert >= {GATHER_RANK_PER_CHOICE} * top_k; BENCHMARKS.md).",
        "auto",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.top_k <= self.num_experts:
            fail(f"top_k={self.top_k} must lie in [1, num_experts={self.num_experts}].")
        check_choice("method.expert_compute", self.expert_compute, ("dense", "gather", "auto"))
        if self.aux_loss_coef < 0:
            fail(f"aux_loss_coef={self.aux_loss_coef} must be at least 0 (0 = off).")


@register_method
class MoLoRA(Method):
    name = "molora"
    config_class = MoloraConfig
    aux_losses = {"load_balance": "aux_loss_coef", "importance": "aux_loss_coef"}
    export_per = None

    def check_sizes(self, num_tasks: int, num_domains: int) -> None:
        super().check_sizes(num_tasks, num_domains)
        if self.config.num_experts == 1 and self.config.aux_loss_coef > 0:
            log.info(
                f"note: method.aux_loss_coef={self.config.aux_loss_coef} has nothing to balance: "
                f"{self.name} has one expert."
            )

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        config, num = self.config, self.config.num_experts
        gate = TopKRouter(d_in, num, config.top_k)
        ranks, scales = [config.rank_per_expert] * num, [config.expert_scaling] * num
        return LayerParts(ranks, scales, gate, gather=self.gathers())

    def gathers(self) -> bool:
        """Whether layers compute only the chosen experts' ranks (`expert_compute`). Dense
        costs grow with the dense rank E * r, gathering's with the k chosen experts per token
        (copies of their rows, one product per expert); on CPU at d = 256 and 1024, gathering
        wins from E * r >= 256 k (`scripts/bench_routed.py`, BENCHMARKS.md)."""
        config = self.config
        if config.expert_compute != "auto":
            return config.expert_compute == "gather"
        dense_rank = config.num_experts * config.rank_per_expert
        return dense_rank >= GATHER_RANK_PER_CHOICE * config.top_k
