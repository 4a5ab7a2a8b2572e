"""What computes in fp32 under mixed precision, whatever the autocast around the forward.

Under `hardware.mixed_precision=bf16|fp16` accelerate runs the forward inside `torch.autocast`,
which would compute every Linear, and so a gate's logits, in half precision. Routing decisions
(softmax, top-k) and the aux losses are small and sensitive: a bf16 logit has 3 significant
digits, enough to flip a top-k near a tie and to bias a load-balancing loss. So gates and routers
compute their logits, softmax and top-k in fp32, and the aux losses are reduced in fp32. The
experts' fused product itself follows the autocast (fp32 weights, half-precision matmuls), as
PEFT's LoRA layers do with `autocast_adapter_dtype=True`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """No autocast on `device` inside the block (a no-op where the device has none)."""
    if not torch.amp.is_autocast_available(device.type):
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield


class Fp32Linear(nn.Linear):
    """A gate's Linear: computes in fp32 whatever the autocast and whatever its weights' dtype
    (DeepSpeed's bf16 mode casts every parameter, gates included, to bf16 and keeps fp32 master
    weights in its optimizer). The weights are read in its own forward, where ZeRO-3 has
    gathered them."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        with autocast_off(x.device):
            return F.linear(x.float(), self.weight.float(), bias)
