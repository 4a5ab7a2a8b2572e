"""The one adapted layer every method shares: a frozen Linear plus gated, stacked LoRA experts."""

from __future__ import annotations

import math
from itertools import accumulate, pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from moelora.adapters.routing import Routing


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or of GPT-2's Conv1D, whose weight is stored transposed
    (under deepspeed.zero.Init the weight is a partition; `ds_shape` is its full shape)."""
    if isinstance(module, Conv1D):
        shape = getattr(module.weight, "ds_shape", module.weight.shape)
        return shape[0], shape[1]
    return module.in_features, module.out_features


class GatedLoRALinear(nn.Module):
    """y = W x + sum_e g_e s_e B_e A_e dropout(x), computed as one fused rank-R product.

    With the experts stacked, A_cat = [A_1; ...; A_E] (R x d_in) and B_cat = [B_1 ... B_E]
    (d_out x R), R = sum_e r_e:

        y = W x + B_cat ( expand(g * s) * A_cat dropout(x) )

    where expand repeats expert e's weight over its r_e rows. The gate g (shape (..., E),
    broadcastable over tokens) is the only per-method part. Every expert's ranks are a slice of
    the same parameters and take part in every step (masked by default; with `gather`, only the
    chosen pairs are multiplied, and unchosen slices get zero gradients), which keeps ZeRO-3's
    parameter gathering static.

    Experts are stored in parameter groups (`lora_A_i`, `lora_B_i`) so that a training stage can
    freeze some experts and train others (MoDULA); most methods use a single group. They are
    registered on this module itself (not in a ParameterList) because ZeRO-3 gathers a module's
    own parameters when it runs.

    Args:
        base_layer: the frozen nn.Linear or Conv1D.
        ranks: r_e per expert.
        scales: s_e per expert.
        gate: module mapping (x, routing) to g.
        routing: the owning model's routing context.
        dropout: dropout on the adapter input.
        init: "kaiming" (PEFT's kaiming-uniform, a=sqrt(5)) or "normal" (std 0.01); B starts at 0.
        group_sizes: experts per parameter group; default one group.
        contrastive: optional aux loss on the experts' outputs, called with (rank_outputs, g,
            B_cat, state, x) while the routing state collects aux losses; rank_outputs(tokens)
            gives A_cat x of those flat token positions.
        gather: with a per-token gate, compute only the chosen (token, expert) pairs' ranks
            (`gathered`) instead of every expert's, masked.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: list[int],
        scales: list[float],
        gate: nn.Module,
        routing: Routing,
        dropout: float = 0.0,
        init: str = "kaiming",
        group_sizes: list[int] | None = None,
        contrastive: nn.Module | None = None,
        gather: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.gate = gate
        self.routing = routing
        self.contrastive = contrastive
        self.gather = gather
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ranks = list(ranks)
        d_in, d_out = linear_dims(base_layer)
        weight = base_layer.weight
        dtype = torch.float32
        if weight.is_floating_point():
            dtype = torch.promote_types(weight.dtype, torch.float32)
        group_sizes = group_sizes or [len(ranks)]
        bounds = pairwise([0, *accumulate(group_sizes)])
        group_ranks = [sum(ranks[start:end]) for start, end in bounds]
        self.num_groups = len(group_ranks)
        for i, r in enumerate(group_ranks):
            a, b = _new_pair(r, d_in, d_out, dtype, weight.device, init)
            self.register_parameter(f"lora_A_{i}", nn.Parameter(a))
            self.register_parameter(f"lora_B_{i}", nn.Parameter(b))
        expert_of_rank = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
        self.register_buffer("expert_of_rank", expert_of_rank.to(weight.device), persistent=False)
        scale = torch.tensor(scales, dtype=dtype, device=weight.device)
        self.register_buffer("expert_scale", scale, persistent=False)

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    def group(self, i: int) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) of parameter group i (for modula: group 0 universal, group d + 1 domain d)."""
        return getattr(self, f"lora_A_{i}"), getattr(self, f"lora_B_{i}")

    def stacked(self) -> tuple[Tensor, Tensor]:
        """(A_cat, B_cat) over all groups."""
        if self.num_groups == 1:
            return self.group(0)
        a, b = zip(*(self.group(i) for i in range(self.num_groups)), strict=True)
        return torch.cat(a, 0), torch.cat(b, 1)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        a, b = self.stacked()
        x_in = self.dropout(x.to(a.dtype))
        g = self.gate(x, self.routing)  # (..., E), broadcastable to x's leading dims
        flat = x_in.reshape(-1, x_in.shape[-1])
        if self.gather and g.shape[:-1] == x.shape[:-1]:
            delta = self.gathered(flat, g.reshape(-1, g.shape[-1]), a, b).view_as(result)

            def rank_outputs(tokens: Tensor) -> Tensor:
                return F.linear(flat[tokens], a)
        else:
            h = F.linear(x_in, a)  # (..., R): every expert's A x at once
            delta = F.linear(self.weighted(h, g), b)

            def rank_outputs(tokens: Tensor) -> Tensor:
                return h.reshape(-1, h.shape[-1])[tokens]

        if self.contrastive is not None and self.routing.state.collect_aux:
            self.contrastive(rank_outputs, g, b, self.routing.state, x)
        return result + delta.to(result.dtype)

    def gathered(self, x: Tensor, g: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """sum_e g_e s_e B_e A_e x over the (token, expert) pairs with g != 0 only: the pairs
        are sorted by expert, and each expert multiplies just its tokens (x: (N, d_in),
        g: (N, E)). Every expert's slice belongs to the one A_cat/B_cat parameter, so an expert
        that gets no token still has a (zero) gradient and ZeRO-3 sees the same parameters."""
        token, expert = g.nonzero(as_tuple=True)
        order = expert.argsort(stable=True)
        token, expert = token[order], expert[order]
        weight = (g[token, expert] * self.expert_scale[expert]).to(x.dtype)
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        starts = accumulate([0, *self.ranks])
        parts = []
        for rows, start, rank in zip(x[token].split(counts), starts, self.ranks, strict=False):
            if len(rows):
                ranks = slice(start, start + rank)
                parts.append(F.linear(F.linear(rows, a[ranks]), b[:, ranks]))
        out = torch.cat(parts) * weight[:, None]
        return x.new_zeros(len(x), b.shape[0]).index_add_(0, token, out)

    def weighted(self, h: Tensor, g: Tensor) -> Tensor:
        """h with each expert's ranks multiplied by g_e s_e. A per-token gate over experts of
        equal rank multiplies an (E, r) view of h (1.6x faster forward and backward than
        indexing g out to every rank, whose backward scatters); a per-row or constant gate is
        small, and indexing it out first is faster (measured on CPU)."""
        w = (g * self.expert_scale).to(h.dtype)
        rank = self.ranks[0]
        if w.shape[:-1] == h.shape[:-1] and all(r == rank for r in self.ranks):
            return (h.unflatten(-1, (self.num_experts, rank)) * w.unsqueeze(-1)).flatten(-2)
        return h * w[..., self.expert_of_rank]

    def folded(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """(A, B * expand(g * s)) over the experts with g != 0: a plain LoRA equal to this layer."""
        a, b = self.stacked()
        w = (g.reshape(-1) * self.expert_scale).to(b.dtype)[self.expert_of_rank]
        keep = w != 0
        return a[keep], (b * w)[:, keep]

    def merge(self, g: Tensor) -> nn.Module:
        """Fold the adapter for a fixed gate into the base weight and return the base layer."""
        a, b = self.folded(g)
        delta = b @ a
        weight = self.base_layer.weight
        if isinstance(self.base_layer, Conv1D):
            delta = delta.T
        with torch.no_grad():
            weight.add_(delta.to(weight.dtype))
        return self.base_layer


def _new_pair(
    rank: int, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device, init: str
) -> tuple[Tensor, Tensor]:
    """A fresh (A, B) of one parameter group: A random (`kaiming` as PEFT, or `normal`), B = 0,
    so the adapter starts as the identity on the base."""
    a = torch.empty(rank, d_in, dtype=dtype, device=device)
    if init == "normal":
        nn.init.normal_(a, std=0.01)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    return a, torch.zeros(d_out, rank, dtype=dtype, device=device)
