"""Benchmark: greedy generation time of adapted models against the bare base, same prompts.

Runs `moelora.evaluate.generate.generate_answers` (what `eval`, `predict` and training's scoring
run) on one Llama-style model built from a config (random weights): the bare base, then each
method through its adapter (`fold=False`) and, for static gates, folded into the base weights
per task (`fold=True`). Rounds are interleaved so that a slow spell hits every row alike.
Prints a markdown table (median seconds, ratio to the bare base).

    python scripts/bench_decoding.py                       # CPU-sized defaults
    python scripts/bench_decoding.py --hidden 2048 --layers 16 --prompts 256 --device cuda
    python scripts/bench_decoding.py --shape 0.5b --new-tokens 32 --device cuda  # Qwen2.5-0.5B
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from bench_adapters import build_base, shape_arguments, vocab_size  # the benches' base
from bench_shapes import bench_dtype, device_name
from datasets import Dataset

from moelora.adapters import AdaptedModel, method_config
from moelora.evaluate.generate import generate_answers

METHODS: dict[str, dict] = {
    "lora r16": {"name": "lora", "rank_per_expert": 16},
    "moelora E8 r2": {"name": "moelora", "num_experts": 8, "total_rank": 16},
    "molora E4 k2 r4": {"name": "molora", "num_experts": 4, "rank_per_expert": 4, "top_k": 2},
}


class TokenIds:
    """The tokenizer surface generation needs; no end-of-sequence, so every row decodes
    exactly `--new-tokens` tokens and the work is the same for every model."""

    pad_token_id = 0
    eos_token_id = None

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(str(int(token)) for token in row) for row in sequences]


def prompts(args: argparse.Namespace) -> Dataset:
    """Prompts of one length: folding groups rows by task, and with unequal lengths a small
    group pads more than the base's length-sorted batches do, which would blur the comparison
    of the decoding paths (on a real dev set, with hundreds of rows per task, it is small)."""
    generator = torch.Generator().manual_seed(1)
    shape = (args.prompts, args.prompt_length)
    ids = torch.randint(1, vocab_size(args), shape, generator=generator)
    return Dataset.from_dict(
        {
            "prompt_ids": ids.tolist(),
            "task_ids": [i % args.tasks for i in range(args.prompts)],
            "domain_ids": [i % args.tasks for i in range(args.prompts)],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=4, help="tasks the prompts cycle through")
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    shape_arguments(parser)
    args = parser.parse_args()
    dtype = bench_dtype(args.dtype, args.device)
    accelerator = Accelerator(cpu=args.device == "cpu")
    rows, tokenizer = prompts(args), TokenIds()
    base = build_base(args).to(args.device, dtype).eval()

    def runner(model: torch.nn.Module, fold: bool) -> Callable[[], list[str]]:
        return lambda: generate_answers(
            model, tokenizer, rows, args.batch, args.new_tokens, accelerator, "", fold
        )

    cases: dict[str, Callable[[], list[str]]] = {"base model": runner(base, False)}
    for label, fields in METHODS.items():
        config = method_config({"alpha": 32, "dropout": 0.0, **fields})
        model = AdaptedModel(copy.deepcopy(base), config, num_tasks=args.tasks)
        with torch.no_grad():  # B = 0 would fold to the base itself; give the adapter values
            for name, param in model.named_adapter_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.02)
        model.to(args.device).eval()
        cases[f"{label}, unfolded"] = runner(model, False)
        if all(layer.gate.static for layer in model.adapted_layers.values()):
            cases[f"{label}, folded per task"] = runner(model, True)

    times: dict[str, list[float]] = {label: [] for label in cases}
    for run in cases.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for label, run in cases.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)

    shape = f"Qwen2.5-{args.shape} shape" if args.shape else f"hidden {args.hidden}"
    print(
        f"\ndevice {args.device} ({device_name(args.device)}), dtype {dtype}, {shape}, "
        f"layers {base.config.num_hidden_layers}, "
        f"{args.prompts} prompts of {args.prompt_length} tokens over "
        f"{args.tasks} tasks, batch {args.batch}, {args.new_tokens} new tokens, median of "
        f"{args.rounds} interleaved rounds\n"
    )
    print("| model | seconds | vs base model |")
    print("|---|---:|---:|")
    median = {label: sorted(t)[len(t) // 2] for label, t in times.items()}
    for label, seconds in median.items():
        print(f"| {label} | {seconds:.2f} | {seconds / median['base model']:.2f}x |")


if __name__ == "__main__":
    main()
