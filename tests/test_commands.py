"""The commands as a user runs them: a multirun sweep and `eval` of a base model (subprocesses),
`eval` of a predictions file (by `main` in this process: nothing to load, so the interpreter's
start-up would be most of the test), and the wheel carrying the configs and demo data for
`pip install .`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_SHAPE
from tests.test_config import in_process, moelora

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m 'not slow'` skips them

SMALL = [
    *TINY_SHAPE,
    "model.tiny.pretrain_steps=0",
    "data.max_eval_samples_per_task=2",
    "eval.max_new_tokens=4",
]


def test_multirun_sweeps_one_run_per_value(tmp_path: Path) -> None:
    result = moelora(
        "train",
        "-m",
        "+experiment=demo",
        *SMALL,
        "trainer.max_steps=3",
        "trainer.batch_size=4",
        "eval.before=false",
        "method.rank_per_expert=2,4",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    overrides = [(p / ".hydra" / "overrides.yaml").read_text() for p in runs]
    assert "method.rank_per_expert=2" in overrides[0] and "rank_per_expert=4" in overrides[1]
    params = [
        json.loads((p / "metrics.json").read_text())["info"]["trainable_parameters"] for p in runs
    ]
    assert params[1] == 2 * params[0]


def test_eval_scores_a_base_model(tmp_path: Path) -> None:
    result = moelora("eval", "model=tiny", *SMALL, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["score"]["per_task"]) == {"DEMO-CLS", "DEMO-GEN", "DEMO-NER", "DEMO-STS"}
    assert (tmp_path / "predictions_eval.jsonl").is_file()


def test_eval_scores_a_predictions_file(tmp_path: Path, capsys) -> None:
    gold = [json.loads(line) for line in (REPO / "data/demo/dev.jsonl").open(encoding="utf-8")]
    ner = [row for row in gold if row["task_dataset"] == "DEMO-NER"]
    preds = tmp_path / "preds.jsonl"
    with preds.open("w", encoding="utf-8") as handle:
        for row in gold:  # perfect answers except one NER row answered with nothing
            text = "" if row is ner[0] else row["target"]
            handle.write(json.dumps({"sample_id": row["sample_id"], "prediction": text}) + "\n")
    out = tmp_path / "out"
    result = in_process(
        capsys, "eval", f"predictions={preds}", "eval.scorer=both", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["score"]["scorer"], metrics["score_lenient"]["scorer"]) == (
        "official",
        "lenient",
    )
    assert "| task | rows | score (official) | score (lenient) |" in result.stdout
    lenient = metrics["score_lenient"]["per_task"]
    assert lenient["DEMO-CLS"] == lenient["DEMO-STS"] == lenient["DEMO-GEN"] == 1.0
    per_task = metrics["score"]["per_task"]
    assert per_task["DEMO-CLS"] == per_task["DEMO-STS"] == 1.0
    assert per_task["DEMO-GEN"] == pytest.approx(2 / (2 + 1e-8), abs=1e-12)  # rouge_chinese's eps
    entities = [
        sum(
            len(line.split("：", 1)[1].split("，"))
            for line in row["target"].splitlines()
            if "实体：" in line and line.split("：", 1)[1]
        )
        for row in ner
    ]
    missed = entities[0]
    assert per_task["DEMO-NER"] == (2 * (sum(entities) - missed)) / (2 * sum(entities) - missed)


def test_eval_notes_and_scores_rows_with_an_empty_target(tmp_path: Path, capsys) -> None:
    gold = [json.loads(line) for line in (REPO / "data/demo/dev.jsonl").open(encoding="utf-8")]
    blank = {
        next(r["sample_id"] for r in gold if r["task_dataset"] == t)
        for t in ("DEMO-NER", "DEMO-CLS")
    }
    with (tmp_path / "dev.jsonl").open("w", encoding="utf-8") as handle:
        for row in gold:
            handle.write(
                json.dumps(row | {"target": ""} if row["sample_id"] in blank else row) + "\n"
            )
    preds = tmp_path / "preds.jsonl"
    with preds.open("w", encoding="utf-8") as handle:
        for row in gold:  # the original answers: the blanked NER row adds false positives
            handle.write(
                json.dumps({"sample_id": row["sample_id"], "prediction": row["target"]}) + "\n"
            )
    out = tmp_path / "out"
    result = in_process(
        capsys, "eval", f"predictions={preds}", f"data.root={tmp_path}", f"hydra.run.dir={out}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "2 eval rows have an empty target" in notes[0]
    assert "left out of DEMO-CLS" in notes[0]
    score = json.loads((out / "metrics.json").read_text())["score"]
    assert score["empty_targets"] == {"DEMO-NER": 1, "DEMO-CLS": 1}
    assert score["per_task"]["DEMO-CLS"] == 1.0  # the blank row is left out, the rest are right
    assert 0 < score["per_task"]["DEMO-NER"] < 1  # the blank row's answers are false positives
    assert "Rows with an empty target" in (out / "report.md").read_text()


def test_eval_refuses_a_prediction_for_an_unknown_sample(tmp_path: Path, capsys) -> None:
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"sample_id": "nope", "prediction": "x"}) + "\n")
    result = in_process(capsys, "eval", f"predictions={preds}", f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 2
    assert "sample_id nope, which is not in the gold set" in result.stderr


def pip(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", *args], check=True, capture_output=True, timeout=300
    )


def test_wheel_ships_configs_and_demo_data(tmp_path: Path) -> None:
    pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO))
    (wheel,) = tmp_path.glob("moelora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "moelora/configs/train.yaml",
        "moelora/configs/experiment/demo.yaml",
        "moelora/configs/method/moelora.yaml",
        "moelora/demo_data/demo/train.jsonl",
        "moelora/demo_data/tokenizer/tokenizer.json",
        "moelora/cli/__init__.py",
        "moelora/config/commands.py",
        "moelora/adapters/methods/lora.py",
    ):
        assert needed in names, needed
    target = tmp_path / "site"
    pip("install", "--no-deps", "-q", "--target", str(target), str(wheel))
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = "import moelora.paths as p; print(p.CONFIG_DIR); print(p.DATA_DIR)"
    found = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.split()
    assert found == [str(target / "moelora" / "configs"), str(target / "moelora" / "demo_data")]
    shown = subprocess.run(
        [sys.executable, "-m", "moelora", "train", "+experiment=demo", "--cfg", "job"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "moelora_data:tokenizer" in shown.stdout


def test_every_method_trains_and_scores_from_the_cli(tmp_path: Path) -> None:
    methods = ["lora", "moelora", "molora", "modula", "modula_res", "contrastive"]
    result = moelora(
        "train",
        "-m",
        "+experiment=demo",
        *SMALL,
        "trainer.max_steps=2",
        "trainer.batch_size=4",
        "eval.before=false",
        f"method={','.join(methods)}",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for number, method in enumerate(methods):
        metrics = json.loads((tmp_path / str(number) / "metrics.json").read_text())
        assert metrics["info"]["method"] == method
        assert metrics["info"]["steps"] == (6 if method.startswith("modula") else 2)
        assert set(metrics["after"]["per_task"]) == {"DEMO-CLS", "DEMO-GEN", "DEMO-NER", "DEMO-STS"}
