"""Benchmark: one token-routed Linear (MoLoRA), every expert's ranks masked (`dense`) against
only the chosen experts' ranks (`gather`), against PEFT's LoRA of the same active rank k * r.

Forward + backward of one adapted Linear on `--tokens` tokens, median of interleaved rounds,
for each E x k x r of the grid. Prints a markdown table: time relative to PEFT LoRA r = k * r,
and which `method.expert_compute=auto` picks.

    python scripts/bench_routed.py                          # CPU-sized defaults, d = 1024
    python scripts/bench_routed.py --dim 4096 --tokens 8192 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch
from bench_shapes import bench_dtype, device_name
from peft import LoraConfig, get_peft_model
from torch import nn

from moelora.adapters import (
    AdapterConfig,
    Routing,
    RoutingState,
    build_layer,
    method_config,
    method_of,
)


class OneLinear(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def molora_config(experts: int, top_k: int, rank: int, compute: str) -> AdapterConfig:
    fields = {"num_experts": experts, "top_k": top_k, "rank_per_expert": rank}
    return method_config({"name": "molora", "dropout": 0.0, "expert_compute": compute, **fields})


def timer(step: Callable[[], None], device: str) -> Callable[[], float]:
    def timed() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    args = parser.parse_args()
    dtype = bench_dtype(args.dtype, args.device)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=args.device, dtype=dtype, requires_grad=True)
    weight = torch.randn(args.tokens, args.dim, device=args.device, dtype=dtype)

    print(
        f"\ndevice {args.device} ({device_name(args.device)}), dtype {dtype}, d_in = d_out = "
        f"{args.dim}, {args.tokens} tokens, forward + backward, median of {args.rounds} x "
        f"{args.steps} interleaved steps\n"
    )
    print("| E | k | r | PEFT LoRA r=k*r ms | dense | gather | auto picks |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for experts, top_k, rank in itertools.product(args.experts, args.top_k, args.ranks):
        if top_k > experts:
            continue
        base = OneLinear(args.dim).to(args.device, dtype)
        peft = get_peft_model(
            base, LoraConfig(r=top_k * rank, lora_alpha=16, target_modules=["proj"])
        )
        nn.init.normal_(peft.base_model.model.proj.lora_B["default"].weight, std=0.01)
        steps = {"peft": timer(lambda m=peft: (m(x) * weight).sum().backward(), args.device)}
        gathers = method_of(molora_config(experts, top_k, rank, "auto")).gathers()
        auto = "gather" if gathers else "dense"
        for compute in ("dense", "gather"):
            linear = nn.Linear(args.dim, args.dim, bias=False).to(args.device, dtype)
            routing = Routing()
            layer = build_layer(
                linear.requires_grad_(False),
                molora_config(experts, top_k, rank, compute),
                routing,
                num_tasks=1,
                num_domains=1,
            )
            nn.init.normal_(layer.lora_B_0, std=0.01)

            def step(layer=layer, routing=routing) -> None:
                with routing.bind(RoutingState()):
                    (layer(x) * weight).sum().backward()

            steps[compute] = timer(step, args.device)
        times = {name: [] for name in steps}
        for timed in steps.values():  # warm-up
            timed()
        for _ in range(args.rounds):
            for name, timed in steps.items():
                times[name] += [timed() for _ in range(args.steps)]
        median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        peft_ms = median["peft"]
        print(
            f"| {experts} | {top_k} | {rank} | {peft_ms * 1e3:.2f} | "
            f"{median['dense'] / peft_ms:.2f}x | {median['gather'] / peft_ms:.2f}x | {auto} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
