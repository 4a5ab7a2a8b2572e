"""Packing in whole training runs: MoDULA's stages with gradient checkpointing train like the same
rows padded, and a packed run resumed from a checkpoint equals the uninterrupted one bitwise
(and logs its fill rate)."""

from __future__ import annotations

import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moelora.train.recipe import train
from tests.conftest import compose_config
from tests.test_reliability import adapter, assert_identical_runs, history
from tests.test_train import SMALL

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m 'not slow'` skips them

MODULA = [
    *SMALL,
    "method=modula",
    "method.dropout=0",
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.gradient_checkpointing=true",
    "eval.enabled=false",
]


def test_modula_stages_packed_with_checkpointing_train_like_padded(tmp_path) -> None:
    runs = {}
    for packing in ("none", "packed"):
        run_dir = tmp_path / packing
        train(compose_config("train", [*MODULA, f"data.packing={packing}"], run_dir))
        runs[packing] = run_dir
    padded, packed = history(runs["none"]), history(runs["packed"])
    assert [row["step"] for row in packed] == [row["step"] for row in padded]
    assert len(padded) == 9  # three stages of 3 steps
    for got, expected in zip(packed, padded, strict=True):
        for key, value in expected.items():
            if key.startswith("train/") and key != "train/lr":
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (got["step"], key)
    a, b = adapter(runs["packed"]), adapter(runs["none"])
    assert a.keys() == b.keys()
    for key in b:  # fp32 sums in another order, through Adam: 4e-5 at most measured
        assert float((a[key] - b[key]).norm() / b[key].norm()) < 1e-4, key


def test_a_packed_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path) -> None:
    job = [
        *SMALL,
        "method=molora",
        "method.num_experts=2",
        "method.top_k=1",
        "method.rank_per_expert=4",
        "data.packing=packed",
        "trainer.max_steps=8",
        "trainer.save_every=4",
        "trainer.keep_checkpoints=0",
        "trainer.log_every=1",
        "trainer.gradient_checkpointing=true",
        "eval.enabled=false",
    ]
    whole = tmp_path / "whole"
    train(compose_config("train", job, whole))
    cut = tmp_path / "cut"  # as if stopped right after the checkpoint at step 4
    shutil.copytree(whole, cut, ignore=shutil.ignore_patterns("step-00000008", "adapter"))
    (cut / "metrics.json").unlink()
    resumed = train(compose_config("train", [*job, "trainer.resume=auto"], cut))
    assert resumed["info"]["steps"] == 8
    assert_identical_runs(cut, whole)
    # The packing's fill rate is logged at the start, beside the unpacked one.
    events = EventAccumulator(str(whole / "train")).Reload()
    packed, none = (events.Scalars(f"data/fill/{k}")[0].value for k in ("packed", "none"))
    assert none < packed <= 1
