"""Benchmark: training-step speed and memory of every method against PEFT's LoRA, same run.

Builds one Llama-style model from a config (random weights), wraps it with PEFT LoRA and with
each moelora method at comparable adapter size, and times forward + backward + AdamW steps.
Prints a markdown table (tokens/s, ratio to PEFT, peak memory where CUDA reports it).

    python scripts/bench_adapters.py                     # CPU-sized defaults
    python scripts/bench_adapters.py --hidden 2048 --layers 8 --batch 8 --seq 512 --device cuda
    python scripts/bench_adapters.py --shape 0.5b --seq 512 --device cuda   # Qwen2.5-0.5B's shape

With a GPU in mfu.py's table the MFU column is filled (the formula is in scripts/mfu.py).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from bench_shapes import QWEN2_5, bench_dtype, build_qwen, device_name
from mfu import attention_width, flops_cells, matmul_weights, training_flops_per_token
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from moelora.adapters import AdaptedModel, method_config

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
    """Qwen2.5's shape `args.shape` if given, else a Llama of `args.hidden` x `args.layers`."""
    if getattr(args, "shape", None) in QWEN2_5:
        return build_qwen(args.shape, args.vocab)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=args.vocab or 2000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1),
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


class Timed:
    """One model under test with its optimizer and the step times measured so far."""

    def __init__(self, label: str, model: torch.nn.Module, params: int) -> None:
        self.label, self.model, self.params = label, model, params
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.times: list[float] = []
        self.flops = 0.0  # training FLOPs per token (mfu.py)

    def steps(self, batch: dict, count: int, device: str, record: bool) -> None:
        self.model.train()
        for _ in range(count):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            self.model(**batch).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if record:
                self.times.append(time.perf_counter() - start)

    @property
    def seconds(self) -> float:
        """The median step time."""
        return sorted(self.times)[len(self.times) // 2]


def measure(models: list[Timed], batch: dict, args: argparse.Namespace) -> dict[str, float]:
    """Warm every model up, then time them in `args.rounds` interleaved rounds, so that a
    slow spell of a shared machine hits every model alike; peak memory (CUDA) per model."""
    peaks = {}
    for timed in models:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed.steps(batch, args.warmup, args.device, record=False)
        peaks[timed.label] = (
            torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
        )
    per_round = max(args.steps // args.rounds, 1)
    for _ in range(args.rounds):
        for timed in models:
            timed.steps(batch, per_round, args.device, record=True)
    return peaks


def shape_arguments(parser: argparse.ArgumentParser) -> None:
    """--shape, --vocab and --dtype, shared with bench_decoding.py."""
    parser.add_argument("--shape", choices=list(QWEN2_5), help="Qwen2.5's shape, not --hidden")
    parser.add_argument("--vocab", type=int, help="vocabulary (2000, or the --shape's own)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")


def vocab_size(args: argparse.Namespace) -> int:
    """The vocabulary build_base gives the model."""
    return args.vocab or (QWEN2_5[args.shape].vocab if args.shape in QWEN2_5 else 2000)


def build_models(args: argparse.Namespace, dtype: torch.dtype) -> tuple[list[Timed], float]:
    """PEFT's LoRA and every method on copies of one base, and their FLOPs per token."""
    base = build_base(args).to(dtype)
    task_ids = torch.arange(args.batch, device=args.device) % 4
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS),
    ).to(args.device)
    models = [Timed("PEFT LoRA r16", peft_model, peft_model.get_nb_trainable_parameters()[0])]
    for label, fields in METHODS.items():
        cfg = method_config({"alpha": 32, "dropout": 0.0, **fields})
        model = AdaptedModel(copy.deepcopy(base), cfg, num_tasks=4, num_domains=4).to(args.device)
        routed = {"task_ids": task_ids, "domain_ids": task_ids}
        models.append(Timed(label, _Bound(model, routed), model.num_trainable_parameters()))
    frozen, _ = matmul_weights(peft_model)
    layers, width = base.config.num_hidden_layers, attention_width(base.config)
    for timed in models:
        timed.flops = training_flops_per_token(frozen, timed.params, layers, width, args.seq)
    return models, frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per model")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    shape_arguments(parser)
    args = parser.parse_args()
    dtype = bench_dtype(args.dtype, args.device)
    ids = torch.randint(vocab_size(args), (args.batch, args.seq), device=args.device)
    models, frozen = build_models(args, dtype)
    peaks = measure(models, {"input_ids": ids, "labels": ids}, args)

    name, tokens = device_name(args.device), args.batch * args.seq
    shape = f"Qwen2.5-{args.shape} shape" if args.shape else f"hidden {args.hidden}"
    print(
        f"\ndevice {args.device} ({name}), dtype {dtype}, {shape}, {frozen:,} frozen matmul "
        f"weights, batch {args.batch} x seq {args.seq}, median of {args.steps} steps in "
        f"{args.rounds} interleaved rounds; MFU per scripts/mfu.py\n"
    )
    print(
        "| adapter | trainable params | tokens/s | vs PEFT LoRA | model TFLOP/s | MFU | peak GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = models[0].seconds
    for timed in models:
        speed = tokens / timed.seconds
        flops = " | ".join(flops_cells(speed, timed.flops, name))
        print(
            f"| {timed.label} | {timed.params:,} | {speed:,.0f} | "
            f"{reference / timed.seconds:.2f}x | {flops} | {peaks[timed.label]:.2f} |"
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
