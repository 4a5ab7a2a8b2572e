"""Throughput and peak memory of the hardware presets on one model size, as a table.

Each preset trains the same model (a Qwen2.5 architecture built from its config, random weights,
the demo data) for a few steps through `moelora train`; the first preset is the baseline of the
ratio column. Run it alone on the machine: parallel work distorts the timings.

    python scripts/bench_hardware.py                    # gpu zero2 zero3 qlora_4bit, 0.5B
    python scripts/bench_hardware.py --size 1.5b --processes 8
    python scripts/bench_hardware.py --size tiny --presets cpu ddp zero2 zero3 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Qwen2.5 shapes (hidden, intermediate, layers, heads, kv heads); the vocabulary is the demo's.
SIZES = {
    "tiny": (64, 128, 2, 4, 2),
    "0.5b": (896, 4864, 24, 14, 2),
    "1.5b": (1536, 8960, 28, 12, 2),
    "7b": (3584, 18944, 28, 28, 4),
}
MULTI_PROCESS = {"ddp", "zero2", "zero2_offload", "zero3", "zero3_offload"}


def run_preset(preset: str, args: argparse.Namespace, folder: Path) -> dict:
    hidden, inter, layers, heads, kv = SIZES[args.size]
    overrides = [
        "+experiment=demo",
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
        "trainer.log_every=5",
        "trainer.log_with=[none]",
        "eval.enabled=false",
        "data.max_eval_samples_per_task=4",
        f"hardware={preset}",
        f"run_dir={folder / preset}",
    ]
    if preset in MULTI_PROCESS:
        overrides.append(f"hardware.num_processes={args.processes}")
    command = [sys.executable, "-m", "moelora", "train", *overrides]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-2000:]
        return {"error": f"exit {done.returncode}: ...{tail}"}
    return json.loads((folder / preset / "metrics.json").read_text())["info"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["gpu", "zero2", "zero3", "qlora_4bit"])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--processes", type=int, default=1, help="for ddp and zero presets")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            print(f"running {preset} ...", file=sys.stderr, flush=True)
            rows.append((preset, run_preset(preset, args, Path(tmp))))

    print(
        f"\nsize {args.size}, method {args.method}, {args.steps} steps, batch {args.batch_size} "
        f"per device, checkpointing {args.checkpointing}\n"
    )
    print("| preset | processes | tokens/s | vs first | peak GPU GiB (rank 0) | peak host GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    base = next((info["train_tokens_per_second"] for _, info in rows if "error" not in info), 0)
    for preset, info in rows:
        if "error" in info:
            print(f"| {preset} | failed: {info['error'].splitlines()[-1][:80]} | | | | |")
            continue
        speed = info["train_tokens_per_second"]
        processes = args.processes if preset in MULTI_PROCESS else 1
        print(
            f"| {preset} | {processes} | {speed:,} | {speed / base:.2f}x | "
            f"{info.get('peak_gpu_memory_gib', '-')} | {info['peak_host_memory_gib']} |"
        )


if __name__ == "__main__":
    main()
