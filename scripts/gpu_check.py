"""One command for the GPU tables BENCHMARKS.md lacks, written to one markdown file.

    python scripts/gpu_check.py --out gpu_check.md        # one GPU: every table, within 8 min
    python scripts/gpu_check.py --mode tiny --out t.md    # no GPU: the same steps, tiny sizes

Each step runs one of the bench scripts beside this one with its own time limit, inside one
budget for the whole check; a step that fails or runs out of time writes its error into the
markdown and the check goes on with the next. The file is rewritten after every step, so a check
stopped early keeps what it measured; each step's full stderr goes to the .log file beside it.
The tiny mode (the default without a GPU) shows the steps run before a GPU is lent; its numbers
say nothing about speed. How to run it on the device machine: BENCHMARKS.md, "GPU check".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from mfu import peak_tflops
from process_tree import Finished, run_limited

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
# What decides the speeds, and what the GPU image lacks or may hold in another version.
PACKAGES = (
    *("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes"),
    *("datasets", "hydra-core", "huggingface-hub", "pyarrow", "fsspec"),
)
HARDWARE = ("--presets", "gpu", "zero2", "zero3", "qlora_4bit")


@dataclass(frozen=True)
class Step:
    title: str
    script: str
    args: tuple[str, ...]
    limit: float  # seconds at most, within what is left of the budget


# Cheap tables first, then the hardware presets (a process per preset); what the budget cannot
# fit is skipped with a line saying so. Limits: about twice the expected time on an H100.
GPU_STEPS = (
    Step(
        "Adapter training step, Qwen2.5-0.5B shape",
        "bench_adapters.py",
        ("--shape", "0.5b", "--batch", "8", "--seq", "512", "--steps", "12", "--rounds", "4"),
        75,
    ),
    Step(
        "Packing, Qwen2.5-0.5B shape",
        "bench_packing.py",
        ("--shape", "0.5b", "--batch", "8", "--batches", "4"),  # 16 rows: ~30 GiB in logits
        75,
    ),
    Step(
        "Decoding, Qwen2.5-0.5B shape",
        "bench_decoding.py",
        ("--shape", "0.5b", "--new-tokens", "24", "--rounds", "2"),
        90,
    ),
    Step(
        "Routed experts, one Linear of Qwen2.5-1.5B's width",
        "bench_routed.py",
        ("--dim", "1536", "--tokens", "8192", "--rounds", "3"),
        45,
    ),
    Step(
        "Hardware presets, Qwen2.5-0.5B shape",
        "bench_hardware.py",
        ("--size", "0.5b", *HARDWARE, "--steps", "30", "--timeout", "70"),
        150,
    ),
    Step(
        "Hardware presets, Qwen2.5-1.5B shape",
        "bench_hardware.py",
        ("--size", "1.5b", *HARDWARE, "--steps", "30", "--timeout", "80"),
        180,
    ),
    Step(
        "Adapter training step, Qwen2.5-1.5B shape",
        "bench_adapters.py",
        ("--shape", "1.5b", "--batch", "8", "--seq", "512", "--steps", "8", "--rounds", "2"),
        75,
    ),
)

# The same steps at tiny sizes on the CPU (fp32), each bench once (the 1.5B steps repeat the
# 0.5B ones); DeepSpeed presets are left to tests/test_distributed.py (a launch costs ~20 s).
_TINY_MODEL = ("--hidden", "64", "--layers", "2")
TINY_STEPS = (
    Step(
        "Adapter training step",
        "bench_adapters.py",
        (*_TINY_MODEL, "--batch", "2", "--seq", "32", "--steps", "2", "--rounds", "1"),
        150,
    ),
    Step(
        "Packing",
        "bench_packing.py",
        ("--shape", "micro", "--batches", "2", "--batch", "4", "--pack-length", "96"),
        150,
    ),
    Step(
        "Decoding",
        "bench_decoding.py",
        (*_TINY_MODEL, "--prompts", "8", "--batch", "2", "--new-tokens", "4", "--rounds", "1"),
        150,
    ),
    Step(
        "Routed experts, one Linear",
        "bench_routed.py",
        ("--dim", "64", "--tokens", "64", "--experts", "4", "--top-k", "2", "--ranks", "4"),
        150,
    ),
    Step(
        "Hardware presets",
        "bench_hardware.py",
        ("--size", "tiny", "--presets", "gpu", "qlora_4bit", "--steps", "6"),
        150,
    ),
)
STEPS = {"gpu": GPU_STEPS, "tiny": TINY_STEPS}
BUDGET = {"gpu": 450.0, "tiny": 180.0}  # seconds for the steps; start-up comes on top


@dataclass
class Outcome:
    step: Step
    status: str  # ok, failed, time limit, skipped
    seconds: float = 0.0
    table: str = ""  # what the bench printed on stdout
    error: str = ""  # the error line
    tail: str = ""  # the end of stderr, for a failed step


def child_env(mode: str) -> dict[str, str]:
    """The benches import moelora from this checkout (no install needed) and never reach for
    the hub (the GPU machine has no network); output unbuffered, so a stopped step keeps it.
    Tiny models on a CPU run one thread: two threads on a busy machine took 5x as long."""
    env = dict(os.environ)
    if mode == "tiny":
        env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def bench_output(stdout: str) -> str:
    """What a bench printed from its first blank line on (its description, then its table);
    a library's log lines before it are dropped."""
    lines = stdout.splitlines()
    return "\n".join(lines[lines.index("") :] if "" in lines else lines).strip()


