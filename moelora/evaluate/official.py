"""The official PromptCBLUE scorer's reading of answers, quirk for quirk (`eval.scorer=official`).

Written from reading michael-wzhu/PromptCBLUE's `src/evaluation/post_generate_process.py` (answer
text -> structure) and `evaluators.py` / `evaluate.py` (metrics), at the versions named in
`docs/scoring.md`; the code is our own. Gold targets and predictions go through the same parser.
What it does, including what looks like a bug (each of these moves leaderboard numbers):

- Lines are split on "\\n" and not stripped: an entity line must start with "{type}实体" at
  its first character, and a finding or section line keeps its spaces.
- CHIP-CDEE, CHIP-MDCFNPC, IMCS-V2-SR and IMCS-V2-MRG always drop the first line, lead-in or not.
- CHIP-CDEE turns every remaining line into an event, so an empty or unparsable line is an event
  with all fields empty; its 描述词 and 解剖部位 lists are compared in order.
- Entity mentions are the line with "{type}实体：" removed, split on "，": a line cut before its
  colon is itself one mention. Only full-width "：", "，", "；" separate.
- CMeIE's relation is the line's text before "关系的头尾实体对", less its first two characters.
- CHIP-CDN reads the last line only and keeps the terms among `answer_choices`.
- A finding whose label is not a choice gets "不标注" (MDCFNPC) or
  "无法根据上下文确定病人是否患有该症状" (SR); the label is compared unstripped.
- IMCS-V2-MRG: a section value is the text after the last "{section}：" of its line.
- Tuple F1 is 0 when no tuple is right, even when gold and prediction are both empty.
- Label tasks: an empty prediction becomes the task's first official label; F1 is sklearn's
  macro or support-weighted average over the labels seen in gold or prediction.
- Rouge-L F is rouge_chinese's 2PR / (P + R + 1e-8) on BERT BasicTokenizer tokens, with an empty
  text read as "无。".

Tasks that are not PromptCBLUE's are read by the parser of the PromptCBLUE task of their
`task_type`; where the official code needs `answer_choices` and a row has none, the entity types
named in the answer count, and an empty label falls back to the row's first choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moelora.evaluate.metrics import lcs_length, zh_tokens

MRG_SECTIONS = ("主诉", "现病史", "辅助检查", "既往史", "诊断", "建议")
CDEE_FIELDS = ("主体词", "发生状态", "描述词", "解剖部位")
CDEE_LIST_FIELDS = ("描述词", "解剖部位")

EMPTY_LABEL = {
    "CHIP-CTC": "非上述类型",
    "IMCS-V2-DAC": "非上述类型",
    "KUAKE-QIC": "非上述类型",
    "CHIP-STS": "是的",
    "KUAKE-IR": "相关",
    "KUAKE-QQR": "完全一致",
    "KUAKE-QTR": "完全不匹配或者没有参考价值",
}
"""The first label of each task's official label list: what an empty prediction becomes."""

STS_SYNONYMS = {"相同": "是的", "不同": "不是"}


def _mentions(value: str) -> list[str]:
    return [w.strip() for w in value.split("，") if w.strip()]


def parse_entities(text: str, choices: Sequence[str] | None) -> set[tuple[str, str]]:
    """(type, mention) pairs from lines that start with "{type}实体", for each type in
    `choices` (without choices: each type an answer line names before "实体")."""
    lines = text.split("\n")
    types = choices or [line.split("实体")[0] for line in lines if "实体" in line]
    found = set()
    for entity_type in types:
        head = f"{entity_type}实体"
        for line in lines:
            if line.startswith(head):
                found.update((entity_type, m) for m in _mentions(line.replace(f"{head}：", "")))
    return found


def parse_triples(text: str) -> set[tuple[str, str, str]]:
    """(relation, head, tail) from lines "具有{rel}关系的头尾实体对如下：头实体为X，尾实体为Y。"."""
    found = set()
    for line in text.split("\n"):
        relation = line.split("关系的头尾实体对")[0][2:].strip()
        body = line.replace(f"具有{relation}关系的头尾实体对如下：", "")
        for piece in body.split("。"):
            parts = piece.split("，尾实体为")
            if len(parts) < 2:
                continue
            head = parts[0].replace("头实体为", "").strip()
            tail = parts[1].replace("尾实体为", "").strip()
            found.add((relation, head, tail))
    return found


