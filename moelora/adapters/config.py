"""The schema of the Hydra `method` node: one dataclass for every method, validated at start."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import NoReturn

METHODS = ("lora", "moelora", "molora", "modula", "modula_res", "contrastive")
TOKEN_ROUTED = ("molora", "contrastive")
MODULA = ("modula", "modula_res")
TASK_ROUTED = ("moelora",)  # the gate reads each row's task id, also at inference
STAGES = ("universal", "domain", "router")
# The fields that decide which adapter tensors exist and their shapes (with num_tasks/num_domains).
SHAPE_FIELDS = (
    "name",
    "target_modules",
    "target_regex",
    "dense_targets",
    "num_experts",
    "rank_per_expert",
    "total_rank",
    "gate_scope",
    "task_embedding_dim",
    "universal_rank",
    "domain_rank",
)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _fail(text: str) -> NoReturn:
    raise ValueError(f"method: {text}")


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class AdapterConfig:
    """How adapters are placed, sized, gated and regularised (the methods spec: methods.md).

    Rank is counted per expert: a layer holds `num_experts * rank_per_expert` adapter rows
    (`total_rank`). Set either field and the other is derived (moelora splits a total rank);
    with neither set, rank_per_expert is 8 (PEFT's default r). modula sizes its experts with
    universal_rank and domain_rank instead.
    """

    name: str = _help(
        "Method: lora | moelora | molora | modula | modula_res | contrastive.", "lora"
    )
    target_modules: list[str] = _help(
        "Linear names to adapt, matched as a suffix of the module path (`q_proj` hits "
        "`model.layers.0.self_attn.q_proj`).",
        factory=lambda: list(LLAMA_TARGETS),
    )
    target_regex: str | None = _help(
        "When set, replaces target_modules: a regex that must fully match the module path.", None
    )
    dense_targets: list[str] = _help(
        "Linear names (suffix match) that get one plain LoRA expert of rank rank_per_expert and "
        "no gate, e.g. MING-MOE's attention projections beside MoLoRA on the MLP.",
        factory=list,
    )
    num_experts: int = _help("Experts per adapted Linear (lora: 1; modula: set by the domains).", 1)
    rank_per_expert: int | None = _help(
        "Rank of each expert; derived from total_rank if null (8 if both are null)."
    )
    total_rank: int | None = _help(
        "Rank of all experts together (moelora's r); must split evenly over num_experts."
    )
    alpha: float = _help("LoRA alpha: scaling s = alpha / scaling rank.", 32.0)
    scaling_rank: str = _help(
        "Rank in s = alpha / rank: `total` (num_experts * rank_per_expert; lora, moelora) or "
        "`expert` (rank_per_expert; molora, where every expert has the full rank).",
        "total",
    )
    use_rslora: bool = _help("rsLoRA: s = alpha / sqrt(rank) instead of alpha / rank.", False)
    dropout: float = _help("Dropout on the adapter's input x (one mask shared by experts).", 0.1)
    init: str = _help(
        "Init of A (B is always 0): `kaiming` (PEFT: kaiming-uniform a=sqrt(5)) or `normal` "
        "(MOELoRA official: N(0, 0.01^2)).",
        "kaiming",
    )
    gate_scope: str = _help(
        "moelora: `shared` (one task gate for all layers, the paper's run) or `layer`.", "shared"
    )
    task_embedding_dim: int = _help("moelora: size of the task embedding.", 64)
    top_k: int = _help("molora/contrastive: experts kept per token.", 2)
    aux_loss_coef: float = _help(
        "Weight of the load-balancing loss of token routers; 0 = off.", 0.01
    )
    contrastive_coef: float = _help("contrastive: weight of the experts' InfoNCE loss.", 0.01)
    contrastive_tau: float = _help("contrastive: InfoNCE temperature.", 0.1)
    contrastive_tokens: int = _help("contrastive: most tokens sampled per layer for the loss.", 256)
    universal_rank: int = _help("modula: rank of the universal expert.", 8)
    domain_rank: int = _help("modula: rank of each domain expert.", 8)
    stages: list[str] = _help(
        "modula: training stages in order, from universal | domain | router.", factory=list
    )
    router_top_k: int | None = _help(
        "modula: candidates kept per token by the domain router; null = dense softmax.", None
    )
    add_domains: list[str] = _help(
        "modula: domains added to an earlier run; only their experts (and the router) train.",
        factory=list,
    )

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            _fail(f"name={self.name!r} is unknown; use one of {', '.join(METHODS)}.")
        for key, allowed in (
            ("scaling_rank", ("total", "expert")),
            ("init", ("kaiming", "normal")),
            ("gate_scope", ("shared", "layer")),
        ):
            if getattr(self, key) not in allowed:
                _fail(f"{key}={getattr(self, key)!r} is not allowed; use one of {allowed}.")
        if not self.target_modules and not self.target_regex and not self.dense_targets:
            _fail("nothing to adapt; set target_modules, target_regex or dense_targets.")
        if not 0.0 <= self.dropout < 1.0:
            _fail(f"dropout={self.dropout} must lie in [0, 1).")
        if self.alpha <= 0:
            _fail(f"alpha={self.alpha} must be positive.")
        if self.num_experts < 1:
            _fail(f"num_experts={self.num_experts} must be at least 1.")
        if self.name == "lora" and self.num_experts != 1:
            _fail(f"lora has one expert but num_experts={self.num_experts}; set it to 1.")
        self._derive_ranks()
        if self.name in TOKEN_ROUTED and not 1 <= self.top_k <= self.num_experts:
            _fail(f"top_k={self.top_k} must lie in [1, num_experts={self.num_experts}].")
        if self.name == "contrastive" and (
            self.contrastive_tau <= 0 or self.contrastive_tokens < 2
        ):
            _fail("contrastive needs contrastive_tau > 0 and contrastive_tokens >= 2.")
        if self.name in MODULA:
            if self.universal_rank < 1 or self.domain_rank < 1:
                _fail("modula needs universal_rank >= 1 and domain_rank >= 1.")
            if self.router_top_k is not None and self.router_top_k < 1:
                _fail(f"router_top_k={self.router_top_k} must be null or at least 1.")
            bad = [s for s in self.stages if s not in STAGES]
            if bad:
                _fail(f"stages {bad} are unknown; use a list from {', '.join(STAGES)}.")
            if self.dense_targets:
                _fail("dense_targets are not used by modula; clear them and list target_modules.")
        elif self.stages or self.add_domains:
            _fail(f"stages and add_domains are for modula only; clear them for {self.name}.")

    def _derive_ranks(self) -> None:
        if self.name in MODULA:
            return
        if self.total_rank is not None:
            if self.total_rank % self.num_experts:
                _fail(
                    f"total_rank={self.total_rank} does not split over num_experts="
                    f"{self.num_experts}; pick a total_rank divisible by num_experts."
                )
            per_expert = self.total_rank // self.num_experts
            if self.rank_per_expert not in (None, per_expert):
                _fail(
                    f"rank_per_expert={self.rank_per_expert} contradicts total_rank="
                    f"{self.total_rank} / num_experts={self.num_experts}; set only one of them."
                )
            self.rank_per_expert = per_expert
        if self.rank_per_expert is None:
            self.rank_per_expert = 8
        if self.rank_per_expert < 1:
            _fail(f"rank_per_expert={self.rank_per_expert} must be a positive integer.")
        self.total_rank = self.num_experts * self.rank_per_expert

    @classmethod
    def coerce(cls, config: AdapterConfig | Mapping) -> AdapterConfig:
        """An AdapterConfig from itself, a plain dict, or Hydra's DictConfig `method` node."""
        if isinstance(config, cls):
            return config
        if not isinstance(config, dict):
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(config, resolve=True)
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            _fail(f"unknown keys {unknown}; remove them or fix their spelling.")
        return cls(**config)

    def scaling(self, rank: int) -> float:
        """s for an adapter of the given rank: alpha / rank, or alpha / sqrt(rank) for rsLoRA."""
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def expert_scaling(self) -> float:
        """s of the gated experts; `scaling_rank` says which rank divides alpha."""
        rank = self.total_rank if self.scaling_rank == "total" else self.rank_per_expert
        return self.scaling(rank)
