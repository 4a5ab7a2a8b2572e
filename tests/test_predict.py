"""`moelora predict` as a user runs it: answers for rows without targets, the submission file the
official post-processing reads, one typed prompt, and tasks the run never saw."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset

from moelora.config import DataConfig, EvalConfig, ModelConfig
from moelora.data.tasks import TaskRegistry
from moelora.errors import UserError
from moelora.evaluate.predict import SUBMISSION_FIELDS, _registry_for
from moelora.rundir import RunSettings
from tests.conftest import REPO
from tests.test_config import in_process, moelora
from tests.test_train import run

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m 'not slow'` skips them


@pytest.fixture(scope="module")
def moelora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task-routed run (moelora, 2 experts) trained enough to give varied answers."""
    run_dir = tmp_path_factory.mktemp("run")
    run(
        run_dir,
        "trainer.max_steps=40",
        "method=moelora",
        "method.num_experts=2",
        "eval.before=false",
    )
    return run_dir


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def targetless_copy(run_dir: Path, folder: Path) -> list[dict]:
    """The run's scored dev rows, in the order it scored them, as a test split: targets removed
    from half of the rows and emptied in the other half, as PromptCBLUE's test.json has them."""
    dev = {r["sample_id"]: r for r in _read_jsonl(REPO / "data/demo/dev.jsonl")}
    scored = [r["sample_id"] for r in _read_jsonl(run_dir / "predictions_after.jsonl")]
    rows = []
    for number, sample_id in enumerate(scored):
        row = dict(dev[sample_id])
        if number % 2:
            row["target"] = ""
        else:
            del row["target"]
        rows.append(row)
    folder.mkdir()
    with (folder / "test.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return rows


def test_predict_writes_answers_and_a_submission(moelora_run: Path, tmp_path: Path) -> None:
    rows = targetless_copy(moelora_run, tmp_path / "data")
    out = tmp_path / "out"
    done = moelora(
        "predict",
        f"run_dir={moelora_run}",
        f"data.root={tmp_path / 'data'}",
        "data.eval_files=[test.jsonl]",
        f"output_dir={out}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(rows)} answers from run" in done.stdout
    submission = _read_jsonl(out / "test_predictions.json")
    # every input row, in input order, with its own fields and the answer in target
    assert [r["sample_id"] for r in submission] == [r["sample_id"] for r in rows]
    for given, written in zip(rows, submission, strict=True):
        assert list(written) == list(SUBMISSION_FIELDS)
        assert {k: v for k, v in written.items() if k != "target"} == {
            k: v for k, v in given.items() if k != "target"
        }
    # the same answers as the run's own scoring of these rows
    eval_answers = [r["prediction"] for r in _read_jsonl(moelora_run / "predictions_after.jsonl")]
    assert [r["target"] for r in submission] == eval_answers
    assert len(set(eval_answers)) > 1  # a model that answers, not one constant string
    predictions = _read_jsonl(out / "predictions.jsonl")
    assert [r["prediction"] for r in predictions] == eval_answers
    assert {r["target"] for r in predictions} == {""}


def test_predict_answers_one_typed_prompt(moelora_run: Path, tmp_path: Path, capsys) -> None:
    first = _read_jsonl(moelora_run / "predictions_after.jsonl")[0]
    row = next(
        r for r in _read_jsonl(REPO / "data/demo/dev.jsonl") if r["sample_id"] == first["sample_id"]
    )
    typed = row["input"].replace("\n", "\\n")  # a line break typed as \n
    done = in_process(
        capsys,
        "predict",
        f"run_dir={moelora_run}",
        f"input='{typed}'",
        f"task={row['task_dataset']}",
        f"output_dir={tmp_path / 'out'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == first["prediction"]


def test_predict_refuses_an_unseen_task_for_a_task_routed_run(
    moelora_run: Path, tmp_path: Path, capsys
) -> None:
    done = in_process(
        capsys,
        "predict",
        f"run_dir={moelora_run}",
        "input='头痛怎么办？'",
        "task=DEMO-QA",
        f"output_dir={tmp_path / 'out'}",
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("moelora predict: error: task 'DEMO-QA' is not one of the run's")
    assert "moelora picks its experts by task id" in line and "(contrastive, lora, " in line


def _settings(method: str, force_domain: bool = False) -> RunSettings:
    return RunSettings(
        ModelConfig(name="tiny", name_or_path="tiny"),
        DataConfig(name="demo", root="."),
        replace(EvalConfig(), force_domain=force_domain),
        method,
        None,
    )


def test_an_unseen_task_gets_an_unused_id_when_routing_is_by_token() -> None:
    registry = TaskRegistry.build({"A": "cls", "B": "ner"})
    rows = Dataset.from_list([{"task_dataset": t} for t in ("B", "NEW", "A", "NEW")])
    extended = _registry_for(registry, rows, _settings("molora"))
    assert extended.tasks == ["A", "B", "NEW"]
    assert extended.task_id("A") == 0 and extended.domains == registry.domains
    assert _registry_for(registry, rows.select([0, 2]), _settings("lora")) is registry
    with pytest.raises(UserError, match=r"task 'NEW' .* picks its experts by task id"):
        _registry_for(registry, rows, _settings("moelora"))
    with pytest.raises(UserError, match=r"no domain expert for eval.force_domain=true"):
        _registry_for(registry, rows, _settings("modula", force_domain=True))
