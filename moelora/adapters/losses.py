"""Auxiliary losses of token-routed methods: Switch load balancing and the experts' InfoNCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelora.adapters.routing import RoutingState


def load_balance_loss(logits: Tensor, chosen: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-style L = E * sum_i f_i P_i over the real (unmasked) tokens.

    f_i is the fraction of routed token slots (tokens x k) sent to expert i, P_i the mean
    full-softmax probability of expert i. L is 1 for a uniform router and E when one expert
    takes every token with certainty; only P carries gradient.

    Args:
        logits: router logits (..., E).
        chosen: indices of the kept experts (..., k).
        mask: bool (...) with True on tokens that count, or None for all.
    """
    num_experts = logits.shape[-1]
    probs = logits.float().softmax(-1).reshape(-1, num_experts)
    chosen = chosen.reshape(-1, chosen.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        probs, chosen = probs[keep], chosen[keep]
    counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).to(probs.dtype)
    fraction = counts / chosen.numel()
    return num_experts * (fraction * probs.mean(0)).sum()


def expert_contrastive_loss(outputs: Tensor, experts: Tensor, tau: float) -> Tensor:
    """InfoNCE over expert outputs: positives share the expert, negatives come from others.

    For anchor a with positives P(a) (same expert, other tokens):
    loss_a = -mean_{p in P(a)} log( exp(z_a.z_p / tau) / sum_{b != a} exp(z_a.z_b / tau) ),
    with z the L2-normalised outputs; averaged over anchors that have a positive.

    Args:
        outputs: (M, d_out) outputs o = B_i A_i x of routed (token, expert) pairs.
        experts: (M,) which expert produced each output.
        tau: temperature.
    """
    z = F.normalize(outputs.float(), dim=-1)
    itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = (z @ z.T / tau).masked_fill(itself, float("-inf"))
    log_prob = sim - sim.logsumexp(dim=1, keepdim=True)
    positive = (experts[:, None] == experts[None, :]) & ~itself
    count = positive.sum(1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(1) / count.clamp(min=1)
    has_positive = count > 0
    if not has_positive.any():
        return outputs.sum() * 0.0
    return per_anchor[has_positive].mean()


class ExpertContrastive(nn.Module):
    """Records the contrastive loss of one layer on at most `max_tokens` sampled real tokens."""

    def __init__(self, num_experts: int, tau: float, max_tokens: int) -> None:
        super().__init__()
        self.num_experts, self.tau, self.max_tokens = num_experts, tau, max_tokens

    def forward(self, h: Tensor, g: Tensor, b: Tensor, state: RoutingState, x: Tensor) -> None:
        num = self.num_experts
        h, g = h.reshape(-1, h.shape[-1]), g.reshape(-1, num)
        mask = state.mask_for(x)
        tokens = torch.arange(len(h), device=h.device)
        if mask is not None:
            tokens = tokens[mask.reshape(-1).bool()]
        tokens = tokens[torch.randperm(len(tokens), device=h.device)[: self.max_tokens]]
        rank = h.shape[-1] // num
        per_expert = torch.einsum(  # o[n, e] = B_e A_e x_n for the sampled tokens
            "ner,oer->neo", h[tokens].view(-1, num, rank), b.view(b.shape[0], num, rank)
        )
        token, expert = (g[tokens] > 0).nonzero(as_tuple=True)
        state.record(
            "contrastive", expert_contrastive_loss(per_expert[token, expert], expert, self.tau)
        )
