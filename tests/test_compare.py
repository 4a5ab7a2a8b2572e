"""`moelora compare` and the sweep report: the numbers in summary.md/.csv against hand
computation on made-up run folders, configurations told apart by what differs, and a real
2-method x 2-seed multirun that ends with the summary in its sweep folder."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from moelora.analysis.compare import write_summary
from moelora.analysis.plots import curve_series
from moelora.analysis.runs import find_runs
from moelora.analysis.summary import beyond_spread, summarize
from moelora.errors import UserError
from tests.test_config import in_process
from tests.test_train import SMALL


def made_up_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    scores: dict[str, float],
    lr: float = 0.005,
    fields: dict | None = None,
    params: int = 1000,
) -> Path:
    """A finished run folder: config.yaml and metrics.json as `moelora train` writes them."""
    run = root / name
    run.mkdir(parents=True)
    settings = {
        "method": {"name": method, "alpha": 16, **(fields or {})},
        "trainer": {"seed": seed, "lr": lr},
        "run_dir": str(run),
        "cache_dir": "/cache",
    }
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    overall = sum(scores.values()) / len(scores)
    metrics = {
        "info": {
            "trainable_parameters": params,
            "train_tokens_per_second": 100 + seed,
            "train_seconds": 2.0,
        },
        "after": {"scorer": "official", "per_task": scores, "overall": overall},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


LORA = [{"A": 0.50, "B": 0.30}, {"A": 0.60, "B": 0.20}, {"A": 0.55, "B": 0.40}]
MOELORA = [{"A": 0.90, "B": 0.70}, {"A": 0.92, "B": 0.72}, {"A": 0.88, "B": 0.74}]


@pytest.fixture
def sweep(tmp_path) -> Path:
    for seed, scores in enumerate(LORA):
        made_up_run(tmp_path, f"lora{seed}", "lora", seed, scores)
    for seed, scores in enumerate(MOELORA):
        made_up_run(tmp_path, f"moe{seed}", "moelora", seed, scores, params=2000)
    (tmp_path / "unfinished").mkdir()  # no metrics.json: not a run to compare
    return tmp_path


def test_the_summary_holds_the_mean_and_std_over_seeds(sweep) -> None:
    rows = write_summary(find_runs([sweep]), sweep)
    assert [row.label for row in rows] == ["method=lora", "method=moelora"]
    lora, moe = rows
    for row, runs in ((lora, LORA), (moe, MOELORA)):
        for task in ("A", "B"):
            values = [100 * r[task] for r in runs]
            assert row.tasks[task].mean == pytest.approx(statistics.mean(values))
            assert row.tasks[task].std == pytest.approx(statistics.stdev(values))
        overall = [50 * (r["A"] + r["B"]) for r in runs]
        assert row.overall.mean == pytest.approx(statistics.mean(overall))
        assert row.overall.std == pytest.approx(statistics.stdev(overall))
        assert row.overall.n == 3 and row.seeds == [0, 1, 2]
    assert beyond_spread(moe, lora) is True  # 81.0 vs 42.5, stds 1.0 and 4.3

    table = (sweep / "summary.md").read_text()
    assert "| method=lora | 3 | 55.0 ± 5.0 | 30.0 ± 10.0 | **42.5 ± 4.3** | baseline |" in table
    assert (
        "| method=moelora | 3 | 90.0 ± 2.0 | 72.0 ± 2.0 | **81.0 ± 1.0** | +38.5 beyond spread |"
        in table
    )
    with (sweep / "summary.csv").open() as handle:
        rows_csv = list(csv.DictReader(handle))
    assert float(rows_csv[0]["A_std"]) == pytest.approx(5.0)
    assert float(rows_csv[1]["overall_mean"]) == pytest.approx(81.0)
    assert (
        rows_csv[1]["seeds"] == "0 1 2" and rows_csv[0]["train_tokens_per_second_mean"] == "101.0"
    )
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_configurations_are_told_apart_by_what_differs_except_the_seed(tmp_path) -> None:
    made_up_run(tmp_path, "a0", "lora", 0, {"A": 0.1}, lr=0.001)
    made_up_run(tmp_path, "a1", "lora", 1, {"A": 0.3}, lr=0.001)
    made_up_run(tmp_path, "b0", "lora", 0, {"A": 0.5}, lr=0.01)
    made_up_run(tmp_path, "c0", "molora", 0, {"A": 0.7}, lr=0.01, fields={"top_k": 2})
    rows = summarize(find_runs([tmp_path]))
    labels = {row.label: row.overall.n for row in rows}
    assert labels == {
        "method=lora trainer.lr=0.001": 2,
        "method=lora trainer.lr=0.01": 1,
        "method=molora trainer.lr=0.01": 1,  # top_k is molora's own preset, not a difference
    }
    single = next(row for row in rows if row.overall.n == 1)
    assert beyond_spread(single, rows[0]) is None  # one seed: no call


def test_compare_on_the_command_line(sweep, capsys, tmp_path) -> None:
    out = tmp_path / "report"
    two = [str(sweep / "lora0"), str(sweep / "moe1")]
    done = in_process(capsys, "compare", *two, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "| method=moelora | 1 |" in done.stdout and (out / "summary.csv").is_file()
    assert "| method=lora | 1 | 50.0 | 30.0 | **40.0** | baseline |" in done.stdout  # cheaper
    done = in_process(capsys, "compare", *two, "--out", str(out), "--baseline", "method=moelora")
    assert "| method=moelora | 1 | 92.0 | 72.0 | **82.0** | baseline |" in done.stdout
    assert "| method=lora | 1 | 50.0 | 30.0 | **40.0** | -42.0 n/a |" in done.stdout
    done = in_process(capsys, "compare", *two, "--out", str(out), "--baseline", "method=x")
    assert done.returncode == 2 and "--baseline 'method=x' is not a configuration" in done.stderr
    done = in_process(capsys, "compare", *two)
    assert done.returncode == 2 and "--out <dir>" in done.stderr
    done = in_process(capsys, "compare", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    with pytest.raises(UserError, match="no finished run"):
        find_runs([sweep / "unfinished"])


def test_curves_plot_every_logged_loss_by_step() -> None:
    history = [
        {"step": 2, "train/loss": 3.0, "train/lr": 0.1, "train/load_balance": 1.2},
        {"step": 4, "train/loss": 2.0, "train/lr": 0.1, "train/load_balance": 1.1},
        {"step": 4, "eval/loss": 2.5},
        {"step": 6, "train/lr": 0.1, "train/skipped_steps": 1},
    ]
    assert curve_series(history) == {
        "train/loss": ([2, 4], [3.0, 2.0]),
        "train/load_balance": ([2, 4], [1.2, 1.1]),
        "eval/loss": ([4], [2.5]),
    }


def test_a_multirun_ends_with_the_summary_in_its_sweep_folder(capsys, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    settings = [
        *SMALL,
        "trainer.max_steps=3",
        "data.max_eval_samples_per_task=1",
        "eval.before=false",
        "eval.max_new_tokens=4",
    ]
    done = in_process(
        capsys,
        "train",
        "-m",
        *settings,
        "method=lora,moelora",
        "trainer.seed=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = (sweep / "summary.md").read_text()
    assert "| method=lora | 2 |" in table and "| method=moelora | 2 |" in table
    for job in range(4):
        history = [json.loads(line) for line in (sweep / str(job) / "history.jsonl").open()]
        assert [row["step"] for row in history if "train/loss" in row] == [3]
        assert "![training curves](curves.png)" in (sweep / str(job) / "report.md").read_text()
    # Jobs 0-1 are lora (one expert, nothing routed), 2-3 moelora (a task gate per row).
    assert not (sweep / "0" / "routing.json").exists()
    routing = json.loads((sweep / "2" / "routing.json").read_text())
    assert set(routing["groups"]["all"]["mean_weight"]) == {
        "DEMO-CLS",
        "DEMO-GEN",
        "DEMO-NER",
        "DEMO-STS",
    }
