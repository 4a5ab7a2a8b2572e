"""The shipped demo dataset (data/demo) and tokenizer (data/tokenizer) follow their contract.

Targets are recomputed here from the input text and the world tables alone, so these tests check
that every answer is derivable from its input by the documented rules.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import REPO, load_script

DATA_DIR = REPO / "data"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
SPLITS = {"train": 500, "dev": 40}
KEYS = {"input", "target", "answer_choices", "task_type", "task_dataset", "sample_id"}
TASK_TYPES = {
    "DEMO-CLS": "cls",
    "DEMO-STS": "matching",
    "DEMO-NER": "ner",
    "DEMO-GEN": "report_generation",
}


builder = load_script("build_demo_data")


def _read(split: str) -> list[dict]:
    path = DATA_DIR / "demo" / f"{split}.jsonl"
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: _read(split) for split in SPLITS}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def _in_order(text: str, names) -> list[str]:
    found = [(text.index(name), name) for name in names if name in text]
    return [name for _, name in sorted(found)]


def _complaints(row: dict) -> list[str]:
    text = row["input"]
    if row["task_dataset"] == "DEMO-STS":
        match = re.fullmatch(
            r"“(.+)”和“(.+)”描述的是同一组症状吗？\n选项：是的，不是\n答：", text, re.S
        )
        assert match, text
        return [match.group(1), match.group(2)]
    if row["task_dataset"] == "DEMO-NER":
        match = re.fullmatch(r"实体识别：\n(.+)\n实体类型：症状，药物，身体部位\n答：", text, re.S)
    elif row["task_dataset"] == "DEMO-CLS":
        match = re.fullmatch(r"(.+)\n这位患者应该挂哪个科室？\n选项：(.+)\n答：", text, re.S)
    else:
        match = re.fullmatch(r"(.+)\n请给出就诊建议。\n答：", text, re.S)
    assert match, text
    return [match.group(1)]


def _expected_target(row: dict) -> str:
    symptoms_table = builder.SYMPTOMS
    complaints = _complaints(row)
    symptoms = [_in_order(c, symptoms_table) for c in complaints]
    task = row["task_dataset"]
    if task == "DEMO-CLS":
        return symptoms_table[symptoms[0][0]][0]
    if task == "DEMO-GEN":
        dept, drug = symptoms_table[symptoms[0][0]]
        return f"建议到{dept}就诊，可服用{drug}，注意休息。"
    if task == "DEMO-STS":
        return "是的" if set(symptoms[0]) == set(symptoms[1]) else "不是"
    text = complaints[0]
    drugs = _in_order(text, builder.DRUGS)
    parts = _in_order(text, builder.BODY_PARTS)
    return (
        "上述句子中的实体包含：\n"
        f"症状实体：{'，'.join(symptoms[0])}\n"
        f"药物实体：{'，'.join(drugs)}\n"
        f"身体部位实体：{'，'.join(parts)}"
    )


# ------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------


def test_world_tables() -> None:
    builder.check_world()
    assert len(builder.SYMPTOMS) == 20
    assert len(builder.DRUGS) == 10
    assert len(builder.BODY_PARTS) == 8
    assert len(builder.DEPARTMENTS) == 5


@pytest.mark.parametrize("split", list(SPLITS))
def test_rows_shape_and_counts(rows: dict[str, list[dict]], split: str) -> None:
    data = rows[split]
    per_task = SPLITS[split]
    assert Counter(r["task_dataset"] for r in data) == dict.fromkeys(TASK_TYPES, per_task)
    for i, row in enumerate(data):
        assert set(row) == KEYS
        assert row["sample_id"] == f"demo-{split}-{i:06d}"
        assert row["task_type"] == TASK_TYPES[row["task_dataset"]]
        assert isinstance(row["input"], str) and row["input"].endswith("\n答：")
        assert isinstance(row["target"], str) and row["target"]
        choices = row["answer_choices"]
        assert choices is None or all(isinstance(c, str) for c in choices)
    inputs = [r["input"] for r in data]
    assert len(set(inputs)) == len(inputs)


def test_files_are_utf8_not_escaped() -> None:
    text = (DATA_DIR / "demo" / "dev.jsonl").read_text(encoding="utf-8")
    assert "\\u" not in text and "患者" in text
    assert text.endswith("\n")


@pytest.mark.parametrize("split", list(SPLITS))
def test_targets_follow_rules(rows: dict[str, list[dict]], split: str) -> None:
    for row in rows[split]:
        assert row["target"] == _expected_target(row), row["sample_id"]


@pytest.mark.parametrize("split", list(SPLITS))
def test_answer_choices(rows: dict[str, list[dict]], split: str) -> None:
    for row in rows[split]:
        task, choices = row["task_dataset"], row["answer_choices"]
        if task == "DEMO-CLS":
            assert sorted(choices) == sorted(builder.DEPARTMENTS)
            assert row["input"].split("\n")[-2] == "选项：" + "，".join(choices)
            assert row["target"] in choices
        elif task == "DEMO-STS":
            assert choices == ["是的", "不是"] and row["target"] in choices
        elif task == "DEMO-NER":
            assert choices == ["症状", "药物", "身体部位"]
        else:
            assert choices is None


@pytest.mark.parametrize("split", list(SPLITS))
def test_sts_balanced_and_cls_covers_all_departments(
    rows: dict[str, list[dict]], split: str
) -> None:
    sts = Counter(r["target"] for r in rows[split] if r["task_dataset"] == "DEMO-STS")
    assert sts["是的"] == sts["不是"] == SPLITS[split] // 2
    cls = {r["target"] for r in rows[split] if r["task_dataset"] == "DEMO-CLS"}
    assert cls == set(builder.DEPARTMENTS)


def test_complaint_lengths_and_dev_disjoint(rows: dict[str, list[dict]]) -> None:
    complaints = {split: [c for r in rows[split] for c in _complaints(r)] for split in SPLITS}
    for split_complaints in complaints.values():
        for complaint in split_complaints:
            assert 20 <= len(complaint) <= 60, complaint
            assert 1 <= len(_in_order(complaint, builder.SYMPTOMS)) <= 3
    assert not set(complaints["dev"]) & set(complaints["train"])


def test_builder_is_deterministic(tmp_path: Path) -> None:
    builder.build(tmp_path)
    for split in SPLITS:
        rebuilt = (tmp_path / "demo" / f"{split}.jsonl").read_bytes()
        assert rebuilt == (DATA_DIR / "demo" / f"{split}.jsonl").read_bytes()
    # The BPE model (vocab + merges) must match; the rest of the files' bytes may vary with the
    # transformers/tokenizers versions that serialise them.
    rebuilt_model = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text("utf-8"))
    shipped_model = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text("utf-8"))
    assert rebuilt_model["model"] == shipped_model["model"]


def test_builder_rules_agree_with_independent_recomputation(rows: dict[str, list[dict]]) -> None:
    for row in rows["dev"]:
        assert builder.expected_target(row) == _expected_target(row) == row["target"]


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


def test_tokenizer_files() -> None:
    assert (TOKENIZER_DIR / "tokenizer.json").is_file()
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "chat_template" not in config
    assert not (TOKENIZER_DIR / "chat_template.jinja").exists()


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<pad>",
        "<s>",
        "</s>",
    )
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (0, 1, 2)
    assert len(set(ids)) == 3
    assert not getattr(tokenizer, "chat_template", None)


def test_tokenizer_vocab_size(tokenizer) -> None:
    assert 500 <= len(tokenizer) <= 2048
    assert len(tokenizer) == tokenizer.vocab_size  # no added tokens beyond the trained vocab


def test_tokenizer_adds_no_special_tokens(tokenizer) -> None:
    special = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    for text in ("abc", "患者自述头痛，伴有发热。\n答："):
        ids = tokenizer(text)["input_ids"]
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert not special & set(ids)
    assert tokenizer.encode("</s>", add_special_tokens=False) == [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "text",
    [
        "肺恶性肿瘤，腺癌\n答：",
        "患者自述头痛，伴有发热，服用布洛芬后未缓解。",
        "上述句子中的实体包含：\n症状实体：头痛，发热\n药物实体：\n身体部位实体：",
        "Hello, world!  double  spaces\tand tabs\n",
        "混合 English 与中文：糖尿病（2型）患者 HbA1c=7.5% 🙂",
        " leading space and trailing space ",
        "",
    ],
)
def test_tokenizer_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_round_trips_dataset_and_keeps_entities_whole(tokenizer, rows) -> None:
    names = (*builder.SYMPTOMS, *builder.DRUGS, *builder.BODY_PARTS)
    for row in rows["dev"]:
        for field in ("input", "target"):
            text = row[field]
            encoded = tokenizer(text, return_offsets_mapping=True)
            assert tokenizer.decode(encoded["input_ids"]) == text
            bounds = {b for span in encoded["offset_mapping"] for b in span}
            for name in names:
                start = text.find(name)
                if start >= 0:
                    assert start in bounds and start + len(name) in bounds, (name, text)
