"""Model FLOPs utilisation (MFU) of a training step on a frozen base with adapters.

FLOPs per token of one training step (a multiply-add counts 2):
- forward: 2 N, where N counts the weights of every matmul: the frozen Linear layers with the
  LM head (a tied head once, the embedding lookup not) plus the trainable adapters and routers;
- backward, input gradients: 2 N. Adapters sit in every layer, so the gradient flows back
  through the whole frozen base and each matmul passes it on to its input;
- backward, weight gradients: 2 N_trainable only. A frozen weight needs no gradient.

So 4 N_frozen + 6 N_trainable. The usual 6 N (Kaplan et al.; PaLM's MFU) assumes full
fine-tuning: on a frozen base it would count 2 N_frozen of weight gradients that are never
computed and inflate MFU by half. Attention scores add 12 L w s per token for rows of s tokens
(L layers, w = heads x head dim: QK^T and AV forward, both inputs' gradients backward), counted
without the causal mask's saving, as PaLM counts them. Recomputation under gradient
checkpointing is not counted (model FLOPs, not hardware FLOPs). The first layer's frozen inputs
need no gradient, which the formula ignores (under 1/L of the attention projections).

MFU = tokens/s x FLOPs per token / the GPU's peak dense bf16 FLOP/s (no sparsity).
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

# Peak dense bf16 TFLOP/s by device name (NVIDIA's data sheets; sparsity's 2x not counted).
# The first entry whose key is in torch.cuda.get_device_name() applies.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 836.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The device's peak dense bf16 TFLOP/s, or None for a device not in the table (a CPU)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def matmul_weights(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable): the frozen Linear (or GPT-2 Conv1D) weights, a shared one once, and
    every trainable parameter. Count on an unquantized model: a 4-bit weight holds packed
    bytes, not its matrix's elements (a model built on the meta device costs nothing)."""
    weights = {
        id(module.weight): module.weight.numel()
        for module in model.modules()
        if isinstance(module, nn.Linear | Conv1D) and not module.weight.requires_grad
    }
    frozen = sum(weights.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return frozen, trainable


def attention_width(config) -> int:
    """Heads x head dim of a transformers config (the hidden size for most models)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def training_flops_per_token(
    frozen: int, trainable: int, layers: int = 0, width: int = 0, seq: int = 0
) -> float:
    """4 N_frozen + 6 N_trainable, plus 12 L w s for attention over rows of `seq` tokens."""
    return 4 * frozen + 6 * trainable + 12 * layers * width * seq


def flops_cells(tokens_per_second: float, flops_per_token: float, device_name: str) -> list[str]:
    """The table cells [model TFLOP/s, MFU]; MFU is n/a where the peak is unknown."""
    achieved = tokens_per_second * flops_per_token / 1e12
    peak = peak_tflops(device_name)
    return [f"{achieved:.3g}", f"{achieved / peak:.1%}" if peak else "n/a"]