def error_line(finished: Finished) -> str:
    """The last line that reads like an error, else the last line printed."""
    lines = [line.strip() for line in finished.stderr.splitlines() if line.strip()]
    marked = [line for line in lines if "Error" in line or "error:" in line]
    return (marked or lines or ["(no output)"])[-1][:300]


def run_step(step: Step, left: float, mode: str, log) -> Outcome:
    """Run one bench for at most its limit or what is left of the budget."""
    if left < 15:
        return Outcome(step, "skipped", error=f"the check's budget ran out ({left:.0f} s left)")
    command = [sys.executable, str(SCRIPTS / step.script), *step.args]
    finished = run_limited(command, min(step.limit, left), cwd=REPO, env=child_env(mode))
    log.write(f"\n===== {step.title}: {' '.join(command)}\n{finished.stderr}\n")
    log.flush()
    outcome = Outcome(step, "ok", finished.seconds, bench_output(finished.stdout))
    if finished.returncode is None:
        outcome.status = "time limit"
        last = finished.stderr.strip().splitlines()[-1:] or ["(none)"]
        outcome.error = f"stopped after {finished.seconds:.0f} s; last stderr line: {last[0][:200]}"
    elif finished.returncode != 0:
        outcome.status, outcome.error = "failed", error_line(finished)
    if outcome.status != "ok":
        outcome.tail = "\n".join(finished.stderr.rstrip().splitlines()[-25:])
    return outcome


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def device_line() -> str:
    if not torch.cuda.is_available():
        return "CPU (no GPU)"
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name)
    where = f"{peak:.0f} TFLOP/s dense bf16 peak" if peak else "not in mfu.py's peak table"
    return f"{name} ({where})"


def header(mode: str, budget: float) -> list[str]:
    what = {
        "gpu": "gpu (the tables BENCHMARKS.md lacks)",
        "tiny": "tiny (CPU, tiny sizes: shows that every step runs; its numbers are no speed)",
    }[mode]
    return [
        "# GPU check (`scripts/gpu_check.py`)",
        "",
        f"- mode: {what}",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {device_line()}",
        f"- {versions()}",
        f"- budget: {budget:.0f} s for the steps",
    ]


def render(head: list[str], steps: tuple[Step, ...], outcomes: list[Outcome], took: float) -> str:
    """The markdown: the header, then a section per step (those not run yet say so)."""
    statuses = ("ok", "failed", "time limit", "skipped")
    counts = {s: sum(o.status == s for o in outcomes) for s in statuses}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    lines = [*head, f"- took: {took:.0f} s; steps: {summary}, {len(steps)} in all", ""]
    for index, step in enumerate(steps):
        command = " ".join(["python", f"scripts/{step.script}", *step.args])
        lines += [f"## {index + 1}. {step.title}", "", f"`{command}`", ""]
        if index >= len(outcomes):
            lines += ["(not run yet)", ""]
            continue
        outcome = outcomes[index]
        lines += [f"{outcome.status}, {outcome.seconds:.0f} s", ""]
        if outcome.table:
            lines += [outcome.table, ""]
        if outcome.error:
            lines += [f"**{outcome.status}**: {outcome.error}", ""]
        if outcome.tail:
            lines += ["<details><summary>end of stderr</summary>", "", "```"]
            lines += [outcome.tail, "```", "", "</details>", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["auto", "gpu", "tiny"], default="auto")
    parser.add_argument("--out", default="gpu_check.md", help="the markdown file (and its .log)")
    parser.add_argument("--budget", type=float, help="seconds for all steps (gpu 450, tiny 180)")
    args = parser.parse_args(argv)
    mode = args.mode if args.mode != "auto" else "gpu" if torch.cuda.is_available() else "tiny"
    if mode == "gpu" and not torch.cuda.is_available():
        parser.error("--mode gpu needs a GPU and torch sees none; --mode tiny runs on a CPU")
    budget, steps, out = args.budget or BUDGET[mode], STEPS[mode], Path(args.out)
    head, outcomes, start = header(mode, budget), [], time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(head, steps, outcomes, 0.0))
    with open(out.with_suffix(".log"), "w", encoding="utf-8") as log:
        for index, step in enumerate(steps):
            took = time.perf_counter() - start
            print(f"[{took:4.0f} s] {index + 1}/{len(steps)} {step.title} ...", flush=True)
            outcome = run_step(step, budget - took, mode, log)
            outcomes.append(outcome)
            note = f": {outcome.error}" if outcome.error else ""
            print(f"         {outcome.status}, {outcome.seconds:.0f} s{note}", flush=True)
            out.write_text(render(head, steps, outcomes, time.perf_counter() - start))
    print(f"[{time.perf_counter() - start:4.0f} s] wrote {out}", flush=True)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
