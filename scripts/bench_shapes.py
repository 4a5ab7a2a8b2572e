"""Qwen2.5 model shapes for the benchmarks, built from a transformers config with random weights.

No download: the dimensions are the published configs' (huggingface.co/Qwen/Qwen2.5-0.5B,
-1.5B and -7B, config.json), written out here so that a machine without network (the GPU
machine) builds the same architecture. Speed depends on the shape, not on the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # the LM head shares the embedding matrix


QWEN2_5 = {
    "0.5b": Shape(896, 4864, 24, 14, 2, 151936, tied=True),
    "1.5b": Shape(1536, 8960, 28, 12, 2, 151936, tied=True),
    "7b": Shape(3584, 18944, 28, 28, 4, 152064, tied=False),
}


def qwen_config(name: str, vocab: int | None = None) -> PretrainedConfig:
    """The transformers config of Qwen2.5-`name`, with another vocabulary size if given."""
    shape = QWEN2_5[name]
    return AutoConfig.for_model(
        "qwen2",
        vocab_size=vocab or shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
    )


def build_qwen(name: str, vocab: int | None = None, seed: int = 0) -> PreTrainedModel:
    """A seeded random Qwen2.5-`name` in fp32 on the CPU (callers cast and move it)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(qwen_config(name, vocab))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_dtype(name: str, device: str) -> torch.dtype:
    """`auto`: bf16 on a GPU, fp32 on a CPU (bf16 is emulated and slow there)."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return DTYPES[name]


def device_name(device: str) -> str:
    """The GPU's name (what mfu.py's peak table is keyed by), or the device type."""
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
