"""The pictures: a sweep's bar chart, a run's training curves. Drawn with matplotlib's Agg
backend (files only, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moelora import atomic  # noqa: E402
from moelora.analysis.summary import Row  # noqa: E402


def save_figure(figure: plt.Figure, path: Path, **options: object) -> None:
    """Write the figure as a PNG through the run's atomic write path, then free it."""
    try:
        with atomic.atomic(path) as tmp:
            figure.savefig(tmp, format="png", **options)
    finally:
        plt.close(figure)


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
    # the saved image grows to hold the legend, whose labels (a search's settings) run long
    save_figure(figure, path, dpi=120, bbox_inches="tight")
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
    save_figure(figure, path, dpi=110)
    return True


def plot_routing(report: dict, path: Path, title: str) -> None:
    """Task x expert heatmaps of the mean gate weight (all layers, then each depth third) and
    each expert's share of the selections."""
    groups = report["groups"]
    names = list(groups)
    figure, axes = plt.subplots(
        1,
        len(names) + 1,
        figsize=(3.2 * (len(names) + 1) + 1, 0.45 * len(groups["all"]["mean_weight"]) + 2.2),
        squeeze=False,
    )
    for panel, name in zip(axes[0], names, strict=False):
        weights = groups[name]["mean_weight"]
        tasks = list(weights)
        image = panel.imshow([weights[t] for t in tasks], vmin=0, vmax=1, cmap="viridis")
        panel.set_yticks(range(len(tasks)), tasks if panel is axes[0][0] else [""] * len(tasks))
        panel.set_xticks(range(report["experts"]))
        panel.set_xlabel("expert")
        panel.set_title(f"{name} layers", fontsize="medium")
        for row, task in enumerate(tasks):
            for expert, value in enumerate(weights[task]):
                colour = "white" if value < 0.5 else "black"
                panel.text(
                    expert, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color=colour
                )
    shares = groups["all"]["selection_share"]
    axes[0][-1].bar(range(len(shares)), shares)
    axes[0][-1].set_xticks(range(len(shares)))  # whole experts, also for two
    axes[0][-1].set_xlabel("expert")
    axes[0][-1].set_title("share of selections", fontsize="medium")
    figure.colorbar(image, ax=axes[0][: len(names)].tolist(), shrink=0.8, label="mean gate weight")
    figure.suptitle(title, fontsize="medium")
    save_figure(figure, path, dpi=110, bbox_inches="tight")
