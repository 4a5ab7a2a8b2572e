"""The pictures: a sweep's bar chart, a run's training curves. Drawn with matplotlib's Agg
backend (files only, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from moelora.analysis.summary import Row


def plot_summary(rows: list[Row], tasks: list[str], path: Path) -> None:
    """Grouped bars: per task and overall, one bar per configuration, error bars = seed std."""
    groups = [*tasks, "overall"]
    width = 0.8 / len(rows)
    figure, axes = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(rows) / 3)), 4))
    for index, row in enumerate(rows):
        stats = [row.tasks.get(task) for task in tasks] + [row.overall]
        means = [s.mean if s else 0.0 for s in stats]
        stds = [s.std if s and s.n > 1 else 0.0 for s in stats]
        xs = [g + (index - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(xs, means, width, yerr=stds, capsize=2, label=f"{row.label} (n={row.overall.n})")
    axes.set_xticks(range(len(groups)), groups, rotation=20, ha="right")
    axes.set_ylabel("score (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


NOT_LOSSES = {"step", "train/lr", "train/skipped_steps"}


def curve_series(history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Each logged loss (train, eval, aux) as (steps, values), from history.jsonl's rows."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in history:
        for key, value in row.items():
            if key not in NOT_LOSSES:
                steps, values = series.setdefault(key, ([], []))
                steps.append(row["step"])
                values.append(value)
    return series


def plot_curves(history: list[dict], path: Path, title: str) -> bool:
    """Training loss, eval loss and each aux loss against the step, one panel per kind;
    False (nothing drawn) when nothing was logged."""
    series = curve_series(history)
    if not series:
        return False
    losses = [k for k in ("train/loss", "eval/loss") if k in series]
    aux = [k for k in series if k not in losses]
    panels = [losses] + ([aux] if aux else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False)
    for panel, keys in zip(axes[0], panels, strict=True):
        for key in keys:
            panel.plot(*series[key], label=key, marker="." if key == "eval/loss" else None)
        panel.set_xlabel("step")
        panel.legend(fontsize="small")
    axes[0][0].set_title(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