def parse_events(text: str) -> set[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """One event (主体词, 发生状态, 描述词, 解剖部位) per line after the first. A field is read
    from each "；"-separated piece that starts with "{field}："; after one field matched, the
    piece minus that prefix is tried against the fields that follow (as officially)."""
    found = set()
    for line in text.split("\n")[1:]:
        fields: dict[str, Any] = {}
        for piece in line.split("；"):
            for name in CDEE_FIELDS:
                if piece.startswith(f"{name}："):
                    piece = piece.replace(f"{name}：", "").strip()
                    fields[name] = tuple(_mentions(piece)) if name in CDEE_LIST_FIELDS else piece
        found.add(
            (
                fields.get("主体词", ""),
                fields.get("发生状态", ""),
                fields.get("描述词", ()),
                fields.get("解剖部位", ()),
            )
        )
    return found


def parse_normalization(text: str, choices: Sequence[str] | None) -> set[tuple[str]]:
    """The standard terms of the last line, split on "，", that are among `choices`."""
    allowed = set(choices or ())
    return {(w,) for w in _mentions(text.split("\n")[-1]) if w in allowed}


def parse_findings(text: str, choices: Sequence[str] | None, fallback: str) -> set[tuple[str, str]]:
    """(finding, label) from the lines after the first that hold exactly one "："; a label not
    among `choices` becomes `fallback`."""
    allowed = set(choices or ())
    found = set()
    for line in text.split("\n")[1:]:
        parts = line.split("：")
        if len(parts) == 2:
            found.add((parts[0].strip(), parts[1] if parts[1] in allowed else fallback))
    return found


def parse_report(text: str) -> dict[str, str]:
    """The IMCS-V2-MRG sections of the lines after the first; a repeated section keeps its
    last line."""
    lines = text.strip().split("\n")[1:]
    sections = {}
    for name in MRG_SECTIONS:
        for line in lines:
            if line.startswith(f"{name}："):
                sections[name] = line.strip().split(f"{name}：")[-1].strip()
    return sections


def parse_label(text: str, task: str, choices: Sequence[str] | None) -> str:
    """The stripped answer (CHIP-STS: 相同/不同 as 是的/不是); empty becomes the first label."""
    label = text.strip()
    if task == "CHIP-STS":
        label = STS_SYNONYMS.get(label, label)
    return label or EMPTY_LABEL.get(task) or (choices[0] if choices else "")


def finding_fallback(task: str) -> str:
    return "无法根据上下文确定病人是否患有该症状" if task == "IMCS-V2-SR" else "不标注"


def tuple_f1(golds: Sequence[set], preds: Sequence[set]) -> float:
    """Micro-F1 over rows of tuple sets; 0 whenever no tuple is right."""
    tp = fp = fn = 0
    for gold, pred in zip(golds, preds, strict=True):
        tp += len(gold & pred)
        fp += len(pred - gold)
        fn += len(gold - pred)
    if not tp:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


_EMPTY_TEXT = ["无", "。"]


def rouge_l(pred: str, gold: str) -> float:
    """rouge_chinese's Rouge-L F of two texts on BasicTokenizer tokens ("无。" for empty)."""
    pred_tokens = zh_tokens(pred) or _EMPTY_TEXT
    gold_tokens = zh_tokens(gold) or _EMPTY_TEXT
    lcs = lcs_length(pred_tokens, gold_tokens)
    precision, recall = lcs / len(pred_tokens), lcs / len(gold_tokens)
    return 2.0 * (precision * recall / (precision + recall + 1e-8))


def section_pairs(pred: str, gold: str) -> list[tuple[str, str]]:
    """(predicted, gold) value of each section of the gold report; a gold report with no
    section adds no pair."""
    pred_sections = parse_report(pred)
    return [(pred_sections.get(name, ""), value) for name, value in parse_report(gold).items()]
