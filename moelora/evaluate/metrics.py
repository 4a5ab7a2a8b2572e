"""Small, pure metric functions (no third-party dependency). Every score is a float in [0, 1].

- Tuple tasks (information extraction) use the strict micro-F1 of `micro_f1_sets`: a predicted tuple
  counts only if it equals a gold tuple exactly; TP/FP/FN are summed over all rows, then one F1.
- Single-label tasks use one of three averages over labels (labels = those seen in gold or
  prediction, as sklearn's `classification_report` does):
  `macro_f1` (mean of per-label F1), `weighted_f1` (per-label F1 weighted by gold support: what
  PromptCBLUE's official scorer returns for its tasks it calls "micro-F1"), and `label_micro_f1`
  (true micro-F1: TP/FP/FN summed over labels, which for one label per row equals accuracy).
  `moelora.evaluate.promptcblue` says which one each task uses.
- Generation tasks use `char_rouge_l`: Rouge-L F1 on the tokens of `zh_tokens` (each Chinese
  character and each punctuation mark is a token, runs of Latin letters or digits stay one token),
  which is the official scorer's `BasicTokenizer` + `rouge_chinese` Rouge-L.

Degenerate cases are defined, never NaN: an F1 with nothing to find and nothing predicted
(TP = FP = FN = 0) is 1.0; Rouge-L of two empty token lists is 1.0, of one empty list 0.0.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

__all__ = [
    "char_rouge_l",
    "f1_from_counts",
    "label_micro_f1",
    "lcs_length",
    "macro_f1",
    "micro_f1_sets",
    "per_label_f1",
    "prf_from_counts",
    "rouge_l_f",
    "weighted_f1",
    "zh_tokens",
]


# --------------------------------------------------------------------------------------------
# Counts -> precision, recall, F1
# --------------------------------------------------------------------------------------------


def prf_from_counts(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts; a zero denominator gives 0 (sklearn's
    `zero_division=0`), except that TP = FP = FN = 0 (nothing to find, nothing found) gives 1."""
    if tp < 0 or fp < 0 or fn < 0:
        raise ValueError(f"counts must be non-negative, got tp={tp}, fp={fp}, fn={fn}")
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    if tp == 0:
        return 0.0, 0.0, 0.0
    precision = tp / (tp + fp)
    recall = tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall)


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 = 2PR / (P + R) from counts (see `prf_from_counts` for the zero cases)."""
    return prf_from_counts(tp, fp, fn)[2]


def micro_f1_sets(
    golds: Iterable[Iterable[Hashable]], preds: Iterable[Iterable[Hashable]]
) -> float:
    """Strict micro-F1 over rows of tuples: each row's gold and predicted items become sets
    (duplicates count once), TP/FP/FN are summed over the rows, and one F1 is computed."""
    gold_rows, pred_rows = list(golds), list(preds)
    if len(gold_rows) != len(pred_rows):
        raise ValueError(f"{len(gold_rows)} gold rows but {len(pred_rows)} predicted rows")
    tp = fp = fn = 0
    for gold_items, pred_items in zip(gold_rows, pred_rows, strict=True):
        gold, pred = set(gold_items), set(pred_items)
        tp += len(gold & pred)
        fp += len(pred - gold)
        fn += len(gold - pred)
    return f1_from_counts(tp, fp, fn)


# --------------------------------------------------------------------------------------------
# Single-label classification
# --------------------------------------------------------------------------------------------


def _check_labels(golds: Sequence[Hashable], preds: Sequence[Hashable]) -> None:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predicted labels")
    if not golds:
        raise ValueError("cannot score an empty list of labels")


def per_label_f1(
    golds: Sequence[Hashable], preds: Sequence[Hashable]
) -> dict[Hashable, tuple[float, int]]:
    """Per-label (F1, gold support) over the labels seen in gold or prediction, one label per row.
    A label with no true positive has F1 0 (sklearn's `zero_division=0`)."""
    _check_labels(golds, preds)
    support = Counter(golds)
    predicted = Counter(preds)
    correct = Counter(g for g, p in zip(golds, preds, strict=True) if g == p)
    result: dict[Hashable, tuple[float, int]] = {}
    for label in {*support, *predicted}:
        tp = correct[label]
        f1 = f1_from_counts(tp, predicted[label] - tp, support[label] - tp) if tp else 0.0
        result[label] = (f1, support[label])
    return result


def macro_f1(golds: Sequence[Hashable], preds: Sequence[Hashable]) -> float:
    """Macro-F1: the unweighted mean of per-label F1 over the labels seen in gold or prediction
    (sklearn's `classification_report(...)["macro avg"]["f1-score"]`)."""
    scores = per_label_f1(golds, preds)
    return sum(f1 for f1, _ in scores.values()) / len(scores)


def weighted_f1(golds: Sequence[Hashable], preds: Sequence[Hashable]) -> float:
    """Support-weighted F1: per-label F1 weighted by the label's gold count (sklearn's
    `["weighted avg"]["f1-score"]`, which PromptCBLUE's official scorer reports as "micro-F1")."""
    scores = per_label_f1(golds, preds)
    return sum(f1 * n for f1, n in scores.values()) / len(golds)


def label_micro_f1(golds: Sequence[Hashable], preds: Sequence[Hashable]) -> float:
    """True micro-F1 over labels: TP/FP/FN summed over all labels. With exactly one gold and one
    predicted label per row, FP = FN = number of wrong rows, so this equals accuracy."""
    _check_labels(golds, preds)
    tp = sum(g == p for g, p in zip(golds, preds, strict=True))
    wrong = len(golds) - tp
    return f1_from_counts(tp, wrong, wrong)


# --------------------------------------------------------------------------------------------
# Rouge-L on Chinese characters
# --------------------------------------------------------------------------------------------

_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(char: str) -> bool:
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def zh_tokens(text: str) -> list[str]:
    """Tokens for Chinese Rouge, as BERT's `BasicTokenizer(tokenize_chinese_chars=True)` makes
    them: control characters dropped, each CJK character its own token, text lower-cased and
    accents stripped, each punctuation mark its own token, other runs (Latin words, numbers) kept
    whole, whitespace only separating. Example: "CRP正常, 1.5" -> ["crp", "正", "常", ",", "1",
    ".", "5"]."""
    kept = []
    for char in text:
        if ord(char) in (0, 0xFFFD) or _is_control(char):
            continue
        if _is_whitespace(char):
            kept.append(" ")
        elif _is_cjk(ord(char)):
            kept.append(f" {char} ")
        else:
            kept.append(char)
    tokens: list[str] = []
    for raw in unicodedata.normalize("NFC", "".join(kept)).split():
        word = ""
        for char in unicodedata.normalize("NFD", raw.lower()):
            if unicodedata.category(char) == "Mn":
                continue
            if _is_punctuation(char):
                if word:
                    tokens.append(word)
                tokens.append(char)
                word = ""
            else:
                word += char
        if word:
            tokens.append(word)
    return tokens


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time,
    O(min) memory)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_f(pred: Sequence[Hashable], ref: Sequence[Hashable]) -> float:
    """Rouge-L F1 of two token sequences: P = LCS/len(pred), R = LCS/len(ref), F = 2PR/(P+R)
    = 2 LCS / (len(pred) + len(ref)). Two empty sequences give 1.0, one empty sequence 0.0."""
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    return 2 * lcs_length(pred, ref) / (len(pred) + len(ref))


def char_rouge_l(pred: str, ref: str) -> float:
    """Rouge-L F1 of two texts on `zh_tokens` (characters for Chinese)."""
    return rouge_l_f(zh_tokens(pred), zh_tokens(ref))
