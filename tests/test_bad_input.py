"""Bad settings and bad data files, as a table: each stops `moelora train` with exit code 2 and
one line that names the key or file and the fix, before any model loads and without a traceback,
and the run directory is not written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelora.paths import DATA_DIR
from tests.test_config import in_process

DEMO_ROW = json.loads((DATA_DIR / "demo" / "train.jsonl").open(encoding="utf-8").readline())

# (override, what the line must say)
BAD_SETTINGS = [
    ("trainer.lr=-1", "trainer.lr=-1.0 is out of range; set it greater than 0"),
    ("trainer.lr=0", "trainer.lr=0.0 is out of range; set it greater than 0"),
    ("trainer.batch_size=0", "trainer.batch_size=0 is out of range; set it at least 1"),
    ("trainer.grad_accum=0", "trainer.grad_accum=0 is out of range; set it at least 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is out of range; set it at least 1"),
    ("trainer.warmup_ratio=1.0", "trainer.warmup_ratio=1.0 is out of range; set it at least 0"),
    ("trainer.warmup_ratio=-0.1", "trainer.warmup_ratio=-0.1 is out of range"),
    ("trainer.weight_decay=-0.01", "trainer.weight_decay=-0.01 is out of range"),
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm=-1.0 is out of range"),
    ("trainer.log_every=0", "trainer.log_every=0 is out of range; set it at least 1"),
    ("trainer.save_every=-5", "trainer.save_every=-5 is out of range; set it at least 0"),
    ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints=-1 is out of range"),
    ("trainer.max_bad_steps=0", "trainer.max_bad_steps=0 is out of range; set it at least 1"),
    ("trainer.resume=sometimes", "trainer.resume=sometimes is unknown; use true, false or auto"),
    ("trainer.lr=fast", "trainer.lr"),
    ("eval.batch_size=0", "eval.batch_size=0 is out of range; set it at least 1"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 is out of range; set it at least 1"),
    ("data.max_source_length=0", "data.max_source_length=0 is out of range"),
    ("data.max_target_length=-3", "data.max_target_length=-3 is out of range"),
    ("data.mixture.temperature=0", "data.mixture.temperature=0.0 is out of range"),
    ("data.packing=zip", "data.packing='zip' is unknown; use one of"),
    ("data.pack_length=1", "data.pack_length=1 is out of range; set it at least 2"),
    ("data.group_window=0", "data.group_window=0 is out of range; set it at least 1"),
    ("data.mixture.strategy=zipf", "data.mixture.strategy='zipf' is unknown; use one of"),
    ("data.mixture.epoch_size=0", "data.mixture.epoch_size=0 is out of range"),
    ("hardware.num_processes=0", "hardware.num_processes=0 is out of range; set it at least 1"),
    ("hardware.main_process_port=70000", "hardware.main_process_port=70000 is out of range"),
    (
        "model=tiny model.tiny.num_heads=3",
        "model.tiny.hidden_size=256, num_heads=3 and num_kv_heads=2",
    ),
    (
        "model=tiny model.tiny.num_layers=0",
        "model.tiny.num_layers=0 is out of range; set it at least 1",
    ),
    ("method.dropout=1.0", "method: dropout=1.0 must lie in [0, 1)"),
    ("method.alpha=0", "method: alpha=0"),
    ("method.rank_per_expert=0", "method: rank_per_expert=0 must be a positive integer"),
    ("method=molora method.top_k=5", "method: top_k=5 must lie in [1, num_experts=4]"),
    ("method=molora method.aux_loss_coef=-1", "method: aux_loss_coef=-1.0 must be at least 0"),
    ("method=moelora method.num_experts=0", "method: num_experts=0 must be at least 1"),
    ("method=moelora method.total_rank=10 method.num_experts=4", "total_rank=10 does not split"),
    ("method=contrastive method.contrastive_tau=0", "contrastive_tau > 0"),
    (
        "method=molora method.expert_compute=sparse",
        "method.expert_compute='sparse' is unknown; use one of dense, gather, auto",
    ),
    ("method=molora trainer.compile=true", "trainer.compile=true cannot serve molora"),
    ("trainer.resume=true", "trainer.resume=true, but"),
    ("data.tasks=[DEMO-XYZ]", "DEMO-XYZ"),
    ("data.root=/nonexistent/moelora", "/nonexistent/moelora"),
]


def check_one_line(result, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("moelora train: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(("override", "message"), BAD_SETTINGS)
def test_a_bad_setting_stops_in_one_line(override, message, capsys, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "+experiment=demo", *override.split(), f"run_dir={run_dir}"]
    check_one_line(in_process(capsys, *args), message)
    assert not (run_dir / "config.yaml").exists()


def write_rows(path: Path, rows: list[dict | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def without(key: str) -> dict:
    return {k: v for k, v in DEMO_ROW.items() if k != key}


# (train rows, extra override, what the line must say besides the file)
BAD_FILES = [
    ([without("target")], [], "has no 'target' field"),
    ([without("input")], [], "has no 'input' field"),
    ([DEMO_ROW, '{"input": "cut off'], [], "train.jsonl:2"),
    ([], [], "is empty"),
    ([{**DEMO_ROW, "target": 7}], [], "train.jsonl"),
    ([{**DEMO_ROW, "input": "长" * 400}], ["data.length_policy=error"], "data.max_source_length"),
]


@pytest.mark.parametrize(("rows", "extra", "message"), BAD_FILES)
def test_a_bad_data_file_stops_in_one_line(rows, extra, message, capsys, tmp_path) -> None:
    root = tmp_path / "data"
    write_rows(root / "train.jsonl", rows)
    (root / "dev.jsonl").write_text((DATA_DIR / "demo" / "dev.jsonl").read_text("utf-8"), "utf-8")
    args = ["train", "+experiment=demo", f"data.root={root}", *extra, f"run_dir={tmp_path}/run"]
    result = in_process(capsys, *args)
    check_one_line(result, message)
    assert "train.jsonl" in result.stderr or "data." in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_the_table_covers_at_least_25_cases() -> None:
    assert len(BAD_SETTINGS) + len(BAD_FILES) >= 25
