"""The validation split: held-out training rows, never trained on, scored like the dev set and
reported apart from it (metrics.json, report.md, the comparison's summary.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from moelora.analysis.compare import compare
from moelora.data.holdout import hold_out
from moelora.data.pipeline import prepare_data, read_split
from moelora.modeling import load_tokenizer
from moelora.train.recipe import train
from tests.conftest import TINY_SHAPE, compose_config
from tests.test_config import in_process


def rows_of(counts: dict[str, int]) -> Dataset:
    rows = [
        {"task_dataset": task, "sample_id": f"{task}-{i}"}
        for task, n in counts.items()
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def ids(rows: Dataset) -> list[str]:
    return list(rows["sample_id"])


def test_each_task_holds_out_its_share_and_the_parts_are_disjoint() -> None:
    rows = rows_of({"A": 40, "B": 10, "C": 3, "D": 1})
    kept, held = hold_out(rows, 0.25, seed=0)
    # D has one row: it stays in training.
    assert Counter(list(held["task_dataset"])) == {
        "A": 10,
        "B": 2,
        "C": 1,
    }  # D: its only row trains
    assert set(ids(kept)).isdisjoint(ids(held))
    assert sorted(ids(kept) + ids(held)) == sorted(ids(rows))
    order = ids(rows)
    assert ids(kept) == sorted(ids(kept), key=order.index)  # file order kept


def test_the_same_seed_holds_out_the_same_rows_whatever_else_is_in_the_file() -> None:
    _, held = hold_out(rows_of({"A": 40, "B": 10}), 0.25, seed=3)
    _, again = hold_out(rows_of({"A": 40, "B": 10}), 0.25, seed=3)
    _, more_tasks = hold_out(rows_of({"Z": 7, "A": 40, "B": 10}), 0.25, seed=3)
    _, other_seed = hold_out(rows_of({"A": 40, "B": 10}), 0.25, seed=4)
    assert ids(held) == ids(again)
    assert set(ids(held)) <= set(ids(more_tasks))
    assert ids(held) != ids(other_seed)


def test_prepared_data_trains_on_none_of_the_validation_rows(tmp_path: Path) -> None:
    cfg = compose_config("train", ["+experiment=demo", "data.validation=0.1"], tmp_path)
    data_cfg = _typed(cfg).data
    data = prepare_data(data_cfg, load_tokenizer(_typed(cfg).model))
    every = read_split(data_cfg, "train")
    assert data.validation is not None and data.reports["validation"].lines()
    assert len(data.train) + len(data.validation) == len(every)
    per_task = Counter(list(every["task_dataset"]))
    assert Counter(list(data.validation["task_dataset"])) == {
        t: round(0.1 * n) for t, n in per_task.items()
    }
    prompts = {tuple(ids) for ids in data.validation["prompt_ids"]}
    trained = {tuple(ids) for ids in data.train["prompt_ids"]}
    assert not prompts & trained


def test_validation_files_are_read_and_an_unknown_task_stops(tmp_path: Path, capsys) -> None:
    cfg = compose_config("train", ["+experiment=demo"], tmp_path)
    root = Path(cfg.data.root)
    rows = [json.loads(line) for line in (root / "dev.jsonl").open()][:6]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    typed = _typed(compose_config("train", ["+experiment=demo"], tmp_path))
    typed.data.validation_files = [str(tmp_path / "val.jsonl")]
    data = prepare_data(typed.data, load_tokenizer(typed.model))
    assert ids(data.validation) == [r["sample_id"] for r in rows]
    rows[0]["task_dataset"] = "NOT-A-TASK"
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="task 'NOT-A-TASK' is not one the model was trained on"):
        prepare_data(typed.data, load_tokenizer(typed.model))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.validation=1.0"], "data.validation=1.0 is out of range"),
        (
            ["data.validation=0.1", "data.validation_files=[val.jsonl]"],
            "data.validation and data.validation_files both choose the validation rows",
        ),
        (["data.validation_files=[nowhere.jsonl]"], "data.validation_files"),
    ],
)
def test_bad_validation_settings_stop_in_one_line(
    overrides: list[str], message: str, tmp_path: Path, capsys
) -> None:
    done = in_process(capsys, "train", "+experiment=demo", f"run_dir={tmp_path}", *overrides)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_run_reports_validation_apart_from_dev(tmp_path: Path) -> None:
    """A tiny run with 20% held out scores exactly the held-out rows into metrics.json's
    `validation`, names them in report.md, and summary.md gives them a column of their own."""
    cfg = compose_config(
        "train",
        [
            "+experiment=demo",
            *TINY_SHAPE,
            "model.tiny.pretrain_steps=0",
            "data.validation=0.2",
            "data.max_eval_samples_per_task=3",
            "trainer.max_steps=4",
            "trainer.batch_size=4",
            "eval.before=false",
            "eval.max_new_tokens=4",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    typed = _typed(cfg).data
    _, expected = hold_out(read_split(typed, "train"), 0.2, typed.validation_seed)
    scored = tmp_path / "run" / "predictions_validation.jsonl"
    assert [json.loads(line)["sample_id"] for line in scored.open()] == ids(expected)
    assert metrics["validation"]["num_rows"] == dict(Counter(list(expected["task_dataset"])))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| after (official) | validation (official) |" in report
    assert f"validation = {len(expected)} training rows held out of training" in report
    summary = compare([tmp_path], tmp_path / "summary").read_text()
    assert "| validation |" in summary and "the number settings were chosen by" in summary


def _typed(cfg):
    from moelora.config import load_config

    return load_config(cfg)
