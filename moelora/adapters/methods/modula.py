"""MoDULA (Ma et al., EMNLP 2024): a universal expert and one expert per domain, trained in
stages (universal, then domain experts, then the token router). MoDULA-Res keeps the universal
expert always on as a residual and routes over the domain experts only."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moelora.adapters.config import AdapterConfig, fail, setting
from moelora.adapters.gates import (
    DOMAIN,
    MODULA_STAGES,
    ROUTER_STAGES,
    UNIVERSAL,
    DomainGate,
)
from moelora.adapters.methods.base import LayerParts, Method, register_method
from moelora.errors import check_choice
from moelora.log import get_logger

log = get_logger(__name__)


@dataclass
class ModulaConfig(AdapterConfig):
    name: str = setting("modula", "modula")
    universal_rank: int = setting("Rank of the universal expert.", 8)
    domain_rank: int = setting("Rank of each domain expert.", 8)
    scaling_rank: str = setting(
        "Rank in s = alpha / scaling rank: `expert` (each expert's own rank) or `total` "
        "(universal_rank + domain_rank, the rank of one row's adapter: every expert gets the "
        "same s, which keeps a small domain rank from multiplying its expert's step size).",
        "expert",
    )
    stages: list[str] = setting(
        "Training stages in order, from universal | domain | router_warmup | router.",
        factory=list,
    )
    router_top_k: int | None = setting(
        "Candidates kept per token by the domain router; null = dense softmax.", None
    )
    aux_loss_coef: float = setting("Weight of the router's load-balancing loss; 0 = off.", 0.01)
    router_input: str = setting(
        "`token`: route each token from its own input (the paper); `prompt`: route each row "
        "once from the mean input of its prompt tokens, for every token it has and generates.",
        "token",
    )
    router_supervision_coef: float = setting(
        "Weight of the cross-entropy to the row's domain in the router_warmup stage.", 1.0
    )
    add_domains: list[str] = setting(
        "Domains added to an earlier run; only their experts (and the router) train.",
        factory=list,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.universal_rank < 1 or self.domain_rank < 1:
            fail("modula needs universal_rank >= 1 and domain_rank >= 1.")
        if self.aux_loss_coef < 0:
            fail(f"aux_loss_coef={self.aux_loss_coef} must be at least 0 (0 = off).")
        if self.router_supervision_coef < 0:
            fail(f"router_supervision_coef={self.router_supervision_coef} must be at least 0.")
        check_choice("method.router_input", self.router_input, ("token", "prompt"))
        check_choice("method.scaling_rank", self.scaling_rank, ("expert", "total"))
        if self.router_top_k is not None and self.router_top_k < 1:
            fail(f"router_top_k={self.router_top_k} must be null or at least 1.")
        bad = [s for s in self.stages if s not in MODULA_STAGES]
        if bad:
            fail(f"stages {bad} are unknown; use a list from {', '.join(MODULA_STAGES)}.")
        if self.add_domains and UNIVERSAL in self.stages:
            fail(
                "add_domains keeps the earlier run's universal expert; drop universal from "
                "method.stages (method.stages=[domain,router])."
            )


@dataclass
class ModulaResConfig(ModulaConfig):
    name: str = setting("modula_res", "modula_res")


@register_method
class MoDULA(Method):
    name = "modula"
    config_class = ModulaConfig
    uses_domains = True
    aux_losses = {
        "load_balance": "aux_loss_coef",
        "importance": "aux_loss_coef",
        "router_supervision": "router_supervision_coef",
    }
    export_per = "domain"
    stage_names = MODULA_STAGES
    forced_stage = DOMAIN
    residual = False

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        config = self.config
        ranks = [config.universal_rank] + [config.domain_rank] * num_domains
        gate = DomainGate(
            d_in, num_domains, self.residual, config.router_top_k, config.router_input
        )
        if config.scaling_rank == "total":
            scales = [config.scaling(config.universal_rank + config.domain_rank)] * len(ranks)
        else:
            scales = [config.scaling(r) for r in ranks]
        return LayerParts(ranks, scales, gate, [1] * len(ranks))

    def check_sizes(self, num_tasks: int, num_domains: int) -> None:
        super().check_sizes(num_tasks, num_domains)
        candidates = num_domains if self.residual else num_domains + 1
        if candidates == 1 and self.config.aux_loss_coef > 0:
            log.info(
                f"note: method.aux_loss_coef={self.config.aux_loss_coef} has nothing to balance: "
                f"{self.name}'s router has one candidate (one domain)."
            )

    def stages(self) -> list[str | None]:
        return list(self.config.stages) or [None]

    def added_domains(self) -> list[str]:
        return list(self.config.add_domains)

    def stage_rows(self, stage: str | None) -> str:
        """The domain stage of an added domain sees only its rows; the router (and its warm-up)
        sees every domain equally often, so it is not trained mostly on the largest one."""
        if stage == DOMAIN and self.config.add_domains:
            return "added_domains"
        return "balanced_domains" if stage in ROUTER_STAGES else "mixture"

    def enter_stage(self, layer: nn.Module, stage: str | None, domains: set[int]) -> list:
        """universal: the universal expert trains; domain: the chosen domain experts, each row
        gated to its own; router_warmup and router: only the router; None: everything, routed."""
        layer.gate.stage = stage
        if stage == UNIVERSAL:
            return list(layer.group(0))
        if stage == DOMAIN:
            return [p for d in domains for p in layer.group(d + 1)]
        return list(layer.gate.parameters()) if stage in ROUTER_STAGES else []


@register_method
class MoDULARes(MoDULA):
    name = "modula_res"
    config_class = ModulaResConfig
    residual = True
