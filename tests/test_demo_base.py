"""The shipped demo base (data/demo_base): it matches the shipped tokenizer and the tiny shape, and
the text it was pretrained on never holds a dev complaint or a task's instruction, and teaches
true things (the exercises' answers are checked against the world's rules)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from moelora.config import TinyModelConfig
from moelora.paths import DATA_DIR
from tests.conftest import load_script

build_demo_base = load_script("build_demo_base")
build_demo_data = load_script("build_demo_data")

BASE = DATA_DIR / "demo_base"
# What only the tasks' prompts and answers say (scripts/build_demo_data.py's templates).
TASK_PHRASES = ("实体识别", "实体类型", "实体包含", "挂哪个科室", "选项：", "就诊建议", "建议到")
TASK_PHRASES += ("同一组症状", "答：")


def test_the_shipped_base_has_the_tiny_shape_and_the_shipped_vocabulary() -> None:
    config = AutoConfig.from_pretrained(BASE)
    shape = TinyModelConfig()
    tokenizer = AutoTokenizer.from_pretrained(DATA_DIR / "tokenizer")
    assert (config.hidden_size, config.num_hidden_layers) == (shape.hidden_size, shape.num_layers)
    assert config.vocab_size == len(tokenizer)
    weights = load_file(BASE / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (len(tokenizer), shape.hidden_size)
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


@pytest.fixture(scope="module")
def documents() -> list[str]:
    corpus = build_demo_base.Corpus("test", build_demo_base.dev_complaints())
    return [corpus.document() for _ in range(3000)]


def test_the_pretraining_text_never_holds_a_dev_complaint(documents) -> None:
    dev = build_demo_base.dev_complaints()
    assert len(dev) == 200
    assert not [d for d in documents if any(c in d for c in dev)]


def test_the_pretraining_text_never_holds_a_task_prompt_or_answer(documents) -> None:
    assert not [d for d in documents if any(p in d for p in TASK_PHRASES)]
    assert any("\n两段话的症状一样吗？" in d for d in documents)  # the comparing exercises
    assert any("\n提到：" in d for d in documents)  # and the reading ones


def test_yes_and_no_only_answer_the_bases_own_questions(documents) -> None:
    """The base knows the words 是的 and 不是 (a base that never saw them cannot learn to tell
    them apart), but only as answers to its own questions, never after a task's prompt."""
    answers = [m for d in documents for m in re.finditer("是的|不是", d)]
    assert len(answers) > 100
    assert all(m.string[m.start() - 2 : m.start()] == "吗？" for m in answers)


def test_a_yes_no_exercise_answers_by_the_worlds_tables() -> None:
    corpus = build_demo_base.Corpus("yes-no", set())
    seen = set()
    for _ in range(100):
        document = corpus.yes_no()
        pairs = re.findall("(.+?吗？)(是的|不是)。", document)
        assert "".join(f"{q}{a}。" for q, a in pairs) == document
        for question, answer in pairs:
            if "多见于" in question:
                symptom, dept = question.removesuffix("吗？").split("多见于")
                truth, kind = build_demo_data.SYMPTOMS[symptom][0] == dept, "dept"
            elif question.startswith("“"):
                text, term = question.removeprefix("“").removesuffix("了吗？").split("”提到")
                truth, kind = term in text, "mention"
            else:
                term, label = question.removesuffix("吗？").split("是", 1)
                truth, kind = term in build_demo_base.KINDS[label], "kind"
            assert answer == ("是的" if truth else "不是"), question
            seen.add((kind, truth))
    assert len(seen) == 6  # every kind of question, answered both ways


def test_a_reading_exercise_lists_the_terms_in_order_of_appearance() -> None:
    text = build_demo_base.Corpus("reading", set()).reading()
    complaint, terms = text.split("\n提到：")
    names = terms.rstrip("。").split("、")
    assert names and all(name in build_demo_base.TERMS for name in names)
    assert [complaint.index(n) for n in names] == sorted(complaint.index(n) for n in names)


def test_a_comparing_exercise_says_whether_and_where_the_symptoms_differ() -> None:
    corpus = build_demo_base.Corpus("comparing", set())
    answers = set()
    for _ in range(50):
        pair, answer = corpus.comparing().split("\n")
        first, second = pair.removeprefix("“").removesuffix("”").split("”和“")
        sets = [
            set(build_demo_data.find_entities(t, build_demo_data.SYMPTOM_NAMES))
            for t in (first, second)
        ]
        same, named = re.fullmatch(
            "两段话的症状一样吗？(是的|不是)。症状的差别：(.+)。", answer
        ).groups()
        assert (set(named.split("、")) if named != "无" else set()) == sets[0] ^ sets[1]
        assert same == ("是的" if sets[0] == sets[1] else "不是")
        answers.add(same)
    assert answers == {"是的", "不是"}
