"""Tiny random-weight checkpoints of each model family, built offline from transformers configs
with the shipped tokenizer's vocabulary and saved like a downloaded checkpoint; the shipped
method presets; and which Linears a preset should adapt, read from the module tree."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from moelora.adapters import AdapterConfig, method_config
from moelora.paths import CONFIG_DIR, DATA_DIR

TOKENIZER = DATA_DIR / "tokenizer"
CUSTOM_CODE = Path(__file__).parent / "data" / "custom_code_model"
# 2 layers of width 64; head_dim is set because several families default it to 128 or 256.
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy CPU their synchronisation
    makes each step many times slower (as in tests/adapters/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


@functools.cache
def method_presets() -> dict[str, AdapterConfig]:
    """Each shipped method preset (configs/method/), dropout off so outputs are deterministic."""
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    composed = {}
    for method in METHODS:
        node = compose_config("train", [f"method={method}", "method.dropout=0"]).method
        composed[method] = method_config(OmegaConf.to_container(node, resolve=True))
    return composed


def role_of(model: nn.Module, path: str) -> str | None:
    """The role a Linear plays, from the class of the block that holds it (LlamaAttention,
    Phi3MLP, GlmMLP, ...): independent of moelora's table."""
    holder = type(model.get_submodule(path.rpartition(".")[0])).__name__
    roles = {"Attention": "attention", "MLP": "mlp"}
    return next((role for end, role in roles.items() if holder.endswith(end)), None)


def expected_targets(model: nn.Module, config: AdapterConfig) -> dict[str, bool]:
    """Path -> dense, for the Linears whose role the preset names (dense_targets first)."""
    dense_roles = set(getattr(config, "dense_targets", []))
    expected = {}
    for path, module in model.named_modules():
        role = role_of(model, path) if isinstance(module, nn.Linear) else None
        if role is not None and (role in dense_roles or role in config.target_modules):
            expected[path] = role in dense_roles
    return expected


def tiny_config(model_type: str, **changes) -> PretrainedConfig:
    """The family's own config class at the tiny shape, with the shipped tokenizer's ids."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**SHAPE, **changes},
    )


def tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def save_tiny_checkpoint(model_type: str, folder: Path, seed: int = 0) -> Path:
    """A save_pretrained folder (config, weights, tokenizer) that loads like a real checkpoint."""
    tiny_model(model_type, seed).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


def save_custom_code_checkpoint(folder: Path) -> Path:
    """A checkpoint whose classes live in its own Python files (the auto_map of config.json and
    tokenizer_config.json), as ChatGLM-6B's do: model_type `chatglm` and ChatGLM's Linear
    names, built offline."""
    shutil.copytree(CUSTOM_CODE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = {
        "model_type": "chatglm",
        "architectures": ["ToyChatGLMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_toy_chatglm.ToyChatGLMConfig",
            "AutoModelForCausalLM": "modeling_toy_chatglm.ToyChatGLMForCausalLM",
        },
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    (folder / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(loaded, trust_remote_code=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "ToyChatGLMTokenizer"
    tokenizer_config["auto_map"] = {
        "AutoTokenizer": ["tokenization_toy_chatglm.ToyChatGLMTokenizer", None]
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder
