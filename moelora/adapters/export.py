"""Folding a fixed gate into plain weights: merged base models and standard PEFT LoRA adapters.

A gate that depends only on the task (lora, moelora) or the forced domain (modula in stage
`universal`/`domain`) is a constant per layer, so W_task = W + B_cat diag(expand(g * s)) A_cat.
Token-routed gates have no such constant and cannot be folded.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from moelora.adapters.layer import linear_dims
from moelora.adapters.model import AdaptedModel


@torch.no_grad()
def fixed_gates(
    model: AdaptedModel, task_id: int | None = None, domain_id: int | None = None
) -> dict[str, Tensor]:
    """Each adapted layer's gate weights (E,) for one task/domain.

    Raises:
        ValueError: a gate routes per token, or the task/domain id it needs is missing.
    """
    routed = [name for name, layer in model.adapted_layers.items() if not layer.gate.static]
    if routed:
        raise ValueError(
            f"{model.config.name} routes each token (e.g. {routed[0]}), so it cannot be folded "
            "into plain weights; only lora, moelora (per task) and modula in stage "
            "universal/domain (set_stage, per domain) can."
        )
    ids = [task_id] if task_id is not None else None
    domains = [domain_id] if domain_id is not None else None
    state = model.routing_state(ids, domains)
    gates = {}
    with model.routing.bind(state):
        for name, layer in model.adapted_layers.items():
            x = torch.zeros(1, 1, linear_dims(layer.base_layer)[0], device=layer.group(0)[0].device)
            gates[name] = layer.gate(x, model.routing).reshape(-1)
    return gates


@torch.no_grad()
def merge_adapter(
    model: AdaptedModel, task_id: int | None = None, domain_id: int | None = None
) -> PreTrainedModel:
    """Fold the adapter (for one task/domain) into the base weights; returns the plain base model.

    Consumes `model`: its base is modified in place and its adapted layers are unwrapped.
    """
    gates = fixed_gates(model, task_id, domain_id)
    base = model.base_model
    for name, layer in model.adapted_layers.items():
        base.set_submodule(name, layer.merge(gates[name]))
    model.adapted_layers = {}
    return base


def _lora_config(model: AdaptedModel, ranks: dict[str, int]):
    """PEFT's LoraConfig for layers of these ranks: the most common one as r, the others in
    rank_pattern (alpha = rank everywhere, so PEFT's scaling is 1)."""
    from peft import LoraConfig  # peft imports bitsandbytes and torch's compiler: seconds

    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): r for name, r in ranks.items() if r != rank}
    layers = model.adapted_layers.values()
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(ranks),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(isinstance(m.base_layer, Conv1D) for m in layers),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        base_model_name_or_path=getattr(model.base_model.config, "_name_or_path", None) or None,
    )


@torch.no_grad()
def export_peft_adapter(
    model: AdaptedModel,
    task_id: int | None,
    directory: str | Path,
    domain_id: int | None = None,
) -> None:
    """Write a standard PEFT LoRA adapter equal to `model` for one task/domain.

    Each layer becomes a LoRA of rank R = the summed ranks of its experts with g != 0, with
    A = A_cat and B = B_cat * expand(g * s) on those experts; lora_alpha = R makes PEFT's own
    scaling alpha / R equal to 1.
    Loadable with `peft.PeftModel.from_pretrained(base, directory)` without moelora.
    """
    gates = fixed_gates(model, task_id, domain_id)
    tensors, ranks = {}, {}
    for name, layer in model.adapted_layers.items():
        a, b = layer.folded(gates[name])
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
        ranks[name] = a.shape[0]
    config = _lora_config(model, ranks)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
