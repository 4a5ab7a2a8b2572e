"""Benchmark: real (non-padding) tokens per second of a training step with `data.packing` none,
grouped and packed, for every method and PEFT's LoRA, in one run.

Rows have PromptCBLUE-like token lengths (log-normal with median 125 and mean 236, the shape
measured on ~19,400 rows of an augmented PromptCBLUE set; cut at the pack length) and 4 tasks,
or are read from a data folder (`--data DIR` with train.jsonl, tokenized with the shipped
tokenizer). The same epoch order of rows is batched by each layout through moelora's own
collators and sampler (`moelora/data/batching.py`), and each model trains forward + backward +
AdamW over the same batches; packed batches attend row by row (`moelora_rows`, as `moelora
train` does; `--attention sdpa` for transformers' packed masks). Prints a markdown table: real
tokens/s, the ratio to PEFT LoRA on unpacked batches, the padded share of the batch tensors and
peak memory (CUDA) or the largest batch tensor (CPU).

    python scripts/bench_packing.py                               # tiny shape, every method
    python scripts/bench_packing.py --shape mid --methods "lora r16" "moelora E8 r2"
    python scripts/bench_packing.py --device cuda --shape mid --batches 12
    python scripts/bench_packing.py --device cuda --shape 0.5b     # Qwen2.5-0.5B, its vocabulary
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from bench_adapters import METHODS, TARGETS, build_base, vocab_size
from bench_shapes import QWEN2_5, bench_dtype, device_name
from peft import LoraConfig, get_peft_model

from moelora.adapters import AdaptedModel, method_config
from moelora.adapters.attention import use_row_attention
from moelora.data.batching import (
    LengthGroupedSampler,
    PackingCollator,
    TrainCollator,
    real_tokens,
)
from moelora.data.formatting import IGNORE

SHAPES = {"micro": (64, 2), "tiny": (256, 4), "mid": (512, 8)}  # hidden size, layers
LAYOUTS = ("none", "grouped", "packed")


def synthetic_rows(count: int, cap: int, vocab: int, seed: int) -> list[dict]:
    """Rows with log-normal token lengths (median 125, mean 236), at most `cap`; the last
    fifth of each row is its answer."""
    generator = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(2 * math.log(236 / 125))
    lengths = (torch.randn(count, generator=generator) * sigma + math.log(125)).exp()
    rows = []
    for index, length in enumerate(lengths.round().clamp(8, cap).int().tolist()):
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        prompt = length - max(length // 5, 1)
        rows.append(
            {
                "input_ids": ids,
                "labels": [IGNORE] * prompt + ids[prompt:],
                "task_ids": index % 4,
                "domain_ids": index % 4,
            }
        )
    return rows


def folder_rows(folder: str, cap: int) -> list[dict]:
    """train.jsonl of a data folder, tokenized as moelora trains on it (the shipped tokenizer,
    rows over `cap` tokens cut by the length policy)."""
    from transformers import PreTrainedTokenizerFast

    from moelora.config import DataConfig
    from moelora.data.formatting import PromptFormatter, tokenize_split
    from moelora.data.reader import load_split
    from moelora.data.tasks import TaskRegistry
    from moelora.paths import DATA_DIR

    tokenizer = PreTrainedTokenizerFast.from_pretrained(DATA_DIR / "tokenizer")
    tokenizer.pad_token = tokenizer.eos_token
    cfg = DataConfig(name="bench", root=folder, packing="packed", pack_length=cap)
    cfg.max_source_length, cfg.max_target_length = cap, cap
    split = load_split(folder, cfg.train_files, "data.train_files", None)
    registry = TaskRegistry.from_rows(split)
    tokenized, _ = tokenize_split(split, PromptFormatter(tokenizer, cfg), registry, "train", True)
    columns = ["input_ids", "labels", "task_ids", "domain_ids"]
    return [
        {key: row[key] if key != "domain_ids" else row[key] % 4 for key in columns}
        for row in tokenized
    ]


def batches(rows: list[dict], layout: str, args: argparse.Namespace) -> list[dict]:
    """`args.batches` batches of `args.batch` rows from one shuffled epoch, as `layout` makes
    them (the same rows in every layout but `grouped`, which reorders within windows)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    if layout == "grouped":
        lengths = [len(r["input_ids"]) for r in rows]
        order = list(LengthGroupedSampler(order, lengths, args.batch, args.window, seed=0))
    collate = PackingCollator(0, args.pack_length) if layout == "packed" else TrainCollator(0)
    chunks = [order[k : k + args.batch] for k in range(0, len(order), args.batch)]
    return [collate([rows[i] for i in chunk]) for chunk in chunks[: args.batches]]


