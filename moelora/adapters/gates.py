"""The gates: the only per-method code. Each maps (x, routing) to weights over a layer's experts.

A gate returns g of shape (..., E) that broadcasts over x's leading dims: (E,) for a constant gate,
(batch, 1, E) for a per-row gate, (batch, seq, E) for a token router; always in fp32, its logits,
softmax and top-k too, under any autocast (`moelora.adapters.precision`). `static` says whether g is
fixed once the row's task/domain is known, i.e. whether the layer can be merged into W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora.adapters.losses import importance_losses, load_balance_losses, token_weight
from moelora.adapters.precision import Fp32Linear
from moelora.adapters.routing import Routing, RoutingState, expand_rows


def per_row(weights: Tensor, x: Tensor, state: RoutingState) -> Tensor:
    """(rows, E) row weights, shaped to broadcast over x's tokens: (batch, 1, ..., E) for a
    batch of rows, each token's row's weights (packs, seq, E) for a packed batch."""
    if state.segments is not None:
        return state.rows_to_tokens(weights, x)
    weights = expand_rows(weights, x.shape[0], "the gate's task/domain ids")
    return weights.view(weights.shape[0], *([1] * (x.dim() - 2)), weights.shape[-1])


class UnitGate(nn.Module):
    """lora (and dense targets): one expert, g = 1."""

    static = True

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        return x.new_ones(1, dtype=torch.float32)


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
        self.proj = Fp32Linear(embedding_dim, num_experts, bias=False)

    def weights(self, task_ids: Tensor) -> Tensor:
        if task_ids.dim() == 1:
            e = self.embedding(task_ids)
        else:
            present = (task_ids >= 0).unsqueeze(-1).to(self.embedding.weight.dtype)
            total = (self.embedding(task_ids.clamp(min=0)) * present).sum(1)
            e = total / present.sum(1).clamp(min=1)
        return self.proj(e).softmax(-1)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        state = routing.state
        return per_row(self.weights(state.ids("task_ids", x.shape[0])), x, state)


class SharedTaskWeights(nn.Module):
    """moelora, gate_scope=shared: a layer's view of the weights the wrapper computed once."""

    static = True

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        weights = routing.state.task_weights
        if weights is None:
            raise ValueError(
                "moelora routes by task: pass task_ids to AdaptedModel.forward/generate."
            )
        return per_row(weights, x, routing.state)


