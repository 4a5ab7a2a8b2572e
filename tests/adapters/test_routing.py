"""Routing reaches every layer in generate() (greedy, beams, KV cache) and in recomputation."""

import copy

import pytest
import torch

from tests.adapters.adapter_cases import CASES, VOCAB, adapted

STEPS = 4


def prompts(rows: int = 3, length: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return dict(
        input_ids=torch.randint(1, VOCAB, (rows, length), generator=generator),
        task_ids=torch.tensor([0, 2, 1])[:rows],
        domain_ids=torch.tensor([1, 0, 2])[:rows],
    )


def greedy_by_forward(model, input_ids, **ids) -> torch.Tensor:
    """Batch-size-1 greedy decoding by full forwards, no cache."""
    with torch.no_grad():
        for _ in range(STEPS):
            logits = model(input_ids=input_ids, **ids).logits[:, -1]
            input_ids = torch.cat([input_ids, logits.argmax(-1, keepdim=True)], 1)
    return input_ids


def generate(model, input_ids, **kwargs):
    options = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0)
    return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs, **options)


@pytest.mark.parametrize("case", [*CASES, "modula-domain"])
def test_greedy_generate_with_cache_equals_per_row_forward(case):
    model = adapted(case.removesuffix("-domain"))
    if case.endswith("-domain"):
        model.set_stage("domain")
    inputs = prompts()
    out = generate(
        model, inputs["input_ids"], task_ids=inputs["task_ids"], domain_ids=inputs["domain_ids"]
    )
    for row in range(len(out)):
        ids = {k: inputs[k][row : row + 1] for k in ("task_ids", "domain_ids")}
        expected = greedy_by_forward(model, inputs["input_ids"][row : row + 1], **ids)
        assert out[row].tolist() == expected[0].tolist()


def test_generate_is_task_dependent_per_row():
    model = adapted("moelora")
    inputs = prompts()
    same = inputs["input_ids"][:1].expand(3, -1)
    with torch.no_grad():
        logits = model(input_ids=same, task_ids=torch.tensor([0, 1, 2])).logits[:, -1]
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])


@pytest.mark.parametrize("case", ["moelora", "moelora_layer_gate", "modula-domain"])
def test_beam_search_expands_ids_to_the_beams(case):
    model = adapted(case.removesuffix("-domain"))
    if case.endswith("-domain"):
        model.set_stage("domain")
    inputs = prompts()
    kwargs = dict(num_beams=3, num_return_sequences=2)
    out = generate(
        model,
        inputs["input_ids"],
        task_ids=inputs["task_ids"],
        domain_ids=inputs["domain_ids"],
        **kwargs,
    )
    for row in range(3):
        ids = {k: inputs[k][row : row + 1] for k in ("task_ids", "domain_ids")}
        alone = generate(model, inputs["input_ids"][row : row + 1], **ids, **kwargs)
        assert out[2 * row : 2 * row + 2].tolist() == alone.tolist()


def grads_after_step(model, inputs, seed=0):
    torch.manual_seed(seed)
    model.train()
    out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
    out.loss.backward()
    return {n: p.grad for n, p in model.named_adapter_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("enable", ["wrapper", "base"])
def test_gradient_checkpointing_gives_the_same_gradients(case, enable):
    model = adapted(case)
    checkpointed = copy.deepcopy(model)
    if enable == "wrapper":
        checkpointed.gradient_checkpointing_enable({"use_reentrant": False})
    else:
        checkpointed.base_model.activation_checkpointing_enable({"use_reentrant": False})
    inputs = prompts()
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    expected = grads_after_step(model, inputs)
    got = grads_after_step(checkpointed, inputs)
    assert checkpointed.base_model.is_activation_checkpointing
    assert got.keys() == expected.keys() and got
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_reentrant_checkpointing_is_refused_clearly():
    model = adapted("moelora")
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
