"""The search section of a sweep's summary.md: which trial an Optuna search
(`hydra/sweeper=optuna`) chose, by which score, and every trial's settings, score and folder,
read from the `optimization_results.yaml` the sweeper leaves in the sweep folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from moelora.analysis.runs import RunResult

RESULTS_FILE = "optimization_results.yaml"  # the plugin's name; its sweeper writes it there


def search_lines(paths: list[Path], runs: list[RunResult]) -> list[str]:
    """The markdown of every search folder among `paths` (none: no lines)."""
    lines: list[str] = []
    for path in paths:
        if (path / RESULTS_FILE).is_file():
            results = OmegaConf.to_container(OmegaConf.load(path / RESULTS_FILE))
            lines += _section(path, results, _by_trial(path, runs))
    return lines


def _by_trial(sweep: Path, runs: list[RunResult]) -> dict[int, RunResult]:
    """The sweep's runs by job number, which the sweeper makes the trial's number."""
    found = {}
    for run in runs:
        hydra_file = run.path / ".hydra" / "hydra.yaml"
        if run.path.is_relative_to(sweep) and hydra_file.is_file():
            found[int(OmegaConf.load(hydra_file).hydra.job.num)] = run
    return found


def _section(sweep: Path, results: dict, runs: dict[int, RunResult]) -> list[str]:
    trials = results.get("trials", [])
    done = [t for t in trials if t["state"] == "COMPLETE"]
    lines = [
        "",
        f"## Optuna search in `{sweep}`",
        "",
        "The search chose by the validation overall (training rows held out of training, "
        "data.validation), maximized; the dev scores above chose nothing."
        + (f" {len(done)} trials complete." if trials else ""),
        "",
    ]
    best = results.get("best_trial")
    where = f" (`{runs[best].path}`)" if best in runs else ""
    dev = f", dev {100 * runs[best].scores['overall']:.1f}" if best in runs else ""
    name = f"trial {best}" if best is not None else "settings"
    lines.append(
        f"**Best: {name}**{where}: validation {100 * results['best_value']:.1f}{dev}; "
        f"{_settings(results['best_params'])}"
    )
    if trials:
        lines += ["", "| trial | validation | settings | run |", "|---|---|---|---|"]
        for trial in trials:
            value = trial["value"]
            score = f"{100 * value:.1f}" if value is not None else trial["state"].lower()
            run = f"`{runs[trial['number']].path}`" if trial["number"] in runs else "–"
            lines.append(f"| {trial['number']} | {score} | {_settings(trial['params'])} | {run} |")
    return lines


def _settings(params: dict) -> str:
    return ", ".join(
        f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in params.items()
    )
