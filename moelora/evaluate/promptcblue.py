"""PromptCBLUE scoring: parse each answer text back into a structure, then score it per task.

The parsers follow the official scorer (michael-wzhu/PromptCBLUE, src/evaluation/
post_generate_process.py and evaluators.py); the code here is our own. Metric per task:

- strict micro-F1 over tuples:
  CMeEE-V2, IMCS-V2-NER: (type, mention) from lines "{type}实体：a，b";
  CMeIE (also named CMeIE-V2): (relation, head, tail);
  CHIP-CDEE: (主体词, 发生状态, 描述词 list, 解剖部位 list);
  CHIP-CDN: the chosen standard terms (only those in answer_choices);
  CHIP-MDCFNPC, IMCS-V2-SR: (finding, label).
- macro-F1 over labels: CHIP-CTC, IMCS-V2-DAC, KUAKE-QIC.
- weighted F1 over labels: CHIP-STS, KUAKE-IR, KUAKE-QQR, KUAKE-QTR.
- Rouge-L on characters: MedDG (the reply); IMCS-V2-MRG (each of the six sections 主诉, 现病史,
  辅助检查, 既往史, 诊断, 建议 of each row, averaged).

Any other task is scored by its `task_type` with the same parser as the PromptCBLUE task of that
type: cls -> macro-F1 (CHIP-CTC), matching -> weighted F1 (CHIP-STS), ner -> CMeEE-V2,
spo_generation -> CMeIE, event_extraction -> CHIP-CDEE, normalization -> CHIP-CDN,
attr_cls -> CHIP-MDCFNPC, report_generation and response_generation -> plain Rouge-L (the six
sections are used only for IMCS-V2-MRG). The overall score is the mean of the per-task scores.

Where we differ from the official scorer (each choice deliberate):

1. "Micro-F1" of the four label tasks: the official scorer returns sklearn's *weighted* F1 under
   that name; we return the same weighted F1 (`metrics.weighted_f1`) so our numbers match the
   leaderboard's. True micro-F1 (= accuracy here) is `metrics.label_micro_f1`.
2. Empty F1: the official code gives F1 = 0 whenever TP = 0, even when a task's gold and
   prediction are both empty (e.g. CHIP-CDN rows answered "没有对应的标准化实体"); we give 1.0
   when TP = FP = FN = 0. Scores differ only when a task has no gold and no predicted tuple.
3. Rouge-L F uses exact 2PR/(P+R); `rouge_chinese` adds 1e-8 to the denominator, so its
   "perfect" score is 0.99999999. Tokens (BERT BasicTokenizer), the empty text -> "无。" rule and
   the per-row (MRG: per row and section) averaging are the official ones.
4. Messy output is read more leniently, identically for gold and prediction:
   - surrounding whitespace of lines, names and values is stripped;
   - half-width ":" is accepted after an entity type ("症状实体:"), a CDEE field name, a
     finding, an MRG section name and the CMeIE line header; half-width ";" between CDEE fields;
     half-width "," before "尾实体为" (CMeIE) and, in CHIP-CDN, inside an answer piece that is
     not itself a choice (the official code has its half-width -> full-width replacement
     commented out). Half-width "," does NOT separate entity mentions or CDEE values, because
     real names contain it ("1,25-二羟维生素D3"); like the official code we split on "，" only;
   - header lines are recognised by content instead of always dropping the first line
     (CDEE, MDCFNPC, SR, MRG), so an answer without the lead-in line keeps its first item;
   - CHIP-CDEE lines with none of the four field names are skipped (the official code turns
     each into an empty event, an extra false positive), and an entity line cut off before its
     colon ("医疗程序实体") yields no mention (officially the line itself becomes one);
   - an MRG section value is the text after the line's section name (the official code splits
     the line on the name and keeps the last piece). A gold report with no section at all is
     scored as plain text (the official code would crash).
5. An empty label prediction becomes the official fallback (its hard-coded first label:
   "非上述类型" for CHIP-CTC, IMCS-V2-DAC, KUAKE-QIC; "是的", "相关", "完全一致",
   "完全不匹配或者没有参考价值" for CHIP-STS, KUAKE-IR, KUAKE-QQR, KUAKE-QTR), as officially;
   for non-PromptCBLUE tasks (no official list) it becomes the row's first answer choice.

Kept as in the official code: CHIP-CDEE's 描述词 and 解剖部位 lists are compared in order (the
official key is their JSON dump); entity types and CDN terms outside `answer_choices` are
dropped; a finding label outside the choices becomes "不标注" (MDCFNPC) or
"无法根据上下文确定病人是否患有该症状" (IMCS-V2-SR, a valid label, as officially); CMeIE relation
names are not checked against the choices; CHIP-STS maps "相同" -> "是的", "不同" -> "不是";
label answers are compared after `strip()` only; macro and weighted F1 run over the labels seen
in gold or prediction (sklearn's default), not over a fixed label list; MRG's Rouge-L is the mean
over all (row, gold section) pairs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from moelora.errors import UserError
from moelora.evaluate.metrics import (
    macro_f1,
    micro_f1_sets,
    rouge_l_f,
    weighted_f1,
    zh_tokens,
)

__all__ = [
    "PROMPTCBLUE_TASKS",
    "TASK_TYPES",
    "UnknownTaskError",
    "metric_name",
    "parse_answer",
    "score_predictions",
    "score_task",
]

Row = Mapping[str, Any]


class UnknownTaskError(UserError, ValueError):
    """A task that is neither a PromptCBLUE task nor of a known `task_type`."""


# --------------------------------------------------------------------------------------------
# Parsers: answer text -> structure
# --------------------------------------------------------------------------------------------

MRG_SECTIONS = ("主诉", "现病史", "辅助检查", "既往史", "诊断", "建议")
CDEE_FIELDS = ("主体词", "发生状态", "描述词", "解剖部位")
_HEADER_MARKERS = ("如下", "判断为", "包含")


def _lines(text: str) -> list[str]:
    """Non-empty, stripped lines."""
    return [line.strip() for line in (text or "").split("\n") if line.strip()]


def _split_mentions(value: str) -> list[str]:
    """Split a "，"-separated list, dropping blanks."""
    return [w.strip() for w in value.split("，") if w.strip()]


def parse_entities(text: str, choices: Sequence[str] | None) -> set[tuple[str, str]]:
    """(type, mention) pairs from lines "{type}实体：a，b". Only the types in `choices` count;
    with no choices, any "X实体：" line does."""
    if choices:
        pattern = "|".join(re.escape(c) for c in sorted(set(choices), key=len, reverse=True))
        line_re = re.compile(rf"^({pattern})实体[：:](.*)$")
    else:
        line_re = re.compile(r"^(.+?)实体[：:](.*)$")
    found = set()
    for line in _lines(text):
        match = line_re.match(line)
        if match:
            found.update((match.group(1), m) for m in _split_mentions(match.group(2)))
    return found


_SPO_HEADER = re.compile(r"^具有(.*?)关系的头尾实体对(?:如下)?[：:]?")
_SPO_TAIL = re.compile(r"[，,]\s*尾实体为")


def parse_triples(text: str) -> set[tuple[str, str, str]]:
    """(relation, head, tail) from lines "具有{rel}关系的头尾实体对如下：头实体为X，尾实体为Y。…".
    A line without the header keeps its pairs under the relation "" (so they count as wrong)."""
    found = set()
    for line in _lines(text):
        header = _SPO_HEADER.match(line)
        relation = header.group(1).strip() if header else ""
        body = line[header.end() :] if header else line
        for piece in body.split("。"):
            parts = _SPO_TAIL.split(piece, maxsplit=1)
            if len(parts) < 2:
                continue
            head = parts[0].replace("头实体为", "").strip()
            tail = parts[1].replace("尾实体为", "").strip()
            found.add((relation, head, tail))
    return found


_CDEE_FIELD = re.compile(rf"^({'|'.join(CDEE_FIELDS)})[：:](.*)$")


def parse_events(text: str) -> set[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """Events (主体词, 发生状态, 描述词 list, 解剖部位 list) from lines
    "主体词：…；发生状态：…；描述词：a，b；解剖部位：…". Lines with no field name are skipped."""
    found = set()
    for line in _lines(text):
        fields: dict[str, str] = {}
        for attr in re.split(r"[；;]", line):
            match = _CDEE_FIELD.match(attr.strip())
            if match:
                fields[match.group(1)] = match.group(2).strip()
        if not fields:
            continue
        found.add(
            (
                fields.get("主体词", ""),
                fields.get("发生状态", ""),
                tuple(_split_mentions(fields.get("描述词", ""))),
                tuple(_split_mentions(fields.get("解剖部位", ""))),
            )
        )
    return found


def parse_normalization(text: str, choices: Sequence[str] | None) -> set[tuple[str]]:
    """Standard terms from the answer's last line, split on "，" and kept only if they are among
    `choices` (a piece that is not a choice is tried again split on ",")."""
    lines = _lines(text)
    allowed = set(choices or ())
    found = set()
    for piece in _split_mentions(lines[-1]) if lines else []:
        candidates = [piece] if piece in allowed else [w.strip() for w in piece.split(",")]
        found.update((w,) for w in candidates if w in allowed)
    return found


def _is_header(line: str) -> bool:
    return line.endswith(("：", ":")) and any(m in line for m in _HEADER_MARKERS)


def parse_findings(
    text: str, choices: Sequence[str] | None, fallback: str = "不标注"
) -> set[tuple[str, str]]:
    """(finding, label) from lines "finding：label" (exactly one colon); a label not among
    `choices` becomes `fallback`. A lead-in line ("…如下：") is skipped."""
    allowed = set(choices or ())
    found = set()
    for i, line in enumerate(_lines(text)):
        if i == 0 and _is_header(line):
            continue
        parts = line.replace(":", "：").split("：")
        if len(parts) != 2:
            continue
        finding, label = parts[0].strip(), parts[1].strip()
        found.add((finding, label if label in allowed else fallback))
    return found


_MRG_LINE = re.compile(rf"^({'|'.join(MRG_SECTIONS)})[：:](.*)$")


def parse_report(text: str) -> dict[str, str]:
    """The sections of an IMCS-V2-MRG report ("主诉：…" lines); a repeated section keeps its last
    line."""
    sections = {}
    for line in _lines(text):
        match = _MRG_LINE.match(line)
        if match:
            sections[match.group(1)] = match.group(2).strip()
    return sections


_STS_SYNONYMS = {"相同": "是的", "不同": "不是"}
_EMPTY_LABEL = {
    "CHIP-CTC": "非上述类型",
    "IMCS-V2-DAC": "非上述类型",
    "KUAKE-QIC": "非上述类型",
    "CHIP-STS": "是的",
    "KUAKE-IR": "相关",
    "KUAKE-QQR": "完全一致",
    "KUAKE-QTR": "完全不匹配或者没有参考价值",
}


def parse_label(text: str, task: str, choices: Sequence[str] | None = None) -> str:
    """The stripped answer; an empty answer becomes the task's fallback label."""
    label = (text or "").strip()
    if task == "CHIP-STS":
        label = _STS_SYNONYMS.get(label, label)
    if not label:
        label = _EMPTY_LABEL.get(task) or (choices[0] if choices else "")
    return label


