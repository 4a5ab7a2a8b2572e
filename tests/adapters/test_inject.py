"""Injection by suffix or regex into Llama and GPT-2 (Conv1D), and the no-match error."""

import pytest
import torch

from moelora.adapters import AdaptedModel, GatedLoRALinear, find_targets
from tests.adapters.adapter_cases import (
    NUM_TASKS,
    adapted,
    batch,
    make_config,
    tiny_gpt2,
    tiny_llama,
)


def test_suffix_match_wraps_every_targeted_linear_and_freezes_the_base():
    model = AdaptedModel(tiny_llama(), make_config("lora"), NUM_TASKS)
    names = sorted(model.adapted_layers)
    assert len(names) == 2 * 7 and "model.layers.1.mlp.down_proj" in names
    assert all(isinstance(m, GatedLoRALinear) for m in model.adapted_layers.values())
    assert not any(p.requires_grad for p in model.base_model.lm_head.parameters())


def test_regex_replaces_target_modules():
    config = make_config("lora", target_regex=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    assert sorted(find_targets(tiny_llama(), config)) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def test_dense_targets_get_plain_lora_beside_routed_experts():
    model = adapted("molora")
    layers = model.adapted_layers
    assert layers["model.layers.0.self_attn.q_proj"].num_experts == 1
    assert layers["model.layers.0.mlp.up_proj"].num_experts == 4


@pytest.mark.parametrize("case", ["lora", "moelora", "molora"])
def test_gpt2_conv1d_targets(case):
    overrides = dict(target_modules=["c_attn", "c_proj", "c_fc"], dense_targets=[])
    model = adapted(case, base=tiny_gpt2(), **overrides)
    assert len(model.adapted_layers) == 2 * 4  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    plain = tiny_gpt2()
    inputs = batch()
    out = model(**inputs).logits
    reference = plain(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert out.shape == reference.shape and not torch.allclose(out, reference)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_no_match_lists_the_linear_names():
    with pytest.raises(ValueError, match=r"target_modules.*'down_proj'.*'lm_head'.*'q_proj'"):
        AdaptedModel(tiny_llama(), make_config("lora", target_modules=["query_key_value"]), 1)