def models(args: argparse.Namespace, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA and each method on copies of one base; with `--attention rows` (what
    `moelora train` does when it packs) the base attends packed rows one by one."""
    base = build_base(args).to(dtype)
    if args.attention == "rows":
        use_row_attention(base)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    built = {"PEFT LoRA r16": get_peft_model(copy.deepcopy(base), peft)}
    for label in args.methods:
        cfg = method_config({"alpha": 32, "dropout": 0.0, **METHODS[label]})
        built[label] = AdaptedModel(copy.deepcopy(base), cfg, num_tasks=4, num_domains=4)
    return {label: model.to(args.device) for label, model in built.items()}


def step_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """PEFT's model takes no routing ids (a packed batch needs only its position ids)."""
    if isinstance(model, AdaptedModel):
        return batch
    keep = ("input_ids", "labels", "attention_mask", "position_ids")
    return {key: value for key, value in batch.items() if key in keep}


def time_steps(model: torch.nn.Module, batch_list: list[dict], args: argparse.Namespace):
    """(real tokens/s, peak GiB or nan) of training steps over the batches, after a warm-up."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = tokens = 0.0
    for index, batch in enumerate(batch_list * args.repeats):
        inputs = {k: v.to(args.device) for k, v in step_inputs(model, batch).items()}
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if index >= args.warmup:
            seconds += time.perf_counter() - start
            tokens += real_tokens(batch)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return tokens / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, *QWEN2_5], default="tiny")
    parser.add_argument("--vocab", type=int, help="vocabulary (2000, or the Qwen shape's own)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pack-length", type=int, default=1024)
    parser.add_argument("--window", type=int, default=50, help="data.group_window")
    parser.add_argument("--batches", type=int, default=4, help="distinct batches timed")
    parser.add_argument("--repeats", type=int, default=1, help="passes over those batches")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rows", type=int, default=4000, help="synthetic rows drawn")
    parser.add_argument("--data", help="a data folder with train.jsonl instead of synthetic rows")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--attention",
        choices=["rows", "sdpa"],
        default="rows",
        help="rows: moelora_rows, as moelora train packs; sdpa: transformers' packed masks",
    )
    args = parser.parse_args()
    shape = QWEN2_5.get(args.shape)
    args.hidden, args.layers = (shape.hidden, shape.layers) if shape else SHAPES[args.shape]
    dtype = bench_dtype(args.dtype, args.device)
    if args.data:
        rows = folder_rows(args.data, args.pack_length)
    else:
        rows = synthetic_rows(args.rows, args.pack_length, vocab_size(args), seed=0)
    by_layout = {layout: batches(rows, layout, args) for layout in LAYOUTS}
    built = models(args, dtype)

    results = {}
    for layout, batch_list in by_layout.items():
        for label, model in built.items():
            results[label, layout] = time_steps(model, batch_list, args)
    reference = results["PEFT LoRA r16", "none"][0]

    print(
        f"\ndevice {args.device} ({device_name(args.device)}), {dtype}, shape {args.shape} "
        f"(hidden {args.hidden}, "
        f"{args.layers} layers), batch {args.batch} rows, pack length {args.pack_length}, "
        f"{args.batches} batches x {args.repeats} (first {args.warmup} untimed), attention "
        f"{args.attention}, rows: "
        f"{args.data or 'synthetic PromptCBLUE-like lengths'}\n"
    )
    print("| layout | padded share | largest batch (tokens) |")
    print("|---|---:|---:|")
    for layout, batch_list in by_layout.items():
        real = sum(real_tokens(b) for b in batch_list)
        total = sum(b["input_ids"].numel() for b in batch_list)
        largest = max(b["input_ids"].numel() for b in batch_list)
        print(f"| {layout} | {1 - real / total:.0%} | {largest:,} |")
    print("\n| adapter | layout | real tokens/s | vs PEFT LoRA none | vs own none | peak GiB |")
    print("|---|---|---:|---:|---:|---:|")
    for label in built:
        for layout in LAYOUTS:
            speed, peak = results[label, layout]
            own = speed / results[label, "none"][0]
            print(
                f"| {label} | {layout} | {speed:,.0f} | {speed / reference:.2f}x | "
                f"{own:.2f}x | {peak:.2f} |"
            )


if __name__ == "__main__":
    main()
