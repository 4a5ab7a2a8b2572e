"""Auxiliary losses of token-routed methods: Switch load balancing and the experts' InfoNCE."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora.adapters.precision import autocast_off
from moelora.adapters.routing import RoutingState


def token_weight(probs: Tensor, mask: Tensor | None) -> Tensor:
    """(N,) 1.0 on the tokens of probs (..., E) that count, 0.0 on padding: the mask as a
    weight, not an index (no host sync, no copy of the kept rows)."""
    if mask is None:
        return probs.new_ones(probs.shape[:-1].numel(), dtype=torch.float32)
    return mask.reshape(-1).float()


def load_balance_loss(probs: Tensor, chosen: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-style L = E * sum_i f_i P_i over the real (unmasked) tokens.

    f_i is the fraction of routed token slots (tokens x k) sent to expert i, P_i the mean
    full-softmax probability of expert i. L is 1 for a uniform router and E when one expert
    takes every token with certainty; only P carries gradient.

    Args:
        probs: the router's full softmax (..., E) (the router computes it once for g too).
        chosen: indices of the kept experts (..., k), distinct per token.
        mask: bool (...) with True on tokens that count, or None for all.
    """
    num_experts = probs.shape[-1]
    flat = probs.reshape(1, -1, num_experts)
    chosen = chosen.reshape(1, flat.shape[1], -1)
    return load_balance_losses(flat, chosen, token_weight(probs, mask)[None])[0]


def load_balance_losses(probs: Tensor, chosen: Tensor, weight: Tensor) -> Tensor:
    """`load_balance_loss` of L layers at once, as the router records it (one batched
    computation instead of a dozen small ops per layer): probs (L, N, E), chosen (L, N, k),
    weight (L, N) from `token_weight`. Returns (L,)."""
    num_experts = probs.shape[-1]
    probs = probs.float()
    slots = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
    weight = weight.to(probs.dtype).unsqueeze(-1)
    tokens = weight.sum(1).clamp(min=1)  # (L, 1)
    fraction = (slots * weight).sum(1) / (tokens * chosen.shape[-1])
    return num_experts * (fraction * (probs * weight).sum(1) / tokens).sum(-1)


