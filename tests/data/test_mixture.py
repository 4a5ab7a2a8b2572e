"""Mixture strategies: realised per-task counts follow each strategy, epochs are redrawn, the
same seed gives the same stream, and MoDULA's router stage sees every domain equally."""

from __future__ import annotations

from collections import Counter

import pytest

from moelora.config import MixtureConfig
from moelora.data.mixture import (
    MixtureSampler,
    balanced_over_domains,
    stage_sampler,
    task_probabilities,
)
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError

SIZES = {"big": 800, "mid": 150, "small": 50}
ROWS = [task for task, n in SIZES.items() for _ in range(n)]


def realised(cfg: MixtureConfig, epoch: int = 0, seed: int = 0) -> Counter:
    sampler = MixtureSampler(ROWS, cfg, seed)
    sampler.set_epoch(epoch)
    return Counter(ROWS[i] for i in sampler)


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (MixtureConfig(strategy="proportional"), {"big": 0.8, "mid": 0.15, "small": 0.05}),
        (MixtureConfig(strategy="uniform"), {"big": 1 / 3, "mid": 1 / 3, "small": 1 / 3}),
        (
            MixtureConfig(strategy="temperature", temperature=2.0),
            {t: n**0.5 / sum(m**0.5 for m in SIZES.values()) for t, n in SIZES.items()},
        ),
        (
            MixtureConfig(strategy="weights", weights={"big": 1.0, "mid": 1.0, "small": 2.0}),
            {"big": 0.25, "mid": 0.25, "small": 0.5},
        ),
    ],
)
def test_realised_proportions_follow_the_strategy(cfg: MixtureConfig, expected: dict) -> None:
    assert task_probabilities(SIZES, cfg) == pytest.approx(expected)
    counts = realised(cfg)
    total = sum(counts.values())
    assert total == 1000
    for task, p in expected.items():
        assert abs(counts[task] / total - p) <= 1 / total + 1e-9


def test_caps_and_minimums_change_the_mix() -> None:
    capped = realised(MixtureConfig(max_per_task=200))
    assert capped == Counter({"big": 200, "mid": 150, "small": 50})
    raised = realised(MixtureConfig(min_per_task=100))
    assert raised == Counter({"big": 800, "mid": 150, "small": 100})


def test_upsampled_task_repeats_rows_only_after_using_them_all() -> None:
    sampler = MixtureSampler(ROWS, MixtureConfig(min_per_task=120), seed=0)
    small = [i for i in sampler if ROWS[i] == "small"]
    assert len(small) == 120 and len(set(small)) == 50
    first_pass = Counter(small)
    assert min(first_pass.values()) >= 2 and max(first_pass.values()) <= 3


def test_epochs_are_redrawn_and_seeds_reproduce() -> None:
    cfg = MixtureConfig(strategy="uniform")
    a = MixtureSampler(ROWS, cfg, seed=1)
    b = MixtureSampler(ROWS, cfg, seed=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(MixtureSampler(ROWS, cfg, seed=2)) != first


def test_router_stage_balances_domains() -> None:
    domain_of = {"big": "extraction", "mid": "extraction", "small": "generation"}
    counts = realised(balanced_over_domains(domain_of, MixtureConfig()))
    total = sum(counts.values())
    assert counts["small"] / total == pytest.approx(0.5, abs=1e-3)
    assert counts["big"] / total == pytest.approx(0.25, abs=1e-3)


def test_a_stage_draws_the_rows_its_method_names() -> None:
    domains = {"big": "extraction", "mid": "extraction", "small": "generation"}
    registry = TaskRegistry.build(dict.fromkeys(SIZES, "x"), domains)
    mix = MixtureConfig()

    def drawn(rows: str, added: list[str] | None = None) -> Counter:
        sampler = stage_sampler(rows, ROWS, registry, mix, 0, added or [])
        return Counter(ROWS[i] for i in sampler)

    assert drawn("mixture") == realised(mix)
    only_generation = drawn("added_domains", ["generation"])
    assert set(only_generation) == {"small"} and only_generation["small"] == 50
    balanced = drawn("balanced_domains")
    assert balanced["small"] == balanced["big"] + balanced["mid"]
    with pytest.raises(ValueError, match="stage rows 'shuffled' are unknown"):
        stage_sampler("shuffled", ROWS, registry, mix, 0)


def test_bad_mixture_settings_are_named() -> None:
    with pytest.raises(UserError, match="strategy='zipf'"):
        MixtureConfig(strategy="zipf")
    with pytest.raises(UserError, match=r"no weight for \['small'\]"):
        task_probabilities(SIZES, MixtureConfig(strategy="weights", weights={"big": 1, "mid": 1}))
    with pytest.raises(UserError, match="temperature=0 is out of range; set it greater than 0"):
        MixtureConfig(strategy="temperature", temperature=0)
