"""The shared part of every method's config schema: where adapters go and how they are scaled.

Each method extends one of the two classes here with its own fields (moelora/adapters/methods/),
so a field of another method cannot be set. `moelora.adapters.methods.method_config` builds the
right schema from a plain dict or Hydra node by its `name` (the schemas never import the registry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

from moelora.errors import UserError, check_choice

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
DEFAULT_TARGETS = ["attention", "mlp"]  # roles: each family's projections (families.py)


def fail(text: str) -> NoReturn:
    raise UserError(f"method: {text}")


def setting(text: str, default: Any = None, factory: Any = None) -> Any:
    """A config field with its help text (shown by `moelora train --help` users and the docs)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class AdapterConfig:
    """Fields every method has: the targeted Linears, LoRA's alpha, dropout and init.

    Subclasses add their own fields and checks (calling `super().__post_init__()`).
    """

    name: str = setting("The method; picks the schema and code (adapters/methods/).", "")
    target_modules: list[str] = setting(
        "Linear names to adapt, matched as a suffix of the module path (`q_proj` hits "
        "`model.layers.0.self_attn.q_proj`), or the roles `attention` and `mlp`: the model "
        "family's projections (moelora/adapters/families.py).",
        factory=lambda: list(DEFAULT_TARGETS),
    )
    target_regex: str | None = setting(
        "When set, replaces target_modules: a regex that must fully match the module path.", None
    )
    alpha: float = setting("LoRA alpha: scaling s = alpha / rank.", 32.0)
    use_rslora: bool = setting("rsLoRA: s = alpha / sqrt(rank) instead of alpha / rank.", False)
    dropout: float = setting("Dropout on the adapter's input x (one mask shared by experts).", 0.1)
    init: str = setting(
        "Init of A (B is always 0): `kaiming` (PEFT: kaiming-uniform a=sqrt(5)) or `normal` "
        "(MOELoRA official: N(0, 0.01^2)).",
        "kaiming",
    )

    def __post_init__(self) -> None:
        check_choice("method.init", self.init, ("kaiming", "normal"))
        if not self.target_modules and not self.target_regex and not self.adapts_dense():
            fail("nothing to adapt; set target_modules, target_regex or dense_targets.")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout={self.dropout} must lie in [0, 1).")
        if self.alpha <= 0:
            fail(f"alpha={self.alpha} must be positive.")

    def adapts_dense(self) -> bool:
        """Whether some Linears get a plain LoRA beside the method's experts."""
        return False

    def scaling(self, rank: int) -> float:
        """s for an adapter of the given rank: alpha / rank, or alpha / sqrt(rank) for rsLoRA."""
        return self.alpha / (math.sqrt(rank) if self.use_rslora else rank)


@dataclass
class ExpertConfig(AdapterConfig):
    """Methods whose layer holds `num_experts` equal LoRA experts (lora has one).

    Rank is counted per expert: a layer holds `num_experts * rank_per_expert` adapter rows
    (`total_rank`). Set either field and the other is derived (moelora splits a total rank);
    with neither set, rank_per_expert is 8 (PEFT's default r).
    """

    dense_targets: list[str] = setting(
        "Linear names (suffix match) that get one plain LoRA expert of rank rank_per_expert and "
        "no gate, e.g. MING-MOE's attention projections beside MoLoRA on the MLP.",
        factory=list,
    )
    num_experts: int = setting("Experts per adapted Linear (lora: 1).", 1)
    rank_per_expert: int | None = setting(
        "Rank of each expert; derived from total_rank if null (8 if both are null)."
    )
    total_rank: int | None = setting(
        "Rank of all experts together (moelora's r); must split evenly over num_experts."
    )
    scaling_rank: str = setting(
        "Rank in s = alpha / scaling rank: `total` (num_experts * rank_per_expert; lora, moelora) "
        "or `expert` (rank_per_expert; molora, where every expert has the full rank).",
        "total",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.scaling_rank", self.scaling_rank, ("total", "expert"))
        if self.num_experts < 1:
            fail(f"num_experts={self.num_experts} must be at least 1.")
        self._derive_ranks()

    def adapts_dense(self) -> bool:
        return bool(self.dense_targets)

    def _derive_ranks(self) -> None:
        if self.total_rank is not None:
            if self.total_rank % self.num_experts:
                fail(
                    f"total_rank={self.total_rank} does not split over num_experts="
                    f"{self.num_experts}; pick a total_rank divisible by num_experts."
                )
            per_expert = self.total_rank // self.num_experts
            if self.rank_per_expert not in (None, per_expert):
                fail(
                    f"rank_per_expert={self.rank_per_expert} contradicts total_rank="
                    f"{self.total_rank} / num_experts={self.num_experts}; set only one of them."
                )
            self.rank_per_expert = per_expert
        if self.rank_per_expert is None:
            self.rank_per_expert = 8
        if self.rank_per_expert < 1:
            fail(f"rank_per_expert={self.rank_per_expert} must be a positive integer.")
        self.total_rank = self.num_experts * self.rank_per_expert

    @property
    def expert_scaling(self) -> float:
        """s of the gated experts; `scaling_rank` says which rank divides alpha."""
        rank = self.total_rank if self.scaling_rank == "total" else self.rank_per_expert
        return self.scaling(rank)
