"""The gates: the only per-method code. Each maps (x, routing) to weights over a layer's experts.

A gate returns g of shape (..., E) that broadcasts over x's leading dims: (E,) for a constant gate,
(batch, 1, E) for a per-row gate, (batch, seq, E) for a token router. `static` says whether g is
fixed once the row's task/domain is known, i.e. whether the layer can be merged into W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora.adapters.losses import importance_loss, load_balance_loss
from moelora.adapters.routing import Routing, expand_rows


def per_row(weights: Tensor, x: Tensor) -> Tensor:
    """(batch, E) row weights as (batch, 1, ..., E) so that they broadcast over x's tokens."""
    weights = expand_rows(weights, x.shape[0], "the gate's task/domain ids")
    return weights.view(weights.shape[0], *([1] * (x.dim() - 2)), weights.shape[-1])


class UnitGate(nn.Module):
    """lora (and dense targets): one expert, g = 1."""

    static = True

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        return x.new_ones(1)


class TaskGate(nn.Module):
    """moelora: g = softmax(W_g e_task), e_task = TaskEmbedding[task_id]; W_g has no bias.

    Task ids are (batch,) or (batch, n) padded with -1 for rows of several tasks, whose
    embeddings are averaged. Used once per model (gate_scope=shared, called by the wrapper) or
    once per layer (gate_scope=layer, called by the layer).
    """

    static = True

    def __init__(self, num_tasks: int, num_experts: int, embedding_dim: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tasks, embedding_dim)
        self.proj = nn.Linear(embedding_dim, num_experts, bias=False)

    def weights(self, task_ids: Tensor) -> Tensor:
        if task_ids.dim() == 1:
            e = self.embedding(task_ids)
        else:
            present = (task_ids >= 0).unsqueeze(-1).to(self.embedding.weight.dtype)
            total = (self.embedding(task_ids.clamp(min=0)) * present).sum(1)
            e = total / present.sum(1).clamp(min=1)
        return self.proj(e).softmax(-1)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        return per_row(self.weights(routing.state.ids("task_ids", x.shape[0])), x)


class SharedTaskWeights(nn.Module):
    """moelora, gate_scope=shared: a layer's view of the weights the wrapper computed once."""

    static = True

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        weights = routing.state.task_weights
        if weights is None:
            raise ValueError(
                "moelora routes by task: pass task_ids to AdaptedModel.forward/generate."
            )
        return per_row(weights, x)


class TopKRouter(nn.Module):
    """molora/contrastive: logits = Linear(d_in -> E)(x) per token, keep the top k, softmax them.

    Records the Switch load-balancing loss (padding tokens excluded) while the state collects aux
    losses; a dense router (top_k = E), for which that loss is constant, records the importance
    loss (CV^2) instead, under the same `aux_loss_coef`.
    """

    static = False

    def __init__(self, d_in: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, num_experts)
        self.top_k = top_k

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        logits = self.proj(x.to(self.proj.weight.dtype)).float()
        top, chosen = logits.topk(self.top_k, dim=-1)
        g = torch.zeros_like(logits).scatter(-1, chosen, top.softmax(-1))
        state = routing.state
        if state.collect_aux and self.top_k < logits.shape[-1]:
            state.record("load_balance", load_balance_loss(logits, chosen, state.mask_for(x)))
        elif state.collect_aux and logits.shape[-1] > 1:  # dense: the Switch loss is constant
            state.record("importance", importance_loss(logits, state.mask_for(x)))
        return g


class DomainGate(nn.Module):
    """modula/modula_res: expert 0 is universal, experts 1..D belong to the domains.

    The stage picks the gate: `universal` -> only the universal expert; `domain` -> the row's
    domain expert (one-hot of domain_ids); `router`/None -> a token router over the candidates.
    modula routes over [universal, domains]; modula_res routes over the domains and keeps the
    universal expert always on (weight 1) as a residual.
    """

    def __init__(self, d_in: int, num_domains: int, residual: bool, top_k: int | None) -> None:
        super().__init__()
        candidates = num_domains if residual else num_domains + 1
        if top_k is not None and top_k > candidates:
            raise ValueError(
                f"method.router_top_k={top_k} exceeds the {candidates} candidates; lower it."
            )
        self.router = TopKRouter(d_in, candidates, top_k or candidates)
        self.num_domains, self.residual = num_domains, residual
        self.stage: str | None = None

    @property
    def static(self) -> bool:
        return self.stage in ("universal", "domain")

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        if self.stage == "universal":
            return F.one_hot(torch.tensor(0, device=x.device), self.num_domains + 1).float()
        if self.stage == "domain":
            domain = routing.state.ids("domain_ids", x.shape[0])
            g = F.one_hot(domain + 1, self.num_domains + 1).float()
            g[:, 0] = float(self.residual)
            return per_row(g, x)
        g = self.router(x, routing)
        return torch.cat([torch.ones_like(g[..., :1]), g], -1) if self.residual else g
