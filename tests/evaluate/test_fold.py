"""Folded generation: static gates generate through the base weights, with the same greedy
answers as through the adapter, and the base weights come back bitwise."""

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset

from moelora.adapters import GatedLoRALinear
from moelora.adapters.fold import folding
from moelora.evaluate.generate import generate_answers
from tests.adapters.adapter_cases import NUM_TASKS, VOCAB, adapted


class IdTokenizer:
    """Decodes token ids as their numbers: enough to compare answers."""

    pad_token_id = 0
    eos_token_id = VOCAB - 1

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(str(int(t)) for t in row if t != self.pad_token_id) for row in sequences]


def eval_rows(count: int = 11) -> Dataset:
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(3, 9, (count,), generator=generator).tolist()
    return Dataset.from_dict(
        {
            "prompt_ids": [
                torch.randint(1, VOCAB - 1, (n,), generator=generator).tolist() for n in lengths
            ],
            "task_ids": [i % NUM_TASKS for i in range(count)],
            "domain_ids": [(i + 1) % NUM_TASKS for i in range(count)],
        }
    )


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.base_model.state_dict().items()}


def adapter_calls(model) -> list[int]:
    """A counter that grows each time an adapted layer runs."""
    calls = [0]
    for module in model.modules():
        if isinstance(module, GatedLoRALinear):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("case", ["lora", "moelora", "moelora_layer_gate", "modula-domain"])
def test_folded_generation_equals_the_adapter_and_restores_the_weights(case):
    model = adapted(case.removesuffix("-domain"))
    if case.endswith("-domain"):
        model.set_stage("domain")
    rows, tokenizer, accelerator = eval_rows(), IdTokenizer(), Accelerator(cpu=True)
    before = base_weights(model)
    calls = adapter_calls(model)
    unfolded = generate_answers(model, tokenizer, rows, 4, 6, accelerator, fold=False)
    assert calls[0] > 0
    calls[0] = 0
    folded = generate_answers(model, tokenizer, rows, 4, 6, accelerator, fold=True)
    assert calls[0] == 0  # every row generated through plain Linears
    assert folded == unfolded
    after = base_weights(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert all(isinstance(m, GatedLoRALinear) for m in model.adapted_layers.values())
    assert generate_answers(model, tokenizer, rows, 4, 6, accelerator, fold=False) == unfolded


def test_token_routed_adapters_generate_unfolded():
    model = adapted("molora")
    calls = adapter_calls(model)
    answers = generate_answers(model, IdTokenizer(), eval_rows(), 4, 6, Accelerator(cpu=True))
    assert calls[0] > 0 and len(answers) == len(eval_rows())


def test_folding_restores_the_weights_when_generation_fails():
    model = adapted("moelora")
    before = base_weights(model)
    weight = next(iter(model.adapted_layers.values())).base_layer.weight
    original = weight.clone()
    with pytest.raises(RuntimeError, match="out of memory"), folding(model) as fold:
        fold(1)
        fold(2)
        assert not torch.equal(weight, original)  # folded in place
        raise RuntimeError("out of memory")
    for name, tensor in base_weights(model).items():
        assert torch.equal(tensor, before[name]), name
