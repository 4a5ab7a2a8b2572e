"""scripts/gpu_check.py and what it reports: the FLOPs behind MFU against torch's own FLOP
counter, the Qwen2.5 shapes against the published parameter counts, the steady speed read from
TensorBoard's clock, a check that goes on past a failed or stuck step, and the tiny mode
(the same steps on a CPU) writing every table."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from moelora.adapters import AdaptedModel, method_config
from tests.conftest import REPO, load_script
from tests.tiny_families import tiny_config

mfu = load_script("mfu")
shapes = load_script("bench_shapes")
gpu_check = load_script("gpu_check")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base() -> torch.nn.Module:
    """A tiny Qwen2 with eager attention: its attention matmuls are the ones the formula counts."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("qwen2"), attn_implementation="eager")


def wrap(kind: str, base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(model, its transformers model, routing inputs) for PEFT's LoRA or a moelora method."""
    if kind == "peft":
        model = get_peft_model(base, LoraConfig(r=8, target_modules=TARGETS, lora_dropout=0.0))
        return model, model, {}
    fields = {"lora": {"rank_per_expert": 8}, "moelora": {"num_experts": 4, "total_rank": 8}}
    cfg = method_config({"name": kind, "dropout": 0.0, **fields[kind]})
    model = AdaptedModel(base, cfg, num_tasks=2)
    return model, model.base_model, {"task_ids": torch.tensor([0, 1])}


# moelora's task gate is an embedding lookup, which the formula counts as a matmul weight
@pytest.mark.parametrize(("kind", "tolerance"), [("peft", 1e-9), ("lora", 1e-9), ("moelora", 0.01)])
def test_training_flops_per_token_match_torch_flop_counter(kind: str, tolerance: float) -> None:
    model, inner, routing = wrap(kind, tiny_base())
    inner.enable_input_require_grads()  # the formula counts every frozen matmul's input grad
    batch, seq = 2, 16
    ids = torch.randint(300, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids, **routing).loss.backward()
    frozen, trainable = mfu.matmul_weights(model)
    config = inner.config
    width = mfu.attention_width(config)
    expected = mfu.training_flops_per_token(frozen, trainable, 2, width, seq)
    assert counter.get_total_flops() / (batch * seq) == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
    ],
)
def test_peak_flops_by_device_name(name: str, peak: float | None) -> None:
    assert mfu.peak_tflops(name) == peak
    tflops, utilisation = mfu.flops_cells(1e6, 1e8, name)  # 100 TFLOP/s
    assert tflops == "100"
    assert utilisation == (f"{100 / peak:.1%}" if peak else "n/a")


# The model cards' sizes (0.49B, 1.54B); the exact counts are the checkpoints' tensors.
@pytest.mark.parametrize(("name", "count"), [("0.5b", 494_032_768), ("1.5b", 1_543_714_304)])
def test_qwen_shapes_have_the_published_parameter_counts(name: str, count: int) -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shapes.qwen_config(name))
    assert sum(p.numel() for p in model.parameters()) == count


def test_steady_speed_reads_tensorboard_clock(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    bench_hardware = load_script("bench_hardware")
    writer = SummaryWriter(tmp_path / "train")
    for step, wall in [(5, 100.0), (10, 101.0), (30, 105.0)]:
        writer.add_scalar("train/loss", 1.0, step, walltime=wall)
    writer.close()
    info = {"train_tokens_per_second": 1000, "train_seconds": 12.0, "steps": 30}
    # 400 tokens per step on average, 25 steps in the 5 s between the first and last log
    assert bench_hardware.steady_speed(tmp_path, info) == pytest.approx(2000)


def fake_bench(folder: Path, name: str, body: str) -> str:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_a_failed_or_stuck_step_is_reported_and_the_check_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child = tmp_path / "child.pid"
    stuck = f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(child)!r}, "w").write(str(grandchild.pid))
        time.sleep(60)
        """
    table = "print('[log] noise\\n\\nabout\\n\\n| a |')"
    steps = (
        gpu_check.Step("fails", fake_bench(tmp_path, "fails", "raise ValueError('bad')"), (), 30),
        gpu_check.Step("table", fake_bench(tmp_path, "table", table), (), 30),
        gpu_check.Step("stuck", fake_bench(tmp_path, "stuck", stuck), (), 3),
        gpu_check.Step("late", fake_bench(tmp_path, "late", "print('never')"), (), 30),
    )
    monkeypatch.setitem(gpu_check.STEPS, "tiny", steps)
    out = tmp_path / "check.md"
    # the stuck step takes 3 of the 18 s: under the 15 s a step needs to start are left
    assert gpu_check.main(["--mode", "tiny", "--out", str(out), "--budget", "18"]) == 1
    text = out.read_text()
    assert "**failed**: ValueError: bad" in text
    assert re.search(r"\*\*time limit\*\*: stopped after \d+ s", text)
    assert "about\n\n| a |" in text and "[log] noise" not in text
    assert "**skipped**: the check's budget ran out" in text
    assert "never" not in text
    assert not psutil.pid_exists(int(child.read_text()))  # the stuck step's whole tree ended
    assert "ValueError" in out.with_suffix(".log").read_text()


def markdown_tables(text: str) -> list[list[str]]:
    """Each run of consecutive lines that start with '|'."""
    return [block.splitlines() for block in re.findall(r"(?m)^(?:\|.*(?:\n|$))+", text)]


@pytest.mark.slow
def test_tiny_mode_writes_every_table_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "tiny.md"
    script = REPO / "scripts" / "gpu_check.py"
    # under 2 minutes on 2 idle cores; the budget leaves room for a machine shared with others
    done = subprocess.run(
        [sys.executable, str(script), "--mode", "tiny", "--out", str(out), "--budget", "900"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = out.read_text()
    headers = [
        "| adapter | trainable params | tokens/s | vs PEFT LoRA | model TFLOP/s | MFU |",
        "| adapter | layout | real tokens/s |",
        "| model | seconds | vs base model |",
        "| E | k | r |",
        "| preset | processes | tokens/s (all steps) | steady tokens/s |",
    ]
    sections = text.split("\n## ")[1:]
    assert len(sections) == len(headers)
    for section, header in zip(sections, headers, strict=True):
        assert header in section
        for table in markdown_tables(section):
            assert len(table) >= 3  # header, rule, at least one row
            assert all(re.search(r"\| [\d,.]+(x|%)? \|", row) for row in table[2:]), table
    for preset in ("gpu", "qlora_4bit"):
        assert re.search(rf"\| {preset} \| 1 \| [\d,]+ \| [\d,]+ \| [\d.]+x \|", text)
