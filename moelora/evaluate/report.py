"""Write a run's scores: `metrics.json` for machines and `report.md` (per-task table, before and
after training, overall) for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moelora import atomic
from moelora.log import get_logger
from moelora.resume import FINISHED_FILE

log = get_logger(__name__)


def _cell(scores: dict | None, task: str | None) -> str:
    if scores is None:
        return "–"
    value = scores["overall"] if task is None else scores["per_task"].get(task)
    return "–" if value is None else f"{100 * value:.1f}"


SCORER_NOTES = {
    "official": "official = the PromptCBLUE scorer's reading of the answers, as on the leaderboard",
    "lenient": "lenient = a kinder reading of messy answers (stripped spaces, half-width "
    "punctuation, optional lead-in lines), for development only",
}


def _header(name: str, scores: dict | None) -> str:
    """`after_lenient` -> "after (lenient)"; a column without scores keeps its name."""
    if not scores or "scorer" not in scores:
        return name
    return f"{name.removesuffix('_' + scores['scorer'])} ({scores['scorer']})"


def render_report(
    title: str,
    columns: dict[str, dict | None],
    info: dict[str, Any],
    figures: dict[str, str] | None = None,
) -> str:
    """A markdown report: one row per task, one column per scored model (e.g. before/after) and
    reading (official, lenient), then links to the run's figures (caption -> file name)."""
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", *_notes(columns), ""]
    lines += _table(columns)
    for caption, name in (figures or {}).items():
        lines += ["", f"![{caption}]({name})"]
    return "\n".join(lines) + "\n"


def _notes(columns: dict[str, dict | None]) -> list[str]:
    """What the numbers are: the scorers' readings, the validation rows, empty gold targets."""
    scorers = dict.fromkeys(s["scorer"] for s in columns.values() if s and "scorer" in s)
    notes = "; ".join(SCORER_NOTES[s] for s in scorers)
    lines = [f"Scores are percentages (PromptCBLUE metrics, greedy decoding); {notes}."]
    held = next((s["num_rows"] for n, s in columns.items() if n.startswith("validation") and s), {})
    if held:
        lines += [
            f"validation = {sum(held.values())} training rows held out of training (data."
            f"validation), to choose settings by; the other columns and `rows` are the dev set."
        ]
    empty = next((s.get("empty_targets") for s in columns.values() if s), None)
    if empty:
        where = ", ".join(f"{task} {n}" for task, n in empty.items())
        lines += [f"Rows with an empty target, scored as the official scorer does: {where}."]
    return lines


def _table(columns: dict[str, dict | None]) -> list[str]:
    """The per-task table, the overall row and, with eval.summary_tasks, their mean's row."""
    tasks = sorted({t for s in columns.values() if s for t in s["per_task"]})
    counts = next(s["num_rows"] for s in columns.values() if s)
    head = "| task | rows | " + " | ".join(_header(n, s) for n, s in columns.items()) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for task in tasks:
        cells = " | ".join(_cell(s, task) for s in columns.values())
        lines.append(f"| {task} | {counts.get(task, 0)} | {cells} |")
    overall = " | ".join(f"**{_cell(s, None)}**" for s in columns.values())
    lines.append(f"| **overall** | {sum(counts.values())} | {overall} |")
    summarised = next((s["summary"]["tasks"] for s in columns.values() if s and "summary" in s), [])
    if summarised:
        cells = " | ".join(
            f"**{100 * s['summary']['overall']:.1f}**" if s and "summary" in s else "–"
            for s in columns.values()
        )
        rows = sum(counts.get(t, 0) for t in summarised)
        lines.append(
            f"| **overall of {len(summarised)}: {', '.join(summarised)}** | {rows} | {cells} |"
        )
    return lines


def write_report(
    directory: Path,
    title: str,
    columns: dict[str, dict | None],
    info: dict[str, Any],
    figures: dict[str, str] | None = None,
) -> None:
    """report.md, shown on the console, then metrics.json."""
    report = render_report(title, columns, info, figures)
    atomic.write_text(directory / "report.md", report)
    log.info(report)
    write_metrics(directory, info, columns)


def write_metrics(directory: Path, info: dict[str, Any], columns: dict[str, dict | None]) -> None:
    """metrics.json: what a run or scoring measured, for machines; written last, its presence
    says a run has finished (`moelora.resume`)."""
    atomic.write_json(directory / FINISHED_FILE, {"info": info, **columns})


def write_predictions(path: Path, rows, predictions: list[str]) -> None:
    with atomic.atomic(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row, prediction in zip(rows, predictions, strict=True):
            record = {
                "sample_id": row["sample_id"],
                "task_dataset": row["task_dataset"],
                "prediction": prediction,
                "target": row["target"],
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
