"""A comparison of finished runs: one row per configuration, mean ± std over its seeds.

Scores are percentages of the headline reading of the dev set (metrics.json's "after"), and of
the validation rows where the runs held some out ("validation"). The std is the sample
standard deviation (n - 1) over seeds; with one seed it is unknown and no difference is called.
A configuration's overall score differs from the baseline's beyond the seed-to-seed spread when
|mean - baseline mean| > std + baseline std. The baseline is the configuration given by label,
else the one with the fewest trainable parameters (the cheapest: does a costlier method beat it?).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from moelora import atomic
from moelora.analysis.runs import RunResult, configuration_keys, configuration_label
from moelora.errors import UserError

SUMMARY_FILES = ("summary.md", "summary.csv", "summary.png")


@dataclass
class Stat:
    """Mean and sample std of one quantity over a configuration's seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    def text(self, digits: int = 1) -> str:
        if self.n > 1:
            return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}"


@dataclass
class Row:
    """One configuration: its runs (one per seed) and their statistics."""

    label: str
    method: str
    runs: list[RunResult]
    tasks: dict[str, Stat] = field(default_factory=dict)
    overall: Stat = field(default_factory=lambda: Stat([]))
    validation: Stat | None = None  # overall on the held-out training rows, when every run has it
    info: dict[str, Stat] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return sorted(run.seed for run in self.runs)


INFO_KEYS = {
    "trainable_parameters": "params",
    "train_tokens_per_second": "tokens/s",
    "train_seconds": "train s",
}


def summarize(runs: list[RunResult]) -> list[Row]:
    """Group the scored runs into configurations (see `configuration_keys`)."""
    scored = [run for run in runs if run.scores]
    if not scored:
        raise UserError("none of the runs was scored (eval.enabled=false); nothing to compare.")
    keys = configuration_keys(scored)
    rows: dict[str, Row] = {}
    for run in scored:
        label = configuration_label(run, keys)
        row = rows.setdefault(label, Row(label, str(run.config.get("method.name")), []))
        row.runs.append(run)
    for row in rows.values():
        tasks = sorted({t for run in row.runs for t in run.scores["per_task"]})
        row.tasks = {
            t: Stat(
                [100 * run.scores["per_task"][t] for run in row.runs if t in run.scores["per_task"]]
            )
            for t in tasks
        }
        row.overall = Stat([100 * run.scores["overall"] for run in row.runs])
        if all(run.validation for run in row.runs):
            row.validation = Stat([100 * run.validation["overall"] for run in row.runs])
        row.info = {
            key: Stat([float(run.metrics["info"][key]) for run in row.runs])
            for key in INFO_KEYS
            if all(key in run.metrics.get("info", {}) for run in row.runs)
        }
    return list(rows.values())


def baseline(rows: list[Row], label: str | None = None) -> Row:
    if label is not None:
        found = [row for row in rows if row.label == label]
        if not found:
            labels = ", ".join(row.label for row in rows)
            raise UserError(
                f"--baseline '{label}' is not a configuration here; use one of {labels}."
            )
        return found[0]
    params = [
        row.info["trainable_parameters"].mean if "trainable_parameters" in row.info else math.inf
        for row in rows
    ]
    return rows[params.index(min(params))]


def beyond_spread(row: Row, base: Row) -> bool | None:
    """Whether `row`'s overall differs from `base`'s by more than their seed stds together;
    None when either has a single seed."""
    if row is base or row.overall.n < 2 or base.overall.n < 2:
        return None
    gap = abs(row.overall.mean - base.overall.mean)
    return gap > row.overall.std + base.overall.std


def task_names(rows: list[Row]) -> list[str]:
    return sorted({task for row in rows for task in row.tasks})


def write_markdown(rows: list[Row], path: Path, base: Row, extra: list[str]) -> None:
    tasks = task_names(rows)
    info = [key for key in INFO_KEYS if all(key in row.info for row in rows)]
    validated = any(row.validation is not None for row in rows)
    header = ["configuration", "n", *tasks, "overall", f"vs {base.label}"]
    header += ["validation"] if validated else []
    header += [INFO_KEYS[key] for key in info]
    lines = [
        f"# Comparison of {sum(len(r.runs) for r in rows)} runs",
        "",
        "Scores in % (mean ± sample std over seeds). The column after overall says whether the "
        "overall score differs from the baseline's by more than the two seed stds together "
        "(n/a with one seed).",
    ]
    if validated:
        lines += [
            "The task columns, overall and its comparison score the dev set (the numbers to "
            "report); validation scores the training rows each run held out (data.validation), "
            "the number settings were chosen by."
        ]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.label, str(row.overall.n)]
        cells += [row.tasks[t].text() if t in row.tasks else "–" for t in tasks]
        cells += [f"**{row.overall.text()}**", _compared(row, base)]
        if validated:
            cells.append(row.validation.text() if row.validation else "–")
        cells += [_info_text(key, row.info[key]) for key in info]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Runs (seed: directory):", ""]
    for row in rows:
        for run in sorted(row.runs, key=lambda r: r.seed):
            lines.append(f"- {row.label}, seed {run.seed}: `{run.path}`")
    atomic.write_text(path, "\n".join([*lines, *extra]) + "\n")


def _compared(row: Row, base: Row) -> str:
    """`+1.2 beyond spread`, `-0.3 within spread`, `+0.5 n/a` (one seed) or `baseline`."""
    if row is base:
        return "baseline"
    verdict = beyond_spread(row, base)
    words = "n/a" if verdict is None else ("beyond spread" if verdict else "within spread")
    return f"{row.overall.mean - base.overall.mean:+.1f} {words}"


def _info_text(key: str, stat: Stat) -> str:
    if key == "trainable_parameters":
        return f"{stat.mean:,.0f}"
    return stat.text(1 if key == "train_seconds" else 0)


def write_csv(rows: list[Row], path: Path) -> None:
    tasks = task_names(rows)
    columns = ["configuration", "method", "n", "seeds", "overall_mean", "overall_std"]
    columns += ["validation_mean", "validation_std"]
    columns += [f"{t}_{s}" for t in tasks for s in ("mean", "std")]
    columns += [f"{key}_mean" for key in INFO_KEYS]
    with atomic.atomic(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            values = [row.label, row.method, row.overall.n, " ".join(map(str, row.seeds))]
            values += [row.overall.mean, row.overall.std]
            validation = row.validation
            values += [validation.mean, validation.std] if validation else ["", ""]
            for task in tasks:
                stat = row.tasks.get(task)
                values += [stat.mean, stat.std] if stat else ["", ""]
            values += [row.info[k].mean if k in row.info else "" for k in INFO_KEYS]
            writer.writerow(values)