# --------------------------------------------------------------------------------------------
# Scorers per kind
# --------------------------------------------------------------------------------------------

_ROUGE_EMPTY = "无。"  # the official stand-in for an empty text


def _rouge(pred: str, gold: str) -> float:
    pred_tokens = zh_tokens(pred) or zh_tokens(_ROUGE_EMPTY)
    gold_tokens = zh_tokens(gold) or zh_tokens(_ROUGE_EMPTY)
    return rouge_l_f(pred_tokens, gold_tokens)


def _attr_fallback(task: str) -> str:
    return "无法根据上下文确定病人是否患有该症状" if task == "IMCS-V2-SR" else "不标注"


def _structure(kind: str, task: str, text: str, choices: Sequence[str] | None) -> Any:
    if kind == "entities":
        return parse_entities(text, choices)
    if kind == "triples":
        return parse_triples(text)
    if kind == "events":
        return parse_events(text)
    if kind == "normalization":
        return parse_normalization(text, choices)
    if kind == "findings":
        return parse_findings(text, choices, _attr_fallback(task))
    if kind in ("macro", "weighted"):
        return parse_label(text, task, choices)
    if kind == "sections":
        return parse_report(text)
    return (text or "").strip()


def _score_rows(kind: str, task: str, predictions: Sequence[str], golds: Sequence[Row]) -> float:
    def parse(text: str, row: Row) -> Any:
        return _structure(kind, task, text, row.get("answer_choices"))

    gold_s = [parse(row["target"], row) for row in golds]
    pred_s = [parse(text, row) for text, row in zip(predictions, golds, strict=True)]
    if kind in ("entities", "triples", "events", "normalization", "findings"):
        return micro_f1_sets(gold_s, pred_s)
    if kind == "macro":
        return macro_f1(gold_s, pred_s)
    if kind == "weighted":
        return weighted_f1(gold_s, pred_s)
    if kind == "sections":
        scores = []
        for gold, pred, row, text in zip(gold_s, pred_s, golds, predictions, strict=True):
            if not gold:  # no section in the gold report: score it as plain text
                scores.append(_rouge(text or "", row["target"]))
            scores.extend(_rouge(pred.get(name, ""), value) for name, value in gold.items())
        return sum(scores) / len(scores)
    scores = [_rouge(pred, gold) for pred, gold in zip(pred_s, gold_s, strict=True)]
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

