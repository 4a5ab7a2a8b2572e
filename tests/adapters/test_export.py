"""Merged weights and exported PEFT adapters reproduce the unmerged model for one task/domain."""

import pytest
import torch
from peft import PeftModel

from moelora.adapters import export_peft_adapter, merge_adapter
from tests.adapters.adapter_cases import adapted, batch, tiny_gpt2, tiny_llama

# (case, stage, task_id, domain_id, base builder, overrides)
FOLDABLE = [
    pytest.param("lora", None, None, None, tiny_llama, {}, id="lora"),
    pytest.param("moelora", None, 2, None, tiny_llama, {}, id="moelora-task2"),
    pytest.param("moelora_layer_gate", None, 1, None, tiny_llama, {}, id="moelora-layer-gate"),
    pytest.param(
        "moelora",
        None,
        1,
        None,
        tiny_llama,
        dict(target_modules=["up_proj", "down_proj"], dense_targets=["q_proj", "v_proj"]),
        id="moelora-dense-targets-mixed-ranks",
    ),
    pytest.param("modula_res", "domain", None, 2, tiny_llama, {}, id="modula_res-domain2"),
    pytest.param("modula", "universal", None, None, tiny_llama, {}, id="modula-universal"),
    pytest.param(
        "moelora", None, 0, None, tiny_gpt2, dict(target_modules=["c_attn", "c_fc"]), id="gpt2"
    ),
]


def reference(case, stage, task_id, domain_id, build, overrides):
    model = adapted(case, base=build(), **overrides)
    if stage is not None:
        model.set_stage(stage)
    inputs = batch()
    rows = len(inputs["input_ids"])
    ids = dict(
        task_ids=None if task_id is None else torch.full((rows,), task_id),
        domain_ids=None if domain_id is None else torch.full((rows,), domain_id),
    )
    plain = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        expected = model(**plain, **ids).logits
    return model, plain, expected


@pytest.mark.parametrize(("case", "stage", "task", "domain", "build", "overrides"), FOLDABLE)
def test_merged_weights_give_the_unmerged_output(case, stage, task, domain, build, overrides):
    model, plain, expected = reference(case, stage, task, domain, build, overrides)
    merged = merge_adapter(model, task_id=task, domain_id=domain)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**plain).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("case", "stage", "task", "domain", "build", "overrides"), FOLDABLE)
def test_exported_peft_adapter_gives_our_output(
    case, stage, task, domain, build, overrides, tmp_path
):
    model, plain, expected = reference(case, stage, task, domain, build, overrides)
    export_peft_adapter(model, task, tmp_path, domain_id=domain)
    peft_model = PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**plain).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["molora", "contrastive", "modula"])
def test_token_routed_methods_refuse_to_merge(case, tmp_path):
    with pytest.raises(ValueError, match="routes each token"):
        merge_adapter(adapted(case))
    with pytest.raises(ValueError, match="routes each token"):
        export_peft_adapter(adapted(case), None, tmp_path)


def test_moelora_merge_needs_a_task():
    with pytest.raises(ValueError, match="task_ids"):
        merge_adapter(adapted("moelora"))
