"""Method configs: the shipped presets validate with paper defaults; bad configs fail clearly."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moelora.adapters import AdapterConfig, get_method, method_config, method_names

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "method"


def load_preset(name: str, **overrides) -> AdapterConfig:
    preset = OmegaConf.load(PRESETS / f"{name}.yaml")
    preset.pop("defaults")
    schema = OmegaConf.structured(get_method(name).config_class)
    return OmegaConf.to_object(OmegaConf.merge(schema, preset, overrides))


@pytest.mark.parametrize("name", method_names())
def test_every_method_has_a_valid_preset(name):
    config = load_preset(name)
    assert type(config) is get_method(name).config_class and config.name == name


def test_presets_keep_the_papers_values():
    lora = load_preset("lora")
    assert (lora.total_rank, lora.alpha, lora.dropout, lora.init) == (8, 32, 0.1, "kaiming")
    moelora = load_preset("moelora")
    assert (moelora.num_experts, moelora.rank_per_expert, moelora.total_rank) == (8, 2, 16)
    assert moelora.expert_scaling == 32 / 16 and moelora.init == "normal"
    assert moelora.gate_scope == "shared" and moelora.task_embedding_dim == 64
    molora = load_preset("molora")
    assert (molora.num_experts, molora.top_k, molora.rank_per_expert) == (4, 2, 32)
    assert molora.expert_scaling == 16 / 32 and molora.aux_loss_coef == 0.01
    contrastive = load_preset("contrastive")
    assert (contrastive.contrastive_tau, contrastive.contrastive_coef) == (0.1, 0.01)
    assert contrastive.contrastive_tokens == 64
    modula = load_preset("modula")
    assert modula.stages == ["universal", "domain", "router_warmup"]
    assert modula.router_input == "prompt"


def test_overriding_num_experts_rederives_the_rank_split():
    assert load_preset("moelora", num_experts=4).rank_per_expert == 4


@pytest.mark.parametrize(
    ("scaling_rank", "universal", "domain"), [("expert", 32 / 8, 32 / 2), ("total", 3.2, 3.2)]
)
def test_modula_scales_each_expert_by_its_rank_or_by_a_rows_rank(scaling_rank, universal, domain):
    config = method_config(
        dict(name="modula", universal_rank=8, domain_rank=2, alpha=32, scaling_rank=scaling_rank)
    )
    parts = get_method("modula")(config).layer_parts(d_in=16, num_tasks=3, num_domains=3)
    assert parts.ranks == [8, 2, 2, 2]
    assert parts.scales == pytest.approx([universal] + [domain] * 3)


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        (dict(name="moelorra"), "name"),
        (dict(name="moelora", num_experts=3, total_rank=16), "total_rank"),
        (dict(name="moelora", num_experts=4, total_rank=16, rank_per_expert=2), "rank_per_expert"),
        (dict(name="molora", num_experts=4, rank_per_expert=8, top_k=5), "top_k"),
        (dict(name="lora", num_experts=2, rank_per_expert=8), "num_experts"),
        (dict(name="lora", rank_per_expert=8, init="xavier"), "init"),
        (dict(name="lora", rank_per_expert=8, dropout=1.0), "dropout"),
        (dict(name="lora", rank_per_expert=8, stages=["universal"]), "stages"),
        (dict(name="modula", stages=["universal", "experts"]), "stages"),
        (dict(name="modula", scaling_rank="row"), "scaling_rank"),
        (dict(name="lora", rank_per_expert=8, target_modules=[]), "target_modules"),
    ],
)
def test_bad_config_names_the_field(fields, names):
    with pytest.raises(ValueError, match=names):
        method_config(fields)


def test_bad_preset_override_fails_at_to_object():
    with pytest.raises(ValueError, match="top_k"):
        load_preset("molora", top_k=8)


def test_coerce_accepts_a_hydra_node_and_refuses_unknown_keys():
    node = OmegaConf.load(PRESETS / "moelora.yaml")
    assert method_config(node) == load_preset("moelora")
    with pytest.raises(ValueError, match="num_expert"):
        method_config({"name": "moelora", "num_expert": 4})