PROMPTCBLUE_TASKS: dict[str, str] = {
    "CMeEE-V2": "entities",
    "IMCS-V2-NER": "entities",
    "CMeIE": "triples",
    "CMeIE-V2": "triples",
    "CHIP-CDEE": "events",
    "CHIP-CDN": "normalization",
    "CHIP-MDCFNPC": "findings",
    "IMCS-V2-SR": "findings",
    "CHIP-CTC": "macro",
    "IMCS-V2-DAC": "macro",
    "KUAKE-QIC": "macro",
    "CHIP-STS": "weighted",
    "KUAKE-IR": "weighted",
    "KUAKE-QQR": "weighted",
    "KUAKE-QTR": "weighted",
    "MedDG": "rouge",
    "IMCS-V2-MRG": "sections",
}
"""Task name -> scoring kind for the 16 PromptCBLUE tasks (CMeIE also under its V2 name)."""

TASK_TYPES: dict[str, str] = {
    "cls": "macro",
    "matching": "weighted",
    "ner": "entities",
    "spo_generation": "triples",
    "event_extraction": "events",
    "normalization": "normalization",
    "attr_cls": "findings",
    "report_generation": "rouge",
    "response_generation": "rouge",
}
"""task_type -> scoring kind, used for tasks that are not PromptCBLUE tasks."""

