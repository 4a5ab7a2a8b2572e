"""Every model family moelora knows (moelora/adapters/families.py) with every method preset, on
tiny random-weight models built offline: the default targets are the family's attention and MLP
projections (read from the module tree, not from the table), a few training steps reach every
adapted layer, and a saved adapter reloads to the same logits. The same families through the
CLI: tests/test_family_runs.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moelora.adapters import (
    AdaptedModel,
    AdapterConfig,
    find_targets,
    load_adapter,
    method_config,
    save_adapter,
)
from moelora.adapters.families import FAMILIES
from tests.tiny_families import (
    METHODS,
    expected_targets,
    method_presets,
    one_thread,
    role_of,
    tiny_model,
)

FAMILY_TYPES = sorted(FAMILIES)
NUM_TASKS, NUM_DOMAINS = 3, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def presets() -> dict[str, AdapterConfig]:
    return method_presets()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_every_name_in_the_table_is_a_linear_of_the_family(model_type: str) -> None:
    model = tiny_model(model_type)
    linears = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for role, names in FAMILIES[model_type].items():
        assert set(names) <= linears, (role, names)
        assert all(role_of(model, p) == role for p, _ in _paths_named(model, names))


def _paths_named(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if p.rpartition(".")[2] in names]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_default_targets_are_the_familys_projections(model_type, method, presets) -> None:
    model = tiny_model(model_type)
    expected = expected_targets(model, presets[method])
    assert expected, "the preset names no role"
    assert find_targets(model, presets[method]) == expected


def test_another_familys_names_are_named_in_a_warning(capsys) -> None:
    llama_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = method_config({"name": "lora", "target_modules": llama_names})
    found = find_targets(tiny_model("glm4"), config)  # GLM fuses gate and up: gate_up_proj
    assert not any(path.endswith("gate_up_proj") for path in found)
    assert (
        "warning: method.target_modules names ['gate_proj', 'up_proj'], which no Linear of this "
        "model has (its Linear names: ['down_proj', 'gate_up_proj', 'k_proj', 'lm_head', "
        "'o_proj', 'q_proj', 'v_proj']); those are left out."
    ) in capsys.readouterr().out


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (2, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding, as in generation
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=input_ids.masked_fill(attention_mask == 0, -100),
        task_ids=torch.tensor([0, 2]),
        domain_ids=torch.tensor([1, 0]),
    )


def _train(model: AdaptedModel, batch: dict, steps: int) -> None:
    """A few AdamW steps; after the first backward every adapted layer has a gradient."""
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        model(**batch).loss.backward()
        if step == 0:
            for name, layer in model.adapted_layers.items():
                grads = [p.grad for n, p in layer.named_parameters() if n.startswith("lora_B")]
                assert any(g is not None and g.abs().sum() > 0 for g in grads), name
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_trains_saves_and_reloads(model_type, method, presets, tmp_path) -> None:
    model = AdaptedModel(tiny_model(model_type), presets[method], NUM_TASKS, NUM_DOMAINS)
    batch = _batch(model.base_model.config.vocab_size)
    _train(model, batch, steps=2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        plain = tiny_model(model_type)(inputs["input_ids"], inputs["attention_mask"]).logits
    assert not torch.allclose(trained, plain, atol=1e-4), "training changed nothing"
    save_adapter(model, tmp_path)
    reloaded, _ = load_adapter(tmp_path, tiny_model(model_type))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, trained)


def test_roles_on_an_unknown_model_type_name_the_fields_to_set(presets) -> None:
    from tests.adapters.adapter_cases import tiny_gpt2

    with pytest.raises(ValueError) as caught:  # molora: target_modules [mlp], dense [attention]
        AdaptedModel(tiny_gpt2(), presets["molora"], NUM_TASKS)
    assert str(caught.value) == (
        "method.dense_targets=['attention'] and method.target_modules=['mlp'] name the roles "
        "attention/mlp, which moelora knows only for the model types "
        f"{', '.join(FAMILY_TYPES)}, not for 'gpt2'; set method.dense_targets and "
        "method.target_modules to this model's Linear names instead (some of ['c_attn', "
        "'c_fc', 'c_proj', 'lm_head'])."
    )
