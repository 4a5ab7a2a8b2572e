"""`moelora compare <sweep folder | run folders...>`: the summary of finished runs, and the
Hydra callback that writes it into a sweep's folder when a multirun ends."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from moelora.analysis.plots import plot_summary
from moelora.analysis.runs import RunResult, find_runs
from moelora.analysis.search import search_lines
from moelora.analysis.summary import (
    Row,
    baseline,
    summarize,
    task_names,
    write_csv,
    write_markdown,
)
from moelora.errors import UserError
from moelora.log import get_logger

log = get_logger(__name__)


def write_summary(
    runs: list[RunResult],
    out_dir: Path,
    baseline_label: str | None = None,
    extra: list[str] | None = None,
) -> list[Row]:
    """summary.md (with the `extra` markdown lines at its end), summary.csv and summary.png in
    `out_dir`."""
    rows = summarize(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, out_dir / "summary.md", baseline(rows, baseline_label), extra or [])
    write_csv(rows, out_dir / "summary.csv")
    plot_summary(rows, task_names(rows), out_dir / "summary.png")
    return rows


def compare(paths: list[Path], out_dir: Path, baseline: str | None = None) -> Path:
    """Write summary.md/.csv/.png for the finished runs under `paths` into `out_dir`; an Optuna
    search's folder adds its best trial and every trial to summary.md."""
    runs = find_runs(paths)
    rows = write_summary(runs, out_dir, baseline, search_lines(paths, runs))
    runs = sum(len(row.runs) for row in rows)
    log.info(f"{runs} runs in {len(rows)} configurations: {out_dir / 'summary.md'}")
    return out_dir / "summary.md"


def compare_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="moelora compare",
        description="Compare finished runs: one row per configuration, mean ± std over seeds.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="a sweep folder or run folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the one folder given)"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="the configuration others are compared with, by its label (default: the one with "
        "the fewest trainable parameters)",
    )
    args = parser.parse_args(argv)
    out = args.out
    if out is None:
        if len(args.paths) > 1:
            raise UserError("several folders are compared; say where to write with --out <dir>.")
        out = args.paths[0]
    summary = compare(args.paths, out, args.baseline)
    print(summary.read_text(encoding="utf-8"))


class SweepReport(Callback):
    """Writes the comparison into the sweep folder when `moelora train -m ...` ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            compare([sweep], sweep)
        except UserError as err:  # e.g. a sweep of unscored runs: say so, do not fail the sweep
            log.warning(f"no sweep summary: {err}")