class TopKRouter(nn.Module):
    """molora/contrastive: logits = Linear(d_in -> E)(x) per token, keep the top k, softmax them.

    Records the Switch load-balancing loss (padding tokens excluded) while the state collects aux
    losses; a dense router (top_k = E), for which that loss is constant, records the importance
    loss (CV^2) instead, under the same `aux_loss_coef`. Both are computed for all layers at
    once when the forward ends (`RoutingState.record_batched`).
    """

    static = False

    def __init__(self, d_in: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.proj = Fp32Linear(d_in, num_experts)
        self.top_k = top_k

    def logits(self, x: Tensor) -> Tensor:
        return self.proj(x)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        return self.route(self.logits(x), routing.state, routing.state.mask_for(x))

    def route(self, logits: Tensor, state: RoutingState, mask: Tensor | None) -> Tensor:
        """g from the logits (..., E): the top k softmaxed, the rest 0; records the balance
        loss over the unmasked positions. One softmax serves g and the loss: the softmax of
        the top k logits is the full softmax's top k renormalised."""
        probs = logits.softmax(-1)
        num_experts = probs.shape[-1]
        dense = self.top_k == num_experts  # every expert gets every token: the Switch loss is 1
        if dense:
            g = probs
        else:
            top, chosen = probs.topk(self.top_k, dim=-1)
            g = torch.zeros_like(probs).scatter(-1, chosen, top / top.sum(-1, keepdim=True))
        if state.collect_aux and num_experts > 1:
            flat = probs.reshape(-1, num_experts)
            weight = token_weight(probs, mask)
            if dense:
                state.record_batched("importance", importance_losses, flat, weight)
            else:
                chosen = chosen.reshape(len(flat), -1)
                state.record_batched("load_balance", load_balance_losses, flat, chosen, weight)
        return g


# MoDULA's training stages, in order, named once: the gate's behaviour depends on them.
UNIVERSAL, DOMAIN, ROUTER_WARMUP, ROUTER = "universal", "domain", "router_warmup", "router"
MODULA_STAGES = (UNIVERSAL, DOMAIN, ROUTER_WARMUP, ROUTER)
ROUTER_STAGES = (ROUTER_WARMUP, ROUTER)  # only the router trains


class DomainGate(nn.Module):
    """modula/modula_res: expert 0 is universal, experts 1..D belong to the domains.

    The stage picks the gate: `universal` -> only the universal expert; `domain` -> the row's
    domain expert (one-hot of domain_ids), and so does `router_warmup` while its router learns
    the domains (`warm_up`); `router` and None -> the router over the candidates. modula routes
    over [universal, domains]; modula_res routes over the domains and keeps the universal expert
    always on (weight 1) as a residual.

    `router_input="token"` routes each token from its own input (the paper's reading);
    `"prompt"` routes each row once, from the mean input of its prompt tokens, and keeps those
    weights for the tokens it generates.
    """

    def __init__(
        self,
        d_in: int,
        num_domains: int,
        residual: bool,
        top_k: int | None,
        router_input: str = "token",
    ) -> None:
        super().__init__()
        candidates = num_domains if residual else num_domains + 1
        if top_k is not None and top_k > candidates:
            raise ValueError(
                f"method.router_top_k={top_k} exceeds the {candidates} candidates; lower it."
            )
        self.router = TopKRouter(d_in, candidates, top_k or candidates)
        self.num_domains, self.residual, self.router_input = num_domains, residual, router_input
        self.stage: str | None = None

    @property
    def static(self) -> bool:
        return self.stage in (UNIVERSAL, DOMAIN, ROUTER_WARMUP)

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        state = routing.state
        if self.stage == UNIVERSAL:
            return F.one_hot(torch.tensor(0, device=x.device), self.num_domains + 1).float()
        if self.stage in (DOMAIN, ROUTER_WARMUP):
            if self.stage == ROUTER_WARMUP:
                self.warm_up(x, state)
            domain = state.ids("domain_ids", x.shape[0])
            g = F.one_hot(domain + 1, self.num_domains + 1).float()
            g[:, 0] = float(self.residual)
            return per_row(g, x, state)
        g = self.row_route(x, state) if self.router_input == "prompt" else self.router(x, routing)
        return torch.cat([torch.ones_like(g[..., :1]), g], -1) if self.residual else g

    def row_route(self, x: Tensor, state: RoutingState) -> Tensor:
        """(batch, 1, candidates): one routing per row from its prompt's mean input, kept in
        the state for the decoding steps that follow."""
        pooled = state.prompt_mean(x)
        if pooled is None:
            kept = state.row_gates.get(id(self))
            if kept is None:
                raise ValueError(
                    "method.router_input=prompt routes each row from its whole prompt: run "
                    "the prompt through AdaptedModel.forward/generate with its attention_mask."
                )
            return per_row(kept, x, state)
        g = self.router.route(self.router.logits(pooled), state, None)
        state.row_gates[id(self)] = g
        return per_row(g, x, state)

    def warm_up(self, x: Tensor, state: RoutingState) -> None:
        """`router_warmup` routes like `domain` (the stage-2 assignment) and trains the router
        on the side: `router_supervision`, the cross-entropy of its logits (per row, or per
        real token) against the row's domain candidate (modula's universal expert is 0)."""
        if not state.collect_aux:
            return
        mask = None
        if self.router_input == "prompt":
            pooled = state.prompt_mean(x)
            if pooled is None:
                return
            logits = self.router.logits(pooled)
        else:
            logits, mask = self.router.logits(x), state.mask_for(x)
        target = state.ids("domain_ids", x.shape[0]) + (0 if self.residual else 1)
        if logits.dim() == 3:
            target = state.rows_to_tokens(target, x)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        weight = torch.ones_like(loss) if mask is None else mask.reshape(-1).to(loss.dtype)
        state.record("router_supervision", (loss * weight).sum() / weight.sum().clamp(min=1))
