"""The table of methods every generic adapter test runs through, and tiny offline models."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from moelora.adapters import AdaptedModel, AdapterConfig, method_config

VOCAB = 128
NUM_TASKS = 3
NUM_DOMAINS = 3

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# name -> AdapterConfig fields (dropout is 0 everywhere so outputs are deterministic)
CASES: dict[str, dict] = {
    "lora": dict(name="lora", rank_per_expert=4),
    "moelora": dict(name="moelora", num_experts=4, total_rank=8, init="normal"),
    "moelora_layer_gate": dict(name="moelora", num_experts=4, total_rank=8, gate_scope="layer"),
    "molora": dict(
        name="molora",
        target_modules=MLP,
        dense_targets=ATTENTION,
        num_experts=4,
        top_k=2,
        rank_per_expert=4,
        alpha=16,
        scaling_rank="expert",
    ),
    "contrastive": dict(name="contrastive", num_experts=4, total_rank=8, top_k=2),
    "modula": dict(name="modula", universal_rank=4, domain_rank=2, router_top_k=2),
    "modula_res": dict(name="modula_res", universal_rank=4, domain_rank=2),
}
TOKEN_ROUTED = {"molora", "contrastive", "modula", "modula_res"}
# Overrides that make a case's token routers keep every expert (no hard top-k): routing that is
# continuous in the router's input, for comparisons across precisions (tests/test_precision.py).
DENSE_ROUTING = {
    "molora": {"top_k": 4},
    "contrastive": {"top_k": 4},
    "modula": {"router_top_k": None},
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def make_config(case: str, **overrides) -> AdapterConfig:
    return method_config({"dropout": 0.0, **CASES[case], **overrides})


def randomize_adapters(model: AdaptedModel, seed: int = 1, std: float = 0.05) -> AdaptedModel:
    """B starts at 0, which would make every adapter test trivially pass: give it values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_adapter_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def adapted(case: str, base=None, **overrides) -> AdaptedModel:
    base = tiny_llama() if base is None else base
    model = AdaptedModel(base, make_config(case, **overrides), NUM_TASKS, NUM_DOMAINS)
    return randomize_adapters(model).eval()


def batch(rows: int = 2, length: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    """Input ids, a left-padded attention mask, and per-row task/domain ids."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1:, :2] = 0
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        task_ids=torch.arange(rows) % NUM_TASKS,
        domain_ids=(torch.arange(rows) + 1) % NUM_DOMAINS,
    )
