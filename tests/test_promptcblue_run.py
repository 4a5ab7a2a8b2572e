"""The real job's configuration end to end on CPU: `+experiment=cmedical` on the PromptCBLUE toy
rows with the tiny model (train on train.json, score all 16 tasks of dev.json)."""

from __future__ import annotations

import json

import pytest

from moelora.train.recipe import train
from tests.conftest import compose_config
from tests.test_train import SMALL

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m 'not slow'` skips them

TASKS = {
    "CMeEE-V2",
    "CMeIE",
    "CHIP-CDN",
    "CHIP-CDEE",
    "CHIP-STS",
    "CHIP-CTC",
    "CHIP-MDCFNPC",
    "KUAKE-IR",
    "KUAKE-QIC",
    "KUAKE-QQR",
    "KUAKE-QTR",
    "IMCS-V2-NER",
    "IMCS-V2-SR",
    "IMCS-V2-DAC",
    "IMCS-V2-MRG",
    "MedDG",
}


def test_cmedical_on_the_toy_rows_writes_the_16_task_table(toy_dir, tmp_path) -> None:
    small = [o for o in SMALL if not o.startswith(("+experiment", "data.", "trainer.batch"))]
    cfg = compose_config(
        "train",
        [
            "+experiment=cmedical",
            f"data.root={toy_dir}",
            "model=tiny",
            *small,
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.grad_accum=2",
            "trainer.save_every=0",
            "trainer.eval_every=0",
            "eval.before=false",
            "eval.max_new_tokens=8",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert set(metrics["after"]["per_task"]) == TASKS
    assert metrics["after"]["summary"]["tasks"][0] == "CMeIE"
    assert metrics["info"]["method"] == "moelora" and metrics["info"]["steps"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "| IMCS-V2-MRG | 5 |" in report and "**overall of 8: CMeIE" in report
    assert json.loads((tmp_path / "tasks.json").read_text())["tasks"] == sorted(TASKS)
