"""Bad data stops before the model loads, with one sentence naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelora.config import DataConfig, ModelConfig
from moelora.data.pipeline import prepare_data
from moelora.data.reader import load_split
from moelora.errors import UserError
from moelora.modeling import load_tokenizer
from moelora.paths import DATA_DIR

ROW = {
    "input": "问：头痛？\n答：",
    "target": "神经内科",
    "answer_choices": None,
    "task_type": "cls",
    "task_dataset": "A",
    "sample_id": "s1",
}


def write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows
        ),
        encoding="utf-8",
    )
    return path


def test_row_without_target_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", [ROW, ROW, {k: v for k, v in ROW.items() if k != "target"}])
    with pytest.raises(UserError, match=r"train.jsonl:3 has no 'target' field"):
        load_split(str(tmp_path), ["train.jsonl"], "data.train_files", None)


def test_non_json_line_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", [ROW, "{not json", ROW])
    with pytest.raises(UserError, match=r"train.jsonl:2 is not valid JSON"):
        load_split(str(tmp_path), ["train.jsonl"], "data.train_files", None)


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(UserError, match=r"train.jsonl is empty"):
        load_split(str(tmp_path), ["train.jsonl"], "data.train_files", None)
    with pytest.raises(UserError, match=r"data.train_files names 'nope.jsonl'"):
        load_split(str(tmp_path), ["nope.jsonl"], "data.train_files", None)


def test_task_with_zero_rows_after_filtering(tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", [ROW])
    with pytest.raises(UserError, match=r"\['B'\] chosen by the config have zero rows"):
        load_split(str(tmp_path), ["train.jsonl"], "data.train_files", ["A", "B"])


def _data(tmp_path: Path, train: list, dev: list, **kw) -> DataConfig:
    write(tmp_path / "train.jsonl", train)
    write(tmp_path / "dev.jsonl", dev)
    return DataConfig(name="t", root=str(tmp_path), **kw)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(
        ModelConfig(name="tiny", name_or_path="tiny", tokenizer=str(DATA_DIR / "tokenizer"))
    )


def test_unknown_task_in_eval_set(tmp_path: Path, tokenizer) -> None:
    cfg = _data(tmp_path, [ROW], [{**ROW, "task_dataset": "Z"}])
    with pytest.raises(UserError, match="task 'Z' is not one the model was trained on"):
        prepare_data(cfg, tokenizer)


def test_length_policy(tmp_path: Path, tokenizer) -> None:
    long_answer = {**ROW, "target": "很长的回答" * 40, "sample_id": "long"}
    rows = [ROW, long_answer]
    with pytest.raises(UserError, match=r"row 2 of the train set \(sample_id long"):
        prepare_data(
            _data(tmp_path, rows, [ROW], length_policy="error", max_target_length=16), tokenizer
        )
    data = prepare_data(_data(tmp_path, rows, [ROW], max_target_length=16), tokenizer)
    assert len(data.train) == 1 and data.reports["train"].dropped["A"] == 1
    long_input = {**ROW, "input": "病史" * 200 + "\n答：", "sample_id": "li"}
    data = prepare_data(_data(tmp_path, [long_input], [ROW], max_source_length=24), tokenizer)
    prompt = data.train[0]["prompt_ids"]
    assert len(prompt) <= 24 and data.reports["train"].truncated["A"] == 1
    assert tokenizer.decode(prompt).endswith("答：")  # the question end survives the cut
    labels = [t for t in data.train[0]["labels"] if t != -100]
    assert tokenizer.decode(labels[:-1]) == ROW["target"]  # the answer is never cut


def test_a_saved_dataset_folder_is_read_like_a_file(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list([ROW, {**ROW, "sample_id": "s2"}]).save_to_disk(str(tmp_path / "train"))
    rows = load_split(str(tmp_path), ["train"], "data.train_files", None)
    assert rows["sample_id"] == ["s1", "s2"] and rows.column_names[:3] == [
        "input",
        "target",
        "task_dataset",
    ]


def test_chat_template_formats_the_prompt_and_keeps_loss_on_the_answer(tmp_path, tokenizer):
    from moelora.data.formatting import PromptFormatter

    chat = tokenizer.__class__.from_pretrained(str(DATA_DIR / "tokenizer"))
    chat.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    cfg = _data(tmp_path, [ROW], [ROW], system_prompt="你是医生。")
    formatter = PromptFormatter(chat, cfg)
    assert formatter.use_chat
    prompt = chat.decode(formatter.prompt_ids(ROW["input"]))
    assert prompt == f"<s>system\n你是医生。</s><s>user\n{ROW['input']}</s><s>assistant\n"
    data = prepare_data(cfg, chat)
    labels = [t for t in data.train[0]["labels"] if t != -100]
    assert chat.decode(labels) == ROW["target"] + "</s>"
    plain = PromptFormatter(chat, _data(tmp_path, [ROW], [ROW], template="plain"))
    assert chat.decode(plain.prompt_ids(ROW["input"])) == ROW["input"]


def test_a_datasets_folder_with_splits_is_a_source(tmp_path: Path, tokenizer) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "train.jsonl", [ROW, {**ROW, "sample_id": "s2"}])
    write(folder / "validation.jsonl", [{**ROW, "sample_id": "d1"}])
    cfg = DataConfig(name="t", root=str(tmp_path), dataset=str(folder))
    data = prepare_data(cfg, tokenizer)
    assert data.train["sample_id"] == ["s1", "s2"] and data.eval["sample_id"] == ["d1"]
    with pytest.raises(UserError, match="data.eval_split='dev' is not a split"):
        prepare_data(
            DataConfig(name="t", root=".", dataset=str(folder), eval_split="dev"), tokenizer
        )
    with pytest.raises(UserError, match="could not load data.dataset="):
        prepare_data(DataConfig(name="t", root=".", dataset=str(tmp_path / "nope")), tokenizer)


def test_truncation_keeps_the_chat_header_and_the_question(tmp_path, tokenizer) -> None:
    from moelora.data.formatting import PromptFormatter

    chat = tokenizer.__class__.from_pretrained(str(DATA_DIR / "tokenizer"))
    chat.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    cfg = _data(tmp_path, [ROW], [ROW], max_source_length=40)
    ids, cut = PromptFormatter(chat, cfg).fit_prompt("病史" * 100 + "\n答：")
    text = chat.decode(ids)
    assert cut and len(ids) <= 40
    assert text.startswith("<s>user\n") and text.endswith("答：</s><s>assistant\n")