def importance_loss(probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """The importance loss of dense routers (Shazeer et al. 2017): CV^2 of the experts'
    importance I_i = sum over real tokens of softmax(logits)_i, i.e. Var(I) / Mean(I)^2.

    It is 0 when every expert gets the same total weight and E - 1 when one expert takes it
    all. A router that keeps every expert (top_k = E) sends each token to all of them, so the
    Switch loss's fraction f_i is 1/E for every expert and that loss is the constant 1; this
    one still has a gradient.

    Args:
        probs: the router's softmax (..., E).
        mask: bool (...) with True on tokens that count, or None for all.
    """
    flat = probs.reshape(1, -1, probs.shape[-1])
    return importance_losses(flat, token_weight(probs, mask)[None])[0]


def importance_losses(probs: Tensor, weight: Tensor) -> Tensor:
    """`importance_loss` of L layers at once: probs (L, N, E), weight (L, N). Returns (L,)."""
    importance = (probs.float() * weight.to(torch.float32).unsqueeze(-1)).sum(1)  # (L, E)
    mean = importance.mean(-1)
    return importance.var(-1, unbiased=False) / mean.pow(2).clamp(min=1e-12)


def contrastive_losses(h: Tensor, gram: Tensor, experts: Tensor, tau: float) -> Tensor:
    """InfoNCE over the outputs o_m = B_e A_e x of routed (token, expert) pairs, for L layers
    at once: positives share the expert, negatives do not. For anchor a with positives P(a)
    (same expert, other pairs),

        loss_a = -mean_{p in P(a)} log( exp(c_ap / tau) / sum_{b != a} exp(c_ab / tau) )
               = logsumexp_{b != a}(c_ab / tau) - mean_{p in P(a)} c_ap / tau,

    c the cosine similarity of outputs, averaged over anchors that have a positive.

    Computed in rank space: with u_m = A_e x placed in expert e's slice of R = E * r ranks,
    o_m = B_cat u_m and o_a . o_b = u_a^T G u_b, G = B_cat^T B_cat. The pair matrix costs
    M^2 R instead of M^2 d_out, the positives' sums M E R (per-expert sums of the normalised
    u), so only the logsumexp touches all M^2 pairs; one batched matmul serves every layer.

    Args:
        h: (L, M, r) A_e x of each pair's token under its own expert (reused from the forward).
        gram: (L, R, R) B_cat^T B_cat of each layer, experts of equal rank r.
        experts: (L, M) the pair's expert.
        tau: temperature.

    Returns:
        (L,) the loss of each layer.
    """
    layers, num_pairs, rank = h.shape
    num_experts = gram.shape[-1] // rank
    same = F.one_hot(experts, num_experts).float()  # (L, M, E)
    u = (same[..., None] * h.float()[:, :, None, :]).flatten(2)  # h in its expert's slice
    projected = u @ gram.float()
    inverse_norm = (projected * u).sum(-1, keepdim=True).clamp(min=1e-24).rsqrt()  # eps^2
    right = u * inverse_norm  # normalised: c_ab / tau = left_a . right_b
    left = projected * (inverse_norm / tau)
    sim = left @ right.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # a pair is not its own negative
    count = (same @ same.sum(1, keepdim=True).transpose(1, 2)).squeeze(-1) - 1  # (L, M)
    positives = (left * (same @ (same.transpose(1, 2) @ right))).sum(-1)
    positives = positives - (left * right).sum(-1)
    per_anchor = sim.logsumexp(dim=-1) - positives / count.clamp(min=1)
    has_positive = (count > 0).float()
    return (per_anchor * has_positive).sum(-1) / has_positive.sum(-1).clamp(min=1)


def routed_contrastive_losses(
    h: Tensor, gate: Tensor, gram: Tensor, top_k: int, tau: float
) -> Tensor:
    """`contrastive_losses` of L layers from each layer's sampled tokens: h (L, T, R) their rank
    outputs A_cat x, gate (L, T, E) their gate weights, gram (L, R, R). Each token becomes k
    pairs, one per expert in its top k; one top-k and one gather serve every layer."""
    layers, tokens, ranks = h.shape
    num_experts = gate.shape[-1]
    experts = gate.topk(top_k, dim=-1).indices  # (L, T, k)
    per_expert = h.view(layers, tokens, num_experts, ranks // num_experts)
    index = experts[..., None].expand(-1, -1, -1, per_expert.shape[-1])
    pairs = per_expert.gather(2, index)  # (L, T, k, r)
    return contrastive_losses(pairs.flatten(1, 2), gram, experts.flatten(1), tau)


class ExpertContrastive(nn.Module):
    """Records one layer's routed pairs for the contrastive loss: the tokens the routing state
    sampled for this forward (at most `max_tokens` real ones, the same in every layer), each
    under its top-k experts. The loss itself is computed for all layers at once
    (`routed_contrastive_losses`) when the forward ends."""

    def __init__(self, num_experts: int, top_k: int, tau: float, max_tokens: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.tau, self.max_tokens = tau, max_tokens

    def forward(
        self,
        rank_outputs: Callable[[Tensor], Tensor],
        g: Tensor,
        b: Tensor,
        state: RoutingState,
        x: Tensor,
    ) -> None:
        tokens = state.sample_tokens(x, self.max_tokens)
        gate = g.detach().reshape(-1, self.num_experts)[tokens]  # only its top k are used
        with autocast_off(b.device):  # here, while ZeRO-3 has B gathered
            gram = b.float().T @ b.float()
        losses = partial(routed_contrastive_losses, top_k=self.top_k, tau=self.tau)
        state.record_batched("contrastive", losses, rank_outputs(tokens), gate, gram)
