"""Benchmark: training-step speed and memory of every method against PEFT's LoRA, same run.

Builds one Llama-style model from a config (random weights), wraps it with PEFT LoRA and with
each moelora method at comparable adapter size, and times forward + backward + AdamW steps.
Prints a markdown table (tokens/s, ratio to PEFT, peak memory where CUDA reports it).

    python scripts/bench_adapters.py                     # CPU-sized defaults
    python scripts/bench_adapters.py --hidden 2048 --layers 8 --batch 8 --seq 512 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from moelora.adapters import AdaptedModel, AdapterConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Comparable budgets: every method below has total rank 16 per adapted Linear except molora
# and contrastive, whose experts each have the given rank (MING-MOE's convention).
METHODS: dict[str, dict] = {
    "lora r16": {"name": "lora", "rank_per_expert": 16},
    "moelora E8 r2": {"name": "moelora", "num_experts": 8, "total_rank": 16},
    "molora E4 k2 r4": {
        "name": "molora",
        "num_experts": 4,
        "rank_per_expert": 4,
        "top_k": 2,
        "scaling_rank": "expert",
    },
    "contrastive E4 k2 r4": {
        "name": "contrastive",
        "num_experts": 4,
        "rank_per_expert": 4,
        "top_k": 2,
    },
    "modula_res u8 d8": {"name": "modula_res", "universal_rank": 8, "domain_rank": 8, "stages": []},
}


def build_base(args: argparse.Namespace) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1),
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def time_steps(model, batch: dict, steps: int, warmup: int, device: str) -> tuple[float, float]:
    """Seconds per step (median of `steps`) and peak memory in GiB (CUDA only, else nan)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    base = build_base(args).to(dtype)
    ids = torch.randint(args.vocab, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "labels": ids}
    task_ids = torch.arange(args.batch, device=args.device) % 4
    tokens = args.batch * args.seq

    rows = []
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS),
    ).to(args.device)
    peft_time, peft_peak = time_steps(peft_model, batch, args.steps, args.warmup, args.device)
    rows.append(
        ("PEFT LoRA r16", peft_model.get_nb_trainable_parameters()[0], peft_time, peft_peak)
    )
    del peft_model
    for label, fields in METHODS.items():
        cfg = AdapterConfig.coerce({"alpha": 32, "dropout": 0.0, **fields})
        model = AdaptedModel(copy.deepcopy(base), cfg, num_tasks=4, num_domains=4).to(args.device)
        routed = {"task_ids": task_ids, "domain_ids": task_ids}
        seconds, peak = time_steps(
            _Bound(model, routed), batch, args.steps, args.warmup, args.device
        )
        rows.append((label, model.num_trainable_parameters(), seconds, peak))
        del model

    print(
        f"\ndevice {args.device}, dtype {dtype}, hidden {args.hidden}, layers {args.layers}, "
        f"batch {args.batch} x seq {args.seq}, median of {args.steps} steps\n"
    )
    print("| adapter | trainable params | tokens/s | vs PEFT LoRA | peak GiB |")
    print("|---|---:|---:|---:|---:|")
    for label, params, seconds, peak in rows:
        print(
            f"| {label} | {params:,} | {tokens / seconds:,.0f} | {peft_time / seconds:.2f}x | "
            f"{peak:.2f} |"
        )


class _Bound(torch.nn.Module):
    """Calls an AdaptedModel with fixed routing ids, so one timing loop serves every model."""

    def __init__(self, model: AdaptedModel, routed: dict) -> None:
        super().__init__()
        self.model, self.routed = model, routed

    def forward(self, **batch):
        return self.model(**batch, **self.routed)


if __name__ == "__main__":
    main()
