"""Packed rows attended one row at a time where flash-attention is absent (CPUs, sdpa on a GPU).

transformers keeps packed rows apart with a block-diagonal mask under sdpa, which computes every
score of a 1,024-token pack and, being an explicit mask, leaves sdpa's fused causal kernel. The
`moelora_rows` attention implementation instead cuts each sequence where its position ids restart
and runs that fused causal kernel on each row alone (what flash-attention's variable-length
kernel does on a GPU). Anything that is not a packed forward (a padding mask, decoding with a
cache, positions that do not start at 0) goes to transformers' own sdpa unchanged, so generation
and unpacked batches compute exactly what sdpa computes. Installed on bases that attend with
sdpa and have no sliding window or logit soft-capping, whose rules a plain causal kernel would
skip (`use_row_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROWS = "moelora_rows"


def row_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Causal attention of each row of a packed batch on its own; otherwise transformers'
    sdpa. query (batch, heads, seq, dim); rows start where `position_ids` is 0."""
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[2] == key.shape[2] == position_ids.shape[-1] > 1
        and bool((position_ids[:, 0] == 0).all())
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    dropout = dropout if module.training else 0.0
    sequences = [
        _rows_of(query[b : b + 1], key[b : b + 1], value[b : b + 1], positions, dropout, scaling)
        for b, positions in enumerate(position_ids.expand(query.shape[0], -1))
    ]
    return torch.cat(sequences).transpose(1, 2).contiguous(), None


def _rows_of(
    query: Tensor, key: Tensor, value: Tensor, positions: Tensor, dropout: float, scaling
) -> Tensor:
    """One packed sequence (1, heads, seq, dim): sdpa's fused causal kernel on each row."""
    starts = (positions == 0).nonzero().flatten().tolist()
    rows = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        for start, end in zip(starts, [*starts[1:], len(positions)], strict=True)
    ]
    return torch.cat(rows, dim=2)


def row_mask(*args, attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """No mask where there is no padding mask (`row_attention` cuts the rows itself, or the
    forward is plainly causal); sdpa's mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ROWS, row_attention)
AttentionMaskInterface.register(ROWS, row_mask)


def use_row_attention(base: PreTrainedModel) -> bool:
    """Switch a base that attends with sdpa, without sliding windows or soft-capping, to
    `moelora_rows`; returns whether it did."""
    config = base.config
    windowed = getattr(config, "sliding_window", None) and getattr(
        config, "use_sliding_window", True
    )
    capped = getattr(config, "attn_logit_softcapping", None)
    if config._attn_implementation != "sdpa" or windowed or capped:
        return False
    base.set_attn_implementation(ROWS)
    return True
