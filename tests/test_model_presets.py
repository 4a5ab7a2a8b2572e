"""The model presets (configs/model/) of real checkpoints: each composes into a valid config, and
every method preset's targets exist in a tiny twin of the checkpoint's family, built offline
(the same transformers model_type, so the same module tree)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from moelora.adapters import find_targets
from moelora.adapters.families import FAMILIES
from moelora.config import TrainConfig
from moelora.paths import CONFIG_DIR
from tests.conftest import compose_config
from tests.tiny_families import expected_targets, method_presets, tiny_model

# Each preset and the model_type of its checkpoint's config.json (as the hub serves it).
PRESET_TYPES = {
    "qwen2.5-0.5b-instruct": "qwen2",
    "qwen2.5-1.5b-instruct": "qwen2",
    "qwen2.5-7b-instruct": "qwen2",
    "qwen3-0.6b": "qwen3",
    "qwen3-1.7b": "qwen3",
    "qwen3-8b": "qwen3",
    "glm-4-9b-chat-hf": "glm",
    "llama3-8b-instruct": "llama",
}
OFFLINE = ("tiny", "demo_base")  # built from a config, or shipped in data/


def test_every_checkpoint_preset_has_its_family() -> None:
    shipped = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")} - set(OFFLINE)
    assert shipped == set(PRESET_TYPES)
    assert set(PRESET_TYPES.values()) <= set(FAMILIES)


@pytest.mark.parametrize("preset", sorted(PRESET_TYPES))
def test_preset_composes_and_says_its_model_type(preset: str, tmp_path) -> None:
    typed = OmegaConf.to_object(compose_config("train", [f"model={preset}"], tmp_path))
    assert isinstance(typed, TrainConfig)
    assert typed.model.name == preset and "/" in typed.model.name_or_path
    assert not typed.model.trust_remote_code
    text = (CONFIG_DIR / "model" / f"{preset}.yaml").read_text(encoding="utf-8")
    assert f"model_type {PRESET_TYPES[preset]}" in text  # the comment a user reads


@pytest.mark.parametrize("model_type", sorted(set(PRESET_TYPES.values())))
def test_every_method_finds_its_targets_in_the_tiny_twin(model_type: str) -> None:
    torch.manual_seed(0)
    twin = tiny_model(model_type)
    for method, config in method_presets().items():
        expected = expected_targets(twin, config)
        assert expected and find_targets(twin, config) == expected, method
