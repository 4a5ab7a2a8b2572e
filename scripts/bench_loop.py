"""Benchmark: what `moelora train`'s loop costs on top of a bare training loop.

In one process: `train()` on a composed config (`+experiment=demo` plus the overrides given),
with evaluation and checkpoints off, and a bare loop (forward, backward, AdamW step) over the
same model build and the same batches. Each reports steady-state tokens/s, measured from step
`--skip` to the step before the last. Prints a markdown table.

    python scripts/bench_loop.py                                  # the demo shape, lora
    python scripts/bench_loop.py --shape mid method=moelora       # hidden 512, 8 layers
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from moelora.config import load_config, register_configs
from moelora.data.batching import loss_loader
from moelora.paths import CONFIG_DIR
from moelora.train import loop, recipe
from moelora.train.setup import setup_run

SHAPES = {
    "demo": [],
    "mid": [
        "model.tiny.hidden_size=512",
        "model.tiny.intermediate_size=1024",
        "model.tiny.num_layers=8",
        "model.tiny.num_heads=8",
        "model.tiny.pretrain_steps=0",  # random weights: only the speed matters here
        "trainer.batch_size=8",
    ],
}


def config(args: argparse.Namespace, run_dir: Path):
    overrides = [
        "+experiment=demo",
        *SHAPES[args.shape],
        f"trainer.max_steps={args.steps}",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "eval.enabled=false",
        f"run_dir={run_dir}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def steady(times: list[float], tokens: list[int], skip: int) -> float:
    """Tokens/s from the end of step `skip` to the end of the second-to-last step."""
    return sum(tokens[skip + 1 : -1]) / (times[-2] - times[skip])


def moelora_train(args: argparse.Namespace, run_dir: Path) -> float:
    """`train()` with a clock on each step: tokens from its forward_backward, time after
    `_after_step` (logging included)."""
    times, tokens = [], []
    forward_backward, after_step = loop.forward_backward, loop._after_step

    def counted(*a, **k):
        result = forward_backward(*a, **k)
        tokens.append(result.tokens)
        return result

    def clocked(*a, **k):
        saved = after_step(*a, **k)
        times.append(time.perf_counter())
        return saved

    loop.forward_backward, loop._after_step = counted, clocked
    try:
        recipe.train(config(args, run_dir))
    finally:
        loop.forward_backward, loop._after_step = forward_backward, after_step
    return steady(times, tokens, args.skip)


def bare_loop(args: argparse.Namespace, run_dir: Path) -> float:
    """The same model build and batches, trained by forward, backward and an AdamW step."""
    raw = config(args, run_dir)
    cfg = load_config(raw)
    run = setup_run(cfg, raw, resuming=False)
    model, t = run.model.train(), cfg.trainer
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=t.lr)
    loader = loss_loader(
        run.data.train,
        t.batch_size,
        model.base_model.config.pad_token_id or 0,
        cfg.data,
        sampler=run.sampler,
        generator=torch.Generator().manual_seed(t.seed),
    )
    device = run.accelerator.device
    times, tokens = [], []
    while len(times) < args.steps:
        for batch in loader:
            tokens.append(int(batch["attention_mask"].sum()))
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter())
            if len(times) == args.steps:
                break
    run.accelerator.end_training()
    return steady(times, tokens, args.skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps not measured")
    parser.add_argument("overrides", nargs="*", help="more config overrides, e.g. method=moelora")
    args = parser.parse_args()
    register_configs()
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_loop(args, Path(tmp) / "bare")
        ours = moelora_train(args, Path(tmp) / "train")
        bare_again = bare_loop(args, Path(tmp) / "bare_again")
    bare = (bare + bare_again) / 2
    label = " ".join([args.shape, *args.overrides])
    print(f"\n{label}: {args.steps} steps, tokens/s from step {args.skip} on\n")
    print("| loop | tokens/s | vs bare loop |")
    print("|---|---:|---:|")
    print(f"| bare (forward, backward, AdamW step; mean of two runs) | {bare:,.0f} | 1.00x |")
    print(f"| moelora train | {ours:,.0f} | {ours / bare:.2f}x |")


if __name__ == "__main__":
    main()
