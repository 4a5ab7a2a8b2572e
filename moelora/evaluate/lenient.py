"""Today's lenient reading of PromptCBLUE answers (`eval.scorer=lenient`): the official parsing
(`moelora.evaluate.official`) made robust to messy output, identically for gold and prediction.

Where it differs from the official reading (each choice deliberate):

1. Tuple F1 is 1.0 when a task has nothing to find and nothing found (TP = FP = FN = 0);
   officially it is 0 whenever TP = 0.
2. Rouge-L F is the exact 2PR / (P + R); rouge_chinese adds 1e-8 to the denominator.
3. Messy output is read more leniently:
   - surrounding whitespace of lines, names and values is stripped;
   - half-width ":" is accepted after an entity type ("症状实体:"), a CDEE field name, a
     finding, an MRG section name and the CMeIE line header; half-width ";" between CDEE fields;
     half-width "," before "尾实体为" (CMeIE) and, in CHIP-CDN, inside an answer piece that is
     not itself a choice. Half-width "," does NOT separate entity mentions or CDEE values,
     because real names contain it ("1,25-二羟维生素D3");
   - header lines are recognised by content instead of always dropping the first line
     (CDEE, MDCFNPC, SR, MRG), so an answer without the lead-in line keeps its first item;
   - CHIP-CDEE lines with none of the four field names are skipped (officially each is an
     empty event, an extra false positive), and an entity line cut off before its colon
     ("医疗程序实体") yields no mention (officially the line itself becomes one);
   - an MRG section value is the text after the line's section name, and a gold report with no
     section at all is scored as plain text (officially it adds nothing).

Everything else is the official reading: label fallbacks and averages, CDEE lists compared in
order, types, terms and finding labels checked against `answer_choices`, the tokens and the
"无。" stand-in of Rouge-L, and MRG's mean over (row, gold section) pairs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from moelora.evaluate.metrics import micro_f1_sets, rouge_l_f, zh_tokens
from moelora.evaluate.official import (
    CDEE_FIELDS,
    EMPTY_LABEL,
    MRG_SECTIONS,
    STS_SYNONYMS,
)

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


def parse_label(text: str, task: str, choices: Sequence[str] | None = None) -> str:
    """The stripped answer; an empty answer becomes the task's fallback label."""
    label = (text or "").strip()
    if task == "CHIP-STS":
        label = STS_SYNONYMS.get(label, label)
    if not label:
        label = EMPTY_LABEL.get(task) or (choices[0] if choices else "")
    return label


tuple_f1 = micro_f1_sets


def rouge_l(pred: str, gold: str) -> float:
    """Rouge-L F = 2PR / (P + R) on BasicTokenizer tokens, an empty text read as "无。"."""
    return rouge_l_f(zh_tokens(pred) or ["无", "。"], zh_tokens(gold) or ["无", "。"])


def section_pairs(pred: str, gold: str) -> list[tuple[str, str]]:
    """(predicted, gold) text of each gold section; a gold report with no section at all is
    compared as plain text."""
    gold_sections = parse_report(gold)
    if not gold_sections:
        return [(pred, gold)]
    pred_sections = parse_report(pred)
    return [(pred_sections.get(name, ""), value) for name, value in gold_sections.items()]
