"""The official PromptCBLUE reading (eval.scorer=official): the official scorer's own output on
damaged answers to the toy rows, and its quirks on hand-made rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelora.errors import UserError
from moelora.evaluate.promptcblue import (
    empty_target_note,
    metric_name,
    parse_answer,
    score_predictions,
    score_task,
)
from tests.conftest import PROMPTCBLUE_TOY
from tests.evaluate.test_promptcblue import _demo as _row

SCORES_DIR = PROMPTCBLUE_TOY / "official_scores"
PREDICTION_FILES = sorted(p.name for p in SCORES_DIR.glob("*.jsonl"))


def _official_key(task: str) -> str:
    """The official scorer's key for a task's score, e.g. CMeIE-V2-Micro-F1."""
    name = "CMeIE-V2" if task == "CMeIE" else task
    metric = metric_name(task)
    suffix = "Macro-F1" if metric == "macro-F1" else "RougeL" if "Rouge" in metric else "Micro-F1"
    return f"{name}-{suffix}"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@pytest.mark.parametrize("name", PREDICTION_FILES)
def test_matches_the_official_scorer(name):
    path = SCORES_DIR / name
    rows = _read_jsonl(SCORES_DIR.parent / f"{name.split('_')[0]}.json")
    predicted = {r["sample_id"]: r["prediction"] for r in _read_jsonl(path)}
    expected = json.loads(path.with_suffix(".scores.json").read_text(encoding="utf-8"))
    result = score_predictions(rows, [predicted[r["sample_id"]] for r in rows], "official")
    assert len(result["per_task"]) == 16
    got = {_official_key(task): value for task, value in result["per_task"].items()}
    assert got.keys() == expected.keys() - {"score"}
    for key, value in got.items():
        assert value == pytest.approx(expected[key], abs=1e-6), key
    assert result["overall"] == pytest.approx(expected["score"], abs=1e-6)
    assert result["scorer"] == "official"


def test_lenient_reads_some_damaged_files_differently():
    """The two readings are really different: several damaged files move by more than 1e-6."""
    moved = 0
    for name in PREDICTION_FILES:
        rows = _read_jsonl(SCORES_DIR.parent / f"{name.split('_')[0]}.json")
        predicted = {r["sample_id"]: r["prediction"] for r in _read_jsonl(SCORES_DIR / name)}
        answers = [predicted[r["sample_id"]] for r in rows]
        official = score_predictions(rows, answers, "official")["overall"]
        moved += abs(score_predictions(rows, answers, "lenient")["overall"] - official) > 1e-6
    assert moved >= 5


# --------------------------------------------------------------------------------------------
# Quirks, on hand-made rows
# --------------------------------------------------------------------------------------------


def _both(row: dict, prediction: str) -> tuple[float, float]:
    task, task_type = row["task_dataset"], row["task_type"]
    return tuple(
        score_task(task, task_type, [prediction], [row], scorer)
        for scorer in ("official", "lenient")
    )


CDEE_GOLD = (
    "上述句子中的临床发现事件如下：\n主体词：咳嗽；发生状态：；描述词：间断；解剖部位：\n"
    "主体词：发热；发生状态：否定；描述词：；解剖部位："
)


def test_cdee_first_line_is_always_dropped():
    row = _row("CHIP-CDEE", "event_extraction", CDEE_GOLD)
    no_lead_in = "\n".join(CDEE_GOLD.split("\n")[1:])
    # officially the first event is taken for the lead-in: TP 1, FN 1 -> P 1, R 1/2 -> 2/3
    assert _both(row, no_lead_in) == (pytest.approx(2 / 3), 1.0)


def test_cdee_blank_line_is_an_empty_event():
    row = _row("CHIP-CDEE", "event_extraction", CDEE_GOLD)
    # the trailing blank line is an event with empty fields: TP 2, FP 1 -> P 2/3, R 1 -> 0.8
    assert _both(row, CDEE_GOLD + "\n") == (pytest.approx(0.8), 1.0)
    assert parse_answer("CHIP-CDEE", None, "如下：\n\n") == {("", "", (), ())}


def test_half_width_colon_is_text():
    row = _row("CMeEE-V2", "ner", "实体如下：\n症状实体：头痛，发热", ["症状", "药物"])
    # "症状实体:头痛，发热" starts with 症状实体 but keeps its ":": mentions "症状实体:头痛", 发热
    assert parse_answer("CMeEE-V2", "ner", "症状实体:头痛，发热", ["症状", "药物"]) == {
        ("症状", "症状实体:头痛"),
        ("症状", "发热"),
    }
    assert _both(row, "症状实体:头痛，发热") == (pytest.approx(0.5), 1.0)


def test_entity_line_cut_before_its_colon_is_a_mention():
    assert parse_answer("IMCS-V2-NER", "ner", "症状实体", ["症状"]) == {("症状", "症状实体")}


def test_f1_is_zero_when_no_tuple_on_either_side():
    row = _row("CHIP-CDN", "normalization", "没有对应的标准化实体", ["头痛", "发热"])
    assert _both(row, "没有对应的标准化实体") == (0.0, 1.0)


def test_findings_label_is_compared_unstripped():
    choices = ["阳性", "阴性", "其他"]
    row = _row("CHIP-MDCFNPC", "attr_cls", "判别如下：\n咳嗽：阳性", choices)
    # "阳性 " is not a choice -> 不标注: TP 0 officially; lenient strips it
    assert _both(row, "判别如下：\n咳嗽：阳性 ") == (0.0, 1.0)


def test_cmeie_relation_is_the_text_before_the_marker_less_two_characters():
    text = "具有病因关系的头尾实体对如下：头实体为感冒，尾实体为受凉。"
    assert parse_answer("CMeIE", "spo_generation", text) == {("病因", "感冒", "受凉")}
    # without "具有", "病因"[2:] is empty and the header stays in the head entity
    assert parse_answer("CMeIE", "spo_generation", text[2:]) == {
        ("", "病因关系的头尾实体对如下：感冒", "受凉")
    }


def test_mrg_section_value_after_the_last_name():
    text = "报告如下：\n主诉：主诉：头痛。"
    assert parse_answer("IMCS-V2-MRG", "report_generation", text) == {"主诉": "头痛。"}
    # the first line is never a section
    assert parse_answer("IMCS-V2-MRG", "report_generation", "主诉：头痛。") == {}


def test_rouge_has_rouge_chinese_epsilon():
    row = _row("MedDG", "response_generation", "多喝水，注意休息。")
    official, lenient = _both(row, "多喝水，注意休息。")
    assert official == pytest.approx(2 / (2 + 1e-8), abs=1e-15)
    assert lenient == 1.0
    # 3 of 9 gold tokens, all 3 predicted right: P 1, R 1/3 -> 2 * (1/3) / (4/3 + 1e-8)
    assert _both(row, "多喝水")[0] == pytest.approx(2 * (1 / 3) / (4 / 3 + 1e-8), abs=1e-15)


def test_empty_label_prediction_is_the_first_official_label():
    for task, first in [("CHIP-CTC", "非上述类型"), ("KUAKE-QTR", "完全不匹配或者没有参考价值")]:
        row = _row(task, "cls", first)
        assert score_task(task, "cls", [""], [row]) == 1.0
    row = _row("DEMO-CLS", "cls", "阴性", ["阴性", "阳性"])  # no official list: first choice
    assert score_task("DEMO-CLS", "cls", ["  "], [row]) == 1.0


# --------------------------------------------------------------------------------------------
# Rows with an empty gold target
# --------------------------------------------------------------------------------------------


def test_empty_targets_are_scored_as_officially():
    rows = [
        _row(
            "CMeIE", "spo_generation", "具有病因关系的头尾实体对如下：头实体为感冒，尾实体为受凉。"
        ),
        _row("CMeIE", "spo_generation", ""),
        _row("KUAKE-QIC", "cls", "病因分析"),
        _row("KUAKE-QIC", "cls", " "),
        _row("MedDG", "response_generation", ""),
    ]
    predictions = [
        "具有病因关系的头尾实体对如下：头实体为感冒，尾实体为受凉。",
        "具有病因关系的头尾实体对如下：头实体为咳嗽，尾实体为受凉。",  # FP against no gold
        "病因分析",
        "就医建议",  # left out: its gold label is empty
        "",  # "无。" against "无。"
    ]
    result = score_predictions(rows, predictions)
    assert result["per_task"]["CMeIE"] == pytest.approx(2 / 3)  # TP 1, FP 1
    assert result["per_task"]["KUAKE-QIC"] == 1.0
    assert result["per_task"]["MedDG"] == pytest.approx(2 / (2 + 1e-8))
    assert result["num_rows"] == {"CMeIE": 2, "KUAKE-QIC": 2, "MedDG": 1}
    assert result["empty_targets"] == {"CMeIE": 1, "KUAKE-QIC": 1, "MedDG": 1}
    note = empty_target_note(rows)
    assert note.startswith("note: 3 eval rows have an empty target (CMeIE: 1, KUAKE-QIC: 1, ")
    assert "left out of KUAKE-QIC" in note and "\n" not in note
    assert empty_target_note(rows[:1]) is None


def test_a_label_task_without_any_gold_label_stops():
    rows = [_row("CHIP-CTC", "cls", ""), _row("CHIP-CTC", "cls", "")]
    with pytest.raises(UserError, match=r"every row of task CHIP-CTC has an empty target"):
        score_predictions(rows, ["疾病", "疾病"])


def test_unknown_scorer_names_the_field():
    row = _row("MedDG", "response_generation", "好")
    with pytest.raises(UserError, match=r"eval.scorer='offical' is unknown"):
        score_task("MedDG", None, ["好"], [row], "offical")
