"""PromptCBLUE scoring: parse each answer text back into a structure, then score it per task.

Two readings of an answer exist (`eval.scorer`): `official` reproduces the official PromptCBLUE
scorer exactly (`moelora.evaluate.official`: the numbers of the leaderboard and the papers);
`lenient` reads messy output more kindly (`moelora.evaluate.lenient`). Both use the same metric
per task, `docs/scoring.md` has the details:

- strict micro-F1 over tuples:
  CMeEE-V2, IMCS-V2-NER: (type, mention) from lines "{type}实体：a，b";
  CMeIE (also named CMeIE-V2): (relation, head, tail);
  CHIP-CDEE: (主体词, 发生状态, 描述词 list, 解剖部位 list);
  CHIP-CDN: the chosen standard terms (only those in answer_choices);
  CHIP-MDCFNPC, IMCS-V2-SR: (finding, label).
- macro-F1 over labels: CHIP-CTC, IMCS-V2-DAC, KUAKE-QIC.
- support-weighted F1 over labels (the official scorer's "Micro-F1" of these tasks): CHIP-STS,
  KUAKE-IR, KUAKE-QQR, KUAKE-QTR.
- Rouge-L on characters: MedDG (the reply); IMCS-V2-MRG (each section 主诉, 现病史, 辅助检查,
  既往史, 诊断, 建议 of each gold report, averaged over all of them).

Any other task is scored by its `task_type` with the same parser as the PromptCBLUE task of that
type: cls -> macro-F1 (CHIP-CTC), matching -> weighted F1 (CHIP-STS), ner -> CMeEE-V2,
spo_generation -> CMeIE, event_extraction -> CHIP-CDEE, normalization -> CHIP-CDN,
attr_cls -> CHIP-MDCFNPC, report_generation and response_generation -> plain Rouge-L (the six
sections are used only for IMCS-V2-MRG). The overall score is the mean of the per-task scores.

Rows whose gold target is empty are scored as the official scorer scores them (no gold tuple, or
"无。" for a text) except in label tasks, whose official code stops on an empty gold label: there
they are left out. `empty_targets` counts them, and `empty_target_note` says so in one line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

from moelora.config.groups import SCORER_CHOICES
from moelora.errors import UserError
from moelora.evaluate import lenient, official
from moelora.evaluate.metrics import macro_f1, weighted_f1
from moelora.evaluate.official import finding_fallback

__all__ = [
    "PROMPTCBLUE_TASKS",
    "SCORERS",
    "TASK_TYPES",
    "UnknownTaskError",
    "empty_target_note",
    "metric_name",
    "parse_answer",
    "score_predictions",
    "score_task",
    "scorers_of",
]

Row = Mapping[str, Any]

SCORERS: dict[str, ModuleType] = {"official": official, "lenient": lenient}
"""Each reading is a module with the parsers parse_entities, parse_triples, parse_events,
parse_normalization, parse_findings, parse_label and parse_report, and tuple_f1, rouge_l and
section_pairs."""


def scorers_of(setting: str) -> list[str]:
    """The readings `eval.scorer` asks for, the headline one first."""
    if setting not in SCORER_CHOICES:
        raise UserError(
            f"eval.scorer='{setting}' is unknown; use official (the PromptCBLUE scorer), "
            f"lenient, or both."
        )
    return ["official", "lenient"] if setting == "both" else [setting]


class UnknownTaskError(UserError, ValueError):
    """A task that is neither a PromptCBLUE task nor of a known `task_type`."""


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


_TUPLE_KINDS = ("entities", "triples", "events", "normalization", "findings")
_LABEL_KINDS = ("macro", "weighted")


def _kind(task: str, task_type: str | None) -> str:
    if task in PROMPTCBLUE_TASKS:
        return PROMPTCBLUE_TASKS[task]
    if task_type in TASK_TYPES:
        return TASK_TYPES[task_type]
    raise UnknownTaskError(
        f"Cannot score task {task!r}: it is not a PromptCBLUE task and its task_type "
        f"{task_type!r} is not one of {', '.join(TASK_TYPES)}."
    )


def _reading(scorer: str) -> ModuleType:
    scorers_of(scorer)
    if scorer not in SCORERS:
        raise ValueError(f"score one reading at a time ({', '.join(SCORERS)}), not {scorer!r}")
    return SCORERS[scorer]


def metric_name(task: str, task_type: str | None = None) -> str:
    """The name of the metric `score_task` uses for this task, e.g. "macro-F1"."""
    return _METRIC_NAMES[_kind(task, task_type)]


def parse_answer(
    task: str,
    task_type: str | None,
    text: str,
    answer_choices: Sequence[str] | None = None,
    scorer: str = "official",
) -> Any:
    """The structure an answer text is scored on (a set of tuples, a label, a dict of report
    sections or the stripped text): for debugging and reports."""
    return _parse(_reading(scorer), _kind(task, task_type), task, text or "", answer_choices)


def _parse(
    reading: ModuleType, kind: str, task: str, text: str, choices: Sequence[str] | None
) -> Any:
    """The structure `reading` scores an answer on, for one scoring kind."""
    if kind == "entities":
        return reading.parse_entities(text, choices)
    if kind == "triples":
        return reading.parse_triples(text)
    if kind == "events":
        return reading.parse_events(text)
    if kind == "normalization":
        return reading.parse_normalization(text, choices)
    if kind == "findings":
        return reading.parse_findings(text, choices, finding_fallback(task))
    if kind in _LABEL_KINDS:
        return reading.parse_label(text, task, choices)
    if kind == "sections":
        return reading.parse_report(text)
    return text.strip()


def _is_empty(row: Row) -> bool:
    return not (row["target"] or "").strip()


def score_task(
    task: str,
    task_type: str | None,
    predictions: Sequence[str],
    golds: Sequence[Row],
    scorer: str = "official",
) -> float:
    """Score one task's predictions (generated answer texts, `predictions[i]` for `golds[i]`)
    against its data rows (dicts with target, answer_choices). Returns a fraction in [0, 1].
    PromptCBLUE tasks are recognised by name, any other task by `task_type`."""
    kind, reading = _kind(task, task_type), _reading(scorer)
    if len(predictions) != len(golds):
        raise ValueError(f"task {task!r}: {len(predictions)} predictions for {len(golds)} rows")
    if not golds:
        raise ValueError(f"task {task!r}: no rows to score")
    pairs = [(p or "", row) for p, row in zip(predictions, golds, strict=True)]
    if kind in _LABEL_KINDS:
        pairs = [(p, row) for p, row in pairs if not _is_empty(row)]
        if not pairs:
            raise UserError(
                f"every row of task {task} has an empty target, and a label task needs gold "
                f"labels to score; fill the targets or leave {task} out with data.eval_tasks."
            )

    def parse(text: str, row: Row) -> Any:
        return _parse(reading, kind, task, text, row.get("answer_choices"))

    if kind in _TUPLE_KINDS or kind in _LABEL_KINDS:
        gold_s = [parse(row["target"] or "", row) for _, row in pairs]
        pred_s = [parse(text, row) for text, row in pairs]
        if kind in _TUPLE_KINDS:
            return reading.tuple_f1(gold_s, pred_s)
        return (macro_f1 if kind == "macro" else weighted_f1)(gold_s, pred_s)
    if kind == "sections":
        texts = [pair for p, row in pairs for pair in reading.section_pairs(p, row["target"] or "")]
    else:
        texts = [(p.strip(), (row["target"] or "").strip()) for p, row in pairs]
    return sum(reading.rouge_l(p, g) for p, g in texts) / len(texts) if texts else 0.0


def score_predictions(
    golds: Sequence[Row], predictions: Sequence[str], scorer: str = "official"
) -> dict:
    """Score a mixed set of rows: group them by `task_dataset`, score each task, and average.
    Returns {"scorer", "per_task": {task: score}, "overall": mean of the task scores,
    "num_rows": {task: rows}, "empty_targets": {task: rows with an empty target}}; tasks appear
    in the order of their first row."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} rows")
    if not golds:
        raise ValueError("no rows to score")
    groups: dict[str, tuple[str, list[str], list[Row]]] = {}
    for row, prediction in zip(golds, predictions, strict=True):
        task = row["task_dataset"]
        _, preds, rows = groups.setdefault(task, (row.get("task_type"), [], []))
        preds.append(prediction)
        rows.append(row)
    per_task = {
        task: score_task(task, task_type, preds, rows, scorer)
        for task, (task_type, preds, rows) in groups.items()
    }
    return {
        "scorer": scorer,
        "per_task": per_task,
        "overall": sum(per_task.values()) / len(per_task),
        "num_rows": {task: len(rows) for task, (_, _, rows) in groups.items()},
        "empty_targets": dict(Counter(r["task_dataset"] for r in _empty_rows(golds))),
    }


def _empty_rows(golds: Iterable[Row]) -> list[Row]:
    return [row for row in golds if _is_empty(row)]


def empty_target_note(golds: Iterable[Row]) -> str | None:
    """One line on the rows with an empty gold target, or None when there are none."""
    rows = _empty_rows(golds)
    if not rows:
        return None
    empty = Counter(r["task_dataset"] for r in rows)
    types = {r["task_dataset"]: r.get("task_type") for r in rows}
    where = ", ".join(f"{task}: {n}" for task, n in sorted(empty.items()))
    labels = sorted(t for t in empty if _kind(t, types[t]) in _LABEL_KINDS)
    left_out = (
        f"; left out of {', '.join(labels)} (label tasks cannot score them)" if labels else ""
    )
    return (
        f"note: {sum(empty.values())} eval rows have an empty target ({where}); they are scored "
        f"as the official scorer scores them: no gold tuple, or '无。' for a text{left_out}."
    )
