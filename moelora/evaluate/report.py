"""Write a run's scores: `metrics.json` for machines and `report.md` (per-task table, before and
after training, overall) for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _cell(scores: dict | None, task: str | None) -> str:
    if scores is None:
        return "–"
    value = scores["overall"] if task is None else scores["per_task"].get(task)
    return "–" if value is None else f"{100 * value:.1f}"


def render_report(title: str, columns: dict[str, dict | None], info: dict[str, Any]) -> str:
    """A markdown report: one row per task, one column per scored model (e.g. before/after)."""
    tasks = sorted({t for s in columns.values() if s for t in s["per_task"]})
    counts = next(s["num_rows"] for s in columns.values() if s)
    head = "| task | rows | " + " | ".join(columns) + " |"
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "Scores are percentages (PromptCBLUE metrics, greedy decoding).", ""]
    lines += [head, "|" + "---|" * (len(columns) + 2)]
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
    return "\n".join(lines) + "\n"


def write_report(
    directory: Path, title: str, columns: dict[str, dict | None], info: dict[str, Any]
) -> None:
    metrics = {"info": info, **{name: scores for name, scores in columns.items()}}
    (directory / "metrics.json").write_text(
        json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    (directory / "report.md").write_text(render_report(title, columns, info), encoding="utf-8")


def write_predictions(path: Path, rows, predictions: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row, prediction in zip(rows, predictions, strict=True):
            record = {
                "sample_id": row["sample_id"],
                "task_dataset": row["task_dataset"],
                "prediction": prediction,
                "target": row["target"],
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