_METRIC_NAMES = {
    "entities": "micro-F1",
    "triples": "micro-F1",
    "events": "micro-F1",
    "normalization": "micro-F1",
    "findings": "micro-F1",
    "macro": "macro-F1",
    "weighted": "weighted-F1",
    "rouge": "Rouge-L",
    "sections": "Rouge-L (sections)",
}


def _kind(task: str, task_type: str | None) -> str:
    if task in PROMPTCBLUE_TASKS:
        return PROMPTCBLUE_TASKS[task]
    if task_type in TASK_TYPES:
        return TASK_TYPES[task_type]
    raise UnknownTaskError(
        f"Cannot score task {task!r}: it is not a PromptCBLUE task and its task_type "
        f"{task_type!r} is not one of {', '.join(TASK_TYPES)}."
    )


def metric_name(task: str, task_type: str | None = None) -> str:
    """The name of the metric `score_task` uses for this task, e.g. "macro-F1"."""
    return _METRIC_NAMES[_kind(task, task_type)]


def parse_answer(
    task: str, task_type: str | None, text: str, answer_choices: Sequence[str] | None = None
) -> Any:
    """The structure an answer text is scored on (a set of tuples, a label, a dict of report
    sections or the stripped text): for debugging and reports."""
    return _structure(_kind(task, task_type), task, text, answer_choices)


def score_task(task: str, task_type: str, predictions: list[str], golds: list[dict]) -> float:
    """Score one task's predictions (generated answer texts, `predictions[i]` for `golds[i]`)
    against its data rows (dicts with target, answer_choices). Returns a fraction in [0, 1].
    PromptCBLUE tasks are recognised by name, any other task by `task_type`."""
    kind = _kind(task, task_type)
    if len(predictions) != len(golds):
        raise ValueError(f"task {task!r}: {len(predictions)} predictions for {len(golds)} rows")
    if not golds:
        raise ValueError(f"task {task!r}: no rows to score")
    return _score_rows(kind, task, [p or "" for p in predictions], golds)


def score_predictions(golds: list[dict], predictions: list[str]) -> dict:
    """Score a mixed set of rows: group them by `task_dataset`, score each task, and average.
    Returns {"per_task": {task: score}, "overall": mean of the task scores,
    "num_rows": {task: rows}}; tasks appear in the order of their first row."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} rows")
    if not golds:
        raise ValueError("no rows to score")
    groups: dict[str, tuple[str, list[str], list[dict]]] = {}
    for row, prediction in zip(golds, predictions, strict=True):
        task = row["task_dataset"]
        _, preds, rows = groups.setdefault(task, (row.get("task_type"), [], []))
        preds.append(prediction)
        rows.append(row)
    per_task = {
        task: score_task(task, task_type, preds, rows)
        for task, (task_type, preds, rows) in groups.items()
    }
    return {
        "per_task": per_task,
        "overall": sum(per_task.values()) / len(per_task),
        "num_rows": {task: len(rows) for task, (_, _, rows) in groups.items()},
    }
