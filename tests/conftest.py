"""Shared fixtures: Hydra composition of the shipped configs, the toy PromptCBLUE rows, a cache
folder so the tiny model's warm-up runs once per test session, and the rule that a test may be
skipped only for a missing GPU, optional extra or platform feature (never for a missing file)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from moelora.config import register_configs
from moelora.paths import CONFIG_DIR
from tests import skip_policy

REPO = Path(__file__).resolve().parents[1]
# Real PromptCBLUE rows and the official scorer's output on them (README.md there says whence).
PROMPTCBLUE_TOY = REPO / "tests" / "data" / "promptcblue_toy"
# The smallest tiny base the end-to-end tests train: a 2-layer Llama of width 64.
TINY_SHAPE = [
    "model=tiny",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_layers=2",
]


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(skip_policy, "skip_policy")


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module. The scripts import each other by name (build_demo_base
    imports build_demo_data), so their folder goes on sys.path."""
    folder = str(REPO / "scripts")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


@pytest.fixture(scope="session", autouse=True)
def _offline_and_cached(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MOELORA_CACHE", str(tmp_path_factory.mktemp("moelora-cache")))
    register_configs()


def compose_config(name: str, overrides: list[str], run_dir: Path | None = None) -> DictConfig:
    """Compose configs/<name>.yaml like the CLI does, with `run_dir` filled in."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=False)
    key = "run_dir" if name == "train" else "output_dir"
    if run_dir is not None:
        cfg[key] = str(run_dir)
    return cfg


@pytest.fixture
def toy_dir() -> Path:
    return PROMPTCBLUE_TOY


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU the threads'
    synchronisation makes each forward many times slower (tests/adapters does this for all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
