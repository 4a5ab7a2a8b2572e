"""Throughput and peak memory of the hardware presets on one model size, as a table.

Each preset trains the same model (a Qwen2.5 architecture built from its config, random weights,
the demo data) for a few steps through `moelora train`; the first preset is the baseline of the
ratio column. Run it alone on the machine: parallel work distorts the timings.

    python scripts/bench_hardware.py                    # gpu zero2 zero3 qlora_4bit, 0.5B
    python scripts/bench_hardware.py --size 1.5b --processes 8
    python scripts/bench_hardware.py --size tiny --presets cpu ddp zero2 zero3 --processes 2

Rows print as each preset finishes, so a run stopped early keeps the finished ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from bench_shapes import QWEN2_5, device_name
from mfu import flops_cells, matmul_weights, training_flops_per_token
from process_tree import run_limited

REPO = Path(__file__).resolve().parents[1]
# (hidden, intermediate, layers, heads, kv heads): Qwen2.5's shapes; the vocabulary is the demo's.
SIZES = {
    "tiny": (64, 128, 2, 4, 2),
    **{n: (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads) for n, s in QWEN2_5.items()},
}
MULTI_PROCESS = {"ddp", "zero2", "zero2_offload", "zero3", "zero3_offload"}
LOG_EVERY = 5  # steady tokens/s are measured from this step on


def run_preset(preset: str, args: argparse.Namespace, folder: Path) -> dict:
    hidden, inter, layers, heads, kv = SIZES[args.size]
    overrides = [
        "+experiment=demo",
        "model=tiny",  # the demo's default base is the shipped checkpoint; this builds the shape
        "model.dtype=auto",  # bf16 on a GPU, fp32 on a CPU, as for a real checkpoint
        f"method={args.method}",
        "model.tiny.architecture=qwen2",
        f"model.tiny.hidden_size={hidden}",
        f"model.tiny.intermediate_size={inter}",
        f"model.tiny.num_layers={layers}",
        f"model.tiny.num_heads={heads}",
        f"model.tiny.num_kv_heads={kv}",
        "model.tiny.pretrain_steps=0",
        f"trainer.max_steps={args.steps}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.gradient_checkpointing={str(args.checkpointing).lower()}",
        "trainer.eval_every=0",
        f"trainer.log_every={LOG_EVERY}",
        "trainer.log_with=[tensorboard]",  # its wall-clock times give the steady speed
        "eval.enabled=false",
        "data.max_eval_samples_per_task=4",
        f"hardware={preset}",
        f"run_dir={folder / preset}",
    ]
    if preset in MULTI_PROCESS:
        overrides.append(f"hardware.num_processes={args.processes}")
    command = [sys.executable, "-m", "moelora", "train", *overrides]
    done = run_limited(command, args.timeout, cwd=REPO, env=os.environ)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:].rstrip()
        why = f"exit {done.returncode}" if done.returncode is not None else "time limit"
        return {"error": f"{why} after {done.seconds:.0f} s: ...{tail}"}
    info = json.loads((folder / preset / "metrics.json").read_text())["info"]
    return {**info, "steady_tokens_per_second": steady_speed(folder / preset, info)}


def steady_speed(run_dir: Path, info: dict) -> float | None:
    """Tokens/s from the first logged step to the last, by the wall-clock times TensorBoard
    stamps on the logged losses: metrics.json's figure counts the first steps too (CUDA and
    DeepSpeed warm-up), which dominate a short run on a GPU. Tokens per step are the run's
    mean (its token count is tokens/s x seconds, rounded to 0.1 s: about 1% on 30 steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            points = [(e.step, e.wall_time) for e in accumulator.Scalars("train/loss")]
    if len(points) < 2:
        return None
    (first, start), (last, end) = points[0], points[-1]
    per_step = info["train_tokens_per_second"] * info["train_seconds"] / info["steps"]
    return per_step * (last - first) / (end - start)


def frozen_weights(size: str) -> tuple[int, int]:
    """(frozen matmul weights, layers) of the size's model with the demo's vocabulary, counted
    on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from moelora.paths import DATA_DIR

    hidden, inter, layers, heads, kv = SIZES[size]
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(AutoTokenizer.from_pretrained(DATA_DIR / "tokenizer")),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    return matmul_weights(model)[0], layers


def row(preset: str, info: dict, args: argparse.Namespace, base: float, flops: tuple) -> str:
    """One table row; `flops` is (frozen matmul weights, device name) for the MFU cells."""
    if "error" in info:
        return f"| {preset} | failed: {info['error'].splitlines()[-1][:120]} |" + " |" * 7
    steady = info["steady_tokens_per_second"] or info["train_tokens_per_second"]
    frozen, device = flops
    per_token = training_flops_per_token(frozen, info["trainable_parameters"])
    processes = args.processes if preset in MULTI_PROCESS else 1
    return (
        f"| {preset} | {processes} | {info['train_tokens_per_second']:,} | {steady:,.0f} | "
        f"{steady / base:.2f}x | {' | '.join(flops_cells(steady, per_token, device))} | "
        f"{info.get('peak_gpu_memory_gib', '-')} | {info['peak_host_memory_gib']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gpu", "zero2", "zero3", "qlora_4bit"])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--processes", type=int, default=1, help="for ddp and zero presets")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per preset")
    args = parser.parse_args()

    device = device_name("cuda") if torch.cuda.is_available() else "cpu"
    frozen, _ = frozen_weights(args.size)
    print(
        f"\nsize {args.size} ({frozen:,} frozen matmul weights with the demo's vocabulary), "
        f"method {args.method}, {args.steps} steps, batch {args.batch_size} per device, "
        f"checkpointing {args.checkpointing}, {device}; steady: from step {LOG_EVERY} on; "
        "MFU per scripts/mfu.py on real (unpadded) tokens, attention scores not counted\n"
    )
    print(
        "| preset | processes | tokens/s (all steps) | steady tokens/s | vs first | "
        "model TFLOP/s | MFU | peak GPU GiB (rank 0) | peak host GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    base, failed = None, {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            print(f"running {preset} ...", file=sys.stderr, flush=True)
            info = run_preset(preset, args, Path(tmp))
            if "error" in info:
                failed[preset] = info["error"]
            elif base is None:
                base = info["steady_tokens_per_second"] or info["train_tokens_per_second"]
            print(row(preset, info, args, base or 1.0, (frozen, device)), flush=True)
    for preset, error in failed.items():
        print(f"\n{preset} failed; the end of its output:\n\n```\n{error}\n```")


if __name__ == "__main__":
    main()
