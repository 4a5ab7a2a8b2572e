"""Finished runs read back for comparison: their config (flattened) and scores."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moelora.errors import UserError

# Keys that differ between runs without making them different configurations.
NOT_CONFIGURATION = ("run_dir", "cache_dir", "trainer.seed", "trainer.resume")


@dataclass
class RunResult:
    """One finished training run: where it is, its flat config and its metrics.json."""

    path: Path
    config: dict[str, Any]  # "trainer.lr" -> 0.005
    metrics: dict

    @property
    def seed(self) -> int:
        return self.config.get("trainer.seed", 0)

    @property
    def scores(self) -> dict | None:
        """The trained model's scores ("after"), None when the run was not scored."""
        return self.metrics.get("after")

    @property
    def validation(self) -> dict | None:
        """The scores on the held-out training rows (data.validation), None without them."""
        return self.metrics.get("validation")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"trainer": {"lr": 1}} -> {"trainer.lr": 1}; lists stay values (as JSON text)."""
    if not isinstance(node, dict):
        return {prefix: json.dumps(node) if isinstance(node, list) else node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def find_runs(paths: list[Path]) -> list[RunResult]:
    """The finished runs under `paths` (each a run directory or a folder of them, such as a
    Hydra sweep folder), sorted by path; a run without metrics.json is skipped."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist; pass run directories or a sweep folder.")
        metrics = path.rglob("metrics.json")
        found += [m.parent for m in metrics if (m.parent / "config.yaml").exists()]
    if not found:
        raise UserError(
            f"no finished run (a folder with config.yaml and metrics.json) under "
            f"{', '.join(map(str, paths))}; pass run directories or a sweep folder."
        )
    return [read_run_result(p) for p in sorted(set(found))]


def read_run_result(path: Path) -> RunResult:
    config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
    metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    return RunResult(path, flatten(config), metrics)


def configuration_keys(runs: list[RunResult]) -> list[str]:
    """The config keys whose values differ between the runs (seed, paths and resume aside):
    with the method they name each configuration. A `method.*` key counts only when it differs
    between runs of the same method (each method's preset has its own sizes)."""

    def differs(key: str, group: list[RunResult]) -> bool:
        return len({json.dumps(r.config.get(key), default=str) for r in group}) > 1

    keys = sorted({k for run in runs for k in run.config} - set(NOT_CONFIGURATION))
    by_method: dict[str, list[RunResult]] = {}
    for run in runs:
        by_method.setdefault(str(run.config.get("method.name")), []).append(run)
    chosen = []
    for key in keys:
        if key == "method.name":
            continue
        if key.startswith("method."):
            if any(differs(key, group) for group in by_method.values()):
                chosen.append(key)
        elif differs(key, runs):
            chosen.append(key)
    return chosen


def configuration_label(run: RunResult, keys: list[str]) -> str:
    """`method=moelora trainer.lr=0.001`: the method, then the run's value of every key that
    tells configurations apart (keys the run's method does not have are left out)."""
    parts = [f"method={run.config.get('method.name')}"]
    parts += [f"{key}={run.config[key]}" for key in keys if run.config.get(key) is not None]
    return " ".join(parts)
