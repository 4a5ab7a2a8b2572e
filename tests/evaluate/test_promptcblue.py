"""The lenient PromptCBLUE reading (eval.scorer=lenient) on the real toy rows, hand-made wrong
answers, and the task_type fallback; test_official.py checks the official reading."""

from __future__ import annotations

import json

import pytest

from moelora.errors import UserError
from moelora.evaluate.promptcblue import (
    PROMPTCBLUE_TASKS,
    metric_name,
    parse_answer,
    score_predictions,
    score_task,
)
from tests.conftest import PROMPTCBLUE_TOY

SIXTEEN = {
    "CMeEE-V2", "CMeIE", "CHIP-CDN", "CHIP-CDEE", "CHIP-STS", "CHIP-CTC", "CHIP-MDCFNPC",
    "KUAKE-IR", "KUAKE-QIC", "KUAKE-QQR", "KUAKE-QTR", "IMCS-V2-NER", "IMCS-V2-SR",
    "IMCS-V2-DAC", "IMCS-V2-MRG", "MedDG",
}  # fmt: skip


def _load(split: str) -> list[dict]:
    with (PROMPTCBLUE_TOY / f"{split}.json").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def dev() -> list[dict]:
    return _load("dev")


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _load("train")


def _row(rows: list[dict], sample_id: str) -> dict:
    return next(r for r in rows if r["sample_id"] == sample_id)


def _score_one(row: dict, prediction: str) -> float:
    return score_task(row["task_dataset"], row["task_type"], [prediction], [row], "lenient")


# --------------------------------------------------------------------------------------------
# Gold against itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "dev"])
def test_every_gold_scores_one_against_itself(split):
    rows = _load(split)
    assert {r["task_dataset"] for r in rows} == SIXTEEN
    result = score_predictions(rows, [r["target"] for r in rows], "lenient")
    assert set(result["per_task"]) == SIXTEEN
    for task, score in result["per_task"].items():
        assert score == 1.0, task
    assert result["overall"] == 1.0
    assert result["num_rows"] == dict.fromkeys(SIXTEEN, 5)


@pytest.mark.parametrize("split", ["train", "dev"])
def test_each_row_scores_one_against_itself(split):
    for row in _load(split):
        assert _score_one(row, row["target"]) == 1.0, row["sample_id"]


