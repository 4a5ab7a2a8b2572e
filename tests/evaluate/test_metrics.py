"""Hand-computed values for the pure metric functions."""

from __future__ import annotations

import pytest

from moelora.evaluate.metrics import (
    char_rouge_l,
    f1_from_counts,
    label_micro_f1,
    lcs_length,
    macro_f1,
    micro_f1_sets,
    per_label_f1,
    prf_from_counts,
    rouge_l_f,
    weighted_f1,
    zh_tokens,
)


def test_f1_from_counts_hand_computed():
    # P = 2/3, R = 2/3 -> F1 = 2/3
    assert f1_from_counts(2, 1, 1) == pytest.approx(2 / 3)
    # P = 1, R = 1/2 -> F1 = 2 * 1 * 0.5 / 1.5 = 2/3; P = 1/3, R = 1 -> 1/2
    assert prf_from_counts(1, 0, 1) == pytest.approx((1.0, 0.5, 2 / 3))
    assert f1_from_counts(1, 2, 0) == pytest.approx(0.5)


def test_f1_zero_cases():
    assert f1_from_counts(0, 0, 0) == 1.0  # nothing to find, nothing found
    assert f1_from_counts(0, 3, 0) == 0.0
    assert f1_from_counts(0, 0, 3) == 0.0
    with pytest.raises(ValueError):
        f1_from_counts(-1, 0, 0)


def test_micro_f1_sums_counts_over_rows():
    # row 1: TP {a}, FP {c}, FN {b}; row 2: TP {d}  ->  TP=2, FP=1, FN=1 -> 2/3
    golds = [{("a",), ("b",)}, {("d",)}]
    preds = [{("a",), ("c",)}, {("d",)}]
    assert micro_f1_sets(golds, preds) == pytest.approx(2 / 3)
    # duplicates count once: a row is a set
    assert micro_f1_sets([[("a",), ("a",)]], [[("a",)]]) == 1.0
    # micro, not a mean of per-row F1s: row F1s 0 and 1 would average 0.5; counts give
    # TP=1, FP=3, FN=0 -> P=1/4, R=1 -> 0.4
    assert micro_f1_sets([set(), {1}], [{2, 3, 4}, {1}]) == pytest.approx(0.4)
    assert micro_f1_sets([set(), set()], [set(), set()]) == 1.0
    with pytest.raises(ValueError):
        micro_f1_sets([set()], [])


GOLD = ["A", "A", "B", "C"]
PRED = ["A", "B", "B", "A"]
# A: TP 1, FP 1, FN 1 -> F1 1/2 (support 2)
# B: TP 1, FP 1, FN 0 -> P 1/2, R 1 -> F1 2/3 (support 1)
# C: TP 0 -> F1 0 (support 1)


def test_per_label_f1_hand_computed():
    scores = per_label_f1(GOLD, PRED)
    assert set(scores) == {"A", "B", "C"}
    assert scores["A"] == (pytest.approx(0.5), 2)
    assert scores["B"] == (pytest.approx(2 / 3), 1)
    assert scores["C"] == (0.0, 1)


def test_macro_f1_three_labels():
    assert macro_f1(GOLD, PRED) == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)  # 7/18


def test_weighted_f1_three_labels():
    assert weighted_f1(GOLD, PRED) == pytest.approx((2 * 1 / 2 + 1 * 2 / 3 + 1 * 0) / 4)  # 5/12


def test_label_micro_f1_is_accuracy():
    assert label_micro_f1(GOLD, PRED) == pytest.approx(2 / 4)


def test_predicted_only_label_counts_in_macro_not_weighted():
    # labels {x, y}: x TP 1, FN 1 -> F1 2/3 (support 2); y is only predicted -> F1 0 (support 0)
    assert macro_f1(["x", "x"], ["x", "y"]) == pytest.approx((2 / 3 + 0) / 2)
    assert weighted_f1(["x", "x"], ["x", "y"]) == pytest.approx(2 / 3)
    assert label_micro_f1(["x", "x"], ["x", "y"]) == pytest.approx(0.5)


def test_label_metrics_perfect_and_errors():
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0
    assert weighted_f1(["x", "y"], ["x", "y"]) == 1.0
    with pytest.raises(ValueError):
        macro_f1([], [])
    with pytest.raises(ValueError):
        weighted_f1(["x"], ["x", "y"])


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert lcs_length("", "abc") == 0
    assert lcs_length("abc", "abc") == 3


def test_char_rouge_l_hand_computed():
    # LCS("我是一个人", "我是人") = 3: P = 3/3, R = 3/5 -> F = 2*1*0.6/1.6 = 0.75
    assert char_rouge_l("我是人", "我是一个人") == pytest.approx(0.75)
    # LCS("今天天气很好", "今天的天气不错") = "今天天气" = 4: F = 2*4 / (6 + 7) = 8/13
    assert char_rouge_l("今天天气很好", "今天的天气不错") == pytest.approx(8 / 13)
    assert char_rouge_l("头痛", "头痛") == 1.0
    assert char_rouge_l("发热", "咳嗽") == 0.0


def test_rouge_l_empty_cases():
    assert rouge_l_f([], []) == 1.0
    assert rouge_l_f(["a"], []) == 0.0
    assert char_rouge_l("", "头痛") == 0.0


def test_zh_tokens_like_bert_basic_tokenizer():
    # CJK characters and punctuation split, Latin runs and numbers whole, lower-cased.
    assert zh_tokens("CRP正常, 1.5") == ["crp", "正", "常", ",", "1", ".", "5"]
    assert zh_tokens("  益生菌，别着凉。\n") == ["益", "生", "菌", "，", "别", "着", "凉", "。"]
    assert zh_tokens("Café 头") == ["cafe", "头"]
    assert zh_tokens("") == []


def test_zh_tokens_equal_transformers_basic_tokenizer():
    """The official scorer tokenizes with transformers' BasicTokenizer (moved to a legacy module
    in transformers 5); ours must give the same tokens on awkward text."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer
    except ImportError:
        from transformers import BasicTokenizer
    reference = BasicTokenizer(tokenize_chinese_chars=True)
    for text in [
        "CRP正常, 1.5 Café\u2028x",
        "患者：头痛3天，T 38.5℃；WBC 12×10^9/L。",
        "“好的”……？！\x00\ufffd\t\u3000ab",
        "Ünïcödé 𠀀字",
    ]:
        assert zh_tokens(text) == reference.tokenize(text), text
