"""MOELoRA (Liu et al., SIGIR'24): E LoRA experts mixed by a task-motivated gate,
g = softmax(W_g e_task), shared by all layers (the paper's run) or one per layer."""

from __future__ import annotations

from dataclasses import dataclass

from moelora.adapters.config import ExpertConfig, fail, setting
from moelora.adapters.gates import SharedTaskWeights, TaskGate
from moelora.adapters.methods.base import LayerParts, Method, register_method
from moelora.errors import check_choice


@dataclass
class MoeloraConfig(ExpertConfig):
    name: str = setting("moelora", "moelora")
    gate_scope: str = setting(
        "`shared` (one task gate for all layers, the paper's run) or `layer`.", "shared"
    )
    task_embedding_dim: int = setting("Size of the task embedding.", 64)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("method.gate_scope", self.gate_scope, ("shared", "layer"))
        if self.task_embedding_dim < 1:
            fail(f"task_embedding_dim={self.task_embedding_dim} must be at least 1.")


@register_method
class MOELoRA(Method):
    name = "moelora"
    config_class = MoeloraConfig
    routes_by_task = True
    export_per = "task"

    def shared_gate(self, num_tasks: int) -> TaskGate | None:
        config = self.config
        if config.gate_scope != "shared":
            return None
        return TaskGate(num_tasks, config.num_experts, config.task_embedding_dim)

    def layer_parts(self, d_in: int, num_tasks: int, num_domains: int) -> LayerParts:
        config, num = self.config, self.config.num_experts
        if config.gate_scope == "shared":
            gate = SharedTaskWeights()
        else:
            gate = TaskGate(num_tasks, num, config.task_embedding_dim)
        return LayerParts([config.rank_per_expert] * num, [config.expert_scaling] * num, gate)