def test_gold_structures_are_not_empty(train, dev):
    """A perfect score must not come from parsing nothing: every tuple task has gold tuples."""
    for task in ("CMeEE-V2", "IMCS-V2-NER", "CMeIE", "CHIP-CDEE", "CHIP-CDN", "CHIP-MDCFNPC",
                 "IMCS-V2-SR"):  # fmt: skip
        rows = [r for r in train + dev if r["task_dataset"] == task]
        parsed = [
            parse_answer(task, r["task_type"], r["target"], r["answer_choices"], "lenient")
            for r in rows
        ]
        assert sum(len(p) for p in parsed) >= 5, task
    mrg = _row(dev, "dev-335")
    sections = parse_answer("IMCS-V2-MRG", "report_generation", mrg["target"], scorer="lenient")
    assert list(sections) == [
        "主诉", "现病史", "辅助检查", "既往史", "诊断", "建议",
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Hand-made wrong answers on real rows
# --------------------------------------------------------------------------------------------


def test_cmeee_drop_one_entity(dev):
    row = _row(dev, "dev-39492")  # 身体部位: 体细胞中，正常核型细胞，21-三体核型细胞
    pred = "上述句子中的实体包含：\n微生物类实体：\n身体部位实体：体细胞中，21-三体核型细胞"
    # TP 2, FP 0, FN 1: P 1, R 2/3 -> F1 0.8
    assert _score_one(row, pred) == pytest.approx(0.8)


def test_cmeee_half_width_colon_and_spaces(dev):
    row = _row(dev, "dev-39492")
    pred = "上述句子中的实体包含：\n  身体部位实体: 体细胞中 ，正常核型细胞，21-三体核型细胞  \n"
    assert _score_one(row, pred) == 1.0


def test_imcs_ner_wrong_type(dev):
    row = _row(dev, "dev-10852")  # 症状: 病毒感染，贫血; 医学检查检验: 白细胞，CRP，血红蛋白
    pred = (
        "上述句子中的实体包含：\n症状实体：病毒感染，贫血，CRP\n医学检查检验实体：白细胞，血红蛋白"
    )
    # (症状, CRP) is a false positive, (医学检查检验, CRP) a miss: TP 4, FP 1, FN 1 -> 0.8
    assert _score_one(row, pred) == pytest.approx(0.8)


def test_cmeie_one_wrong_tail(dev):
    row = _row(dev, "dev-2536")  # 8 triples: 相关（转化）2, 病理分型 1, 临床表现 4, 阶段 1
    assert len(parse_answer("CMeIE", "spo_generation", row["target"], scorer="lenient")) == 8
    pred = row["target"].replace("尾实体为前驱期", "尾实体为潜伏期")
    # TP 7, FP 1, FN 1 -> 7/8
    assert _score_one(row, pred) == pytest.approx(7 / 8)


def test_cmeie_v2_name_is_the_same_task(dev):
    row = dict(_row(dev, "dev-4416"), task_dataset="CMeIE-V2")
    assert _score_one(row, row["target"]) == 1.0
    assert (
        _score_one(row, "具有药物治疗关系的头尾实体对如下：头实体为心衰，尾实体为伊伐布雷。") == 0.0
    )


def test_cdee_value_order_matters_as_officially(dev):
    row = _row(dev, "dev-2575")  # 3 events; the last has 解剖部位 肝门，胆管
    pred = row["target"].replace("肝门，胆管", "胆管，肝门")
    # TP 2, FP 1, FN 1 -> 2/3
    assert _score_one(row, pred) == pytest.approx(2 / 3)


def test_cdee_half_width_separators_and_no_header(dev):
    row = _row(dev, "dev-2285")  # 主体词：包块；发生状态：不确定；描述词：；解剖部位：盆腔
    assert _score_one(row, "主体词:包块;发生状态:不确定;描述词:;解剖部位:盆腔") == 1.0
    assert _score_one(row, "主体词：包块；发生状态：；描述词：；解剖部位：盆腔") == 0.0


def test_cdn_keeps_only_choices(dev):
    row = _row(dev, "dev-12883")  # 双子宫，双阴道; choices include 双尿道
    # 双尿道 is a choice (FP), 子宫畸形 is not and is dropped: TP 1, FP 1, FN 1 -> 0.5
    assert _score_one(row, "双子宫，双尿道，子宫畸形") == pytest.approx(0.5)
    # only the last line counts
    assert _score_one(row, "归一后的标准词：\n双子宫，双阴道") == 1.0


def test_mdcfnpc_label_outside_choices(dev):
    row = _row(dev, "dev-113913")  # 痛 and 蛀牙疼痛, both 已有症状疾病或者假设未来可能发生的疾病等
    pred = (
        "上述对话中临床发现实体以及其阴阳性判别如下：\n痛：阳性\n"
        "蛀牙疼痛：已有症状疾病或者假设未来可能发生的疾病等"
    )
    # (痛, 不标注) is wrong: TP 1, FP 1, FN 1 -> 0.5
    assert _score_one(row, pred) == pytest.approx(0.5)
    # the lead-in line is optional
    assert _score_one(row, "\n".join(row["target"].split("\n")[1:])) == 1.0


def test_sr_fallback_label_is_a_real_label(dev):
    negative = _row(dev, "dev-21821")  # 发烧：没有患有该症状
    assert _score_one(negative, "当前对话中的症状及其阴阳性判断为：\n发烧：阴性") == 0.0
    unsure = _row(dev, "dev-30634")  # 细菌感染：无法根据上下文确定病人是否患有该症状
    # an invalid label falls back to 无法根据上下文确定…, which is right here (as officially)
    assert _score_one(unsure, "当前对话中的症状及其阴阳性判断为：\n细菌感染：不知道") == 1.0


def test_qic_macro_f1_with_one_wrong_label(dev):
    rows = [r for r in dev if r["task_dataset"] == "KUAKE-QIC"]
    assert [r["target"] for r in rows] == ["就医建议"] * 5
    preds = ["就医建议"] * 4 + ["病因分析"]
    # 就医建议: P 1, R 4/5 -> F1 8/9; 病因分析 (predicted only): F1 0 -> macro 4/9
    assert score_task("KUAKE-QIC", "cls", preds, rows, "lenient") == pytest.approx(4 / 9)


def test_qtr_weighted_f1(dev):
    rows = [r for r in dev if r["task_dataset"] == "KUAKE-QTR"]
    golds = [r["target"] for r in rows]
    assert golds == [
        "很少匹配有一些参考价值", "完全匹配", "完全匹配", "完全匹配", "完全不匹配或者没有参考价值",
    ]  # fmt: skip
    preds = golds.copy()
    preds[1] = "部分匹配"
    # 完全匹配 (support 3): P 1, R 2/3 -> 0.8; the other two gold labels 1.0; 部分匹配 0 with
    # support 0 -> weighted (1 + 3 * 0.8 + 1) / 5 = 0.88 (true micro-F1 would be 4/5)
    assert score_task("KUAKE-QTR", "matching", preds, rows, "lenient") == pytest.approx(0.88)


def test_sts_synonyms_and_empty_label(dev):
    row = _row(dev, "dev-22274")  # 是的
    assert _score_one(row, "相同") == 1.0
    assert _score_one(row, " 是的 \n") == 1.0
    assert _score_one(row, "") == 1.0  # an empty answer becomes the official first label 是的
    ctc = [r for r in dev if r["task_dataset"] == "CHIP-CTC"]  # all 非上述类型
    assert score_task("CHIP-CTC", "cls", [""] * len(ctc), ctc, "lenient") == 1.0


def test_meddg_truncated_reply(dev):
    row = _row(dev, "dev-83507")
    gold = row["target"]  # only Chinese characters and "，。": one token per character
    n = len(gold)
    # LCS = 10, P = 1, R = 10/n -> F = 2 * 10 / (n + 10)
    assert _score_one(row, gold[:10]) == pytest.approx(20 / (n + 10))
    # an empty reply is scored as "无。" (officially): LCS 1 (the "。") -> 2 * 1 / (2 + n)
    assert _score_one(row, "") == pytest.approx(2 / (2 + n))


def test_mrg_truncated_report(dev):
    row = _row(dev, "dev-335")
    pred = (
        "上述问诊对话的诊疗报告如下：\n主诉：大便次数多。\n"
        "现病史：患儿大便次数增多两天。\n辅助检查：暂缺。"
    )
    # Missing sections are scored as "无。" (2 tokens) against the gold section, LCS 1 ("。"):
    # 既往史 "不详。" (3 tokens): 2/5; 诊断 "消化不良。" (5): 2/7;
    # 建议 "益生菌，别着凉。" (8): 2/10 = 1/5
    expected = (1 + 1 + 1 + 2 / 5 + 2 / 7 + 1 / 5) / 6
    assert _score_one(row, pred) == pytest.approx(expected)


def test_mrg_sections_in_any_order_without_header(dev):
    row = _row(dev, "dev-335")
    lines = row["target"].split("\n")[1:]
    assert _score_one(row, "\n".join(reversed(lines))) == 1.0


def test_overall_is_mean_of_tasks(dev):
    preds = [r["target"] for r in dev]
    qic = [i for i, r in enumerate(dev) if r["task_dataset"] == "KUAKE-QIC"]
    preds[qic[-1]] = "病因分析"  # KUAKE-QIC drops to 4/9 (see above)
    result = score_predictions(dev, preds, "lenient")
    assert result["per_task"]["KUAKE-QIC"] == pytest.approx(4 / 9)
    assert result["overall"] == pytest.approx((15 + 4 / 9) / 16)
    assert sum(result["num_rows"].values()) == 80


def test_mixed_splits_group_by_task(train, dev):
    rows = train + dev
    result = score_predictions(rows, [r["target"] for r in rows], "lenient")
    assert result["num_rows"] == dict.fromkeys(SIXTEEN, 10)
    assert result["overall"] == 1.0


# --------------------------------------------------------------------------------------------
# Fallback by task_type, metric names, errors
# --------------------------------------------------------------------------------------------

NER_CHOICES = ["症状", "药物", "身体部位"]
NER_GOLD = "上述句子中的实体包含：\n症状实体：心悸，头晕\n药物实体：布洛芬\n身体部位实体：胸部"


def _demo(task: str, task_type: str, target: str, choices: list[str] | None = None) -> dict:
    return {
        "input": "…",
        "target": target,
        "answer_choices": choices,
        "task_type": task_type,
        "task_dataset": task,
        "sample_id": f"{task}-x",
    }


def test_fallback_cls_is_macro_and_matching_is_weighted():
    sts_gold = ["是的", "是的", "是的", "不是"]
    sts_pred = ["是的", "是的", "不是", "不是"]
    # 是的: P 1, R 2/3 -> 0.8 (support 3); 不是: P 1/2, R 1 -> 2/3 (support 1)
    rows = [_demo("DEMO-STS", "matching", g, ["是的", "不是"]) for g in sts_gold]
    assert score_task("DEMO-STS", "matching", sts_pred, rows, "lenient") == pytest.approx(
        (3 * 0.8 + 2 / 3) / 4
    )
    rows = [_demo("DEMO-CLS", "cls", g, ["是的", "不是"]) for g in sts_gold]
    assert score_task("DEMO-CLS", "cls", sts_pred, rows, "lenient") == pytest.approx(
        (0.8 + 2 / 3) / 2
    )


def test_fallback_ner_is_cmeee_style():
    row = _demo("DEMO-NER", "ner", NER_GOLD, NER_CHOICES)
    pred = "上述句子中的实体包含：\n症状实体：心悸\n药物实体：布洛芬\n身体部位实体：胸部"
    # TP 3, FN 1 -> P 1, R 3/4 -> 6/7
    assert _score_one(row, pred) == pytest.approx(6 / 7)
    assert _score_one(row, NER_GOLD) == 1.0


def test_fallback_report_generation_is_plain_rouge():
    row = _demo("DEMO-GEN", "report_generation", "主诉：头痛。\n建议：休息。")
    # plain Rouge-L, no sections: 12 gold tokens, 6 predicted, LCS 6 -> 2 * 6 / 18 = 2/3
    # (MRG sections would give (1 + 2/5) / 2 = 0.7)
    assert _score_one(row, "主诉：头痛。") == pytest.approx(2 / 3)


def test_fallback_other_types_score_gold_as_one():
    rows = [
        _demo(
            "DEMO-SPO",
            "spo_generation",
            "具有病因关系的头尾实体对如下：头实体为感冒，尾实体为受凉。",
        ),
        _demo(
            "DEMO-EVT",
            "event_extraction",
            "事件如下：\n主体词：咳嗽；发生状态：；描述词：间断；解剖部位：",
        ),
        _demo("DEMO-NORM", "normalization", "咳嗽，发热", ["咳嗽", "发热", "头痛"]),
        _demo("DEMO-ATTR", "attr_cls", "判别如下：\n咳嗽：阳性\n发热：阴性", ["阳性", "阴性"]),
        _demo("DEMO-CHAT", "response_generation", "多喝水，注意休息。"),
    ]
    result = score_predictions(rows, [r["target"] for r in rows], "lenient")
    assert result["per_task"] == dict.fromkeys([r["task_dataset"] for r in rows], 1.0)
    assert _score_one(rows[3], "咳嗽：阳性\n发热：阳性") == pytest.approx(0.5)


def test_metric_names():
    assert metric_name("CHIP-CTC") == "macro-F1"
    assert metric_name("KUAKE-IR") == "weighted-F1"
    assert metric_name("CMeIE") == "micro-F1"
    assert metric_name("IMCS-V2-MRG") == "Rouge-L (sections)"
    assert metric_name("DEMO-GEN", "report_generation") == "Rouge-L"
    assert len(PROMPTCBLUE_TASKS) == 17  # the 16 tasks plus CMeIE's V2 name


def test_unknown_task_raises_clear_error():
    row = _demo("MYSTERY", "qa", "答案")
    with pytest.raises(ValueError, match=r"'MYSTERY'.*task_type 'qa'.*cls, matching, ner"):
        score_task("MYSTERY", "qa", ["答案"], [row])
    with pytest.raises(UserError):
        score_predictions([row], ["答案"], "lenient")


def test_length_mismatch_and_empty_input():
    row = _demo("DEMO-CLS", "cls", "是的", ["是的", "不是"])
    with pytest.raises(ValueError, match="2 predictions for 1 rows"):
        score_task("DEMO-CLS", "cls", ["是的", "不是"], [row])
    with pytest.raises(ValueError):
        score_predictions([row], [], "lenient")
    with pytest.raises(ValueError):
        score_predictions([], [], "lenient")
