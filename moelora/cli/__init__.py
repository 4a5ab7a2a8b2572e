"""`moelora <command> [hydra overrides]`: dispatch to the Hydra application of that command.

Each command is an ordinary Hydra app, so overrides, `-m` sweeps, `--help`, `--cfg job` and
`hydra.run.dir=...` all work as in any Hydra program.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from moelora.cli.errors import config_error, one_line_errors
from moelora.cli.run_dir import pin_output_dir
from moelora.cli.search import search_overrides
from moelora.config import register_configs
from moelora.paths import CONFIG_DIR

USAGE = """usage: moelora <command> [overrides...]

commands:
  train    fine-tune with a method on a data mixture, then evaluate  (configs/train.yaml)
  eval     score a run, a base model, or a predictions file          (configs/eval.yaml)
  predict  a run's answers for rows without targets, or for one prompt (configs/predict.yaml)
  export   write a PEFT LoRA adapter or a merged model for one task  (configs/export.yaml)
  compare  summarise finished runs or a sweep: mean ± std over seeds (summary.md/.csv/.png)

examples:
  moelora train +experiment=demo
  moelora train +experiment=demo method=moelora trainer.lr=1e-3
  moelora train -m +experiment=demo method=lora,moelora trainer.seed=0,1,2
  moelora train -m hydra/sweeper=optuna +experiment=demo method=moelora   (a search)
  moelora compare multirun/2026-11-23/10-00-00
  moelora eval run_dir=outputs/2026-11-23/10-00-00
  moelora predict run_dir=outputs/2026-11-23/10-00-00 data.eval_files=[test.json]
  moelora train --help            (config groups and the composed config)
"""


def _run_train(cfg: DictConfig) -> float | None:
    """Train; return the validation overall, a search's objective (moelora/cli/search.py)."""
    from moelora.cli.search import check_trial, objective
    from moelora.train.recipe import train

    check_trial(cfg)
    return objective(train(cfg))


def _run_eval(cfg: DictConfig) -> None:
    from moelora.evaluate.command import evaluate_command

    evaluate_command(cfg)


def _run_predict(cfg: DictConfig) -> None:
    from moelora.evaluate.predict import predict_command

    predict_command(cfg)


def _run_compare(argv: list[str]) -> None:
    from moelora.analysis.compare import compare_command

    with one_line_errors("compare"):
        compare_command(argv)


def _run_export(cfg: DictConfig) -> None:
    from moelora.export import export_command

    export_command(cfg)


COMMANDS: dict[str, Callable[[DictConfig], float | None]] = {
    "train": _run_train,
    "eval": _run_eval,
    "predict": _run_predict,
    "export": _run_export,
}


def _hydra_app(command: str) -> Callable[[], float | None]:
    """Wrap one command as a Hydra app whose user errors print one line instead of a traceback;
    what the command returns is the job's return value (a sweeper's objective)."""

    @hydra.main(config_path=str(CONFIG_DIR), config_name=command, version_base="1.3")
    def app(cfg: DictConfig) -> float | None:
        _quiet_libraries()
        with one_line_errors(command):
            value = COMMANDS[command](cfg)
            _end_processes()
        return value

    return app


def _end_processes() -> None:
    """Under a distributed launch every rank waits for the others, then the process group is
    destroyed: a rank that exits with it alive aborts now and then ("terminate called without an
    active exception"). Training ends its group itself; eval and predict end here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _quiet_libraries() -> None:
    """The console shows our lines and progress bars: accelerate's per-checkpoint INFO lines
    and the tokenizer's note on long inputs (our length policy reports those) stay in the log."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    # bitsandbytes' optional CPU kernels package is not needed: its absence is not our news.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.device_count() > 0


def _drop_local_rank(argv: list[str]) -> list[str]:
    """`deepspeed` (without --no_local_rank) passes --local_rank=N; LOCAL_RANK in the
    environment says the same, and Hydra would reject the flag."""
    return [a for a in argv if not a.startswith("--local_rank=")]


def main(argv: list[str] | None = None) -> None:
    argv = _drop_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return
    command, overrides = argv[0], argv[1:]
    if command == "compare":  # paths, not overrides: an ordinary command line
        _run_compare(overrides)
        return
    if not _has_gpu():  # DeepSpeed would probe for one and warn that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if command not in COMMANDS:
        print(f"moelora: unknown command '{command}'.\n\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    register_configs()
    if command == "train":
        with one_line_errors(command):
            overrides = search_overrides(overrides)
    overrides, locked = pin_output_dir(command, overrides)
    sys.argv = [f"moelora-{command}", *overrides]
    try:
        _run_app(command)
    finally:
        if locked is not None:
            from moelora import run_lock

            run_lock.release(locked)


def _run_app(command: str) -> None:
    """The command's Hydra app; composition errors become one line (unless HYDRA_FULL_ERROR)."""
    if "HYDRA_FULL_ERROR" in os.environ:  # the user asked for Hydra's own report
        try:
            _hydra_app(command)()
        finally:
            _forget_hydra()
        return
    from hydra.errors import HydraException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing and exiting
    try:
        _hydra_app(command)()
    except HydraException as err:
        print(f"moelora {command}: error: {config_error(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
        _forget_hydra()


def _forget_hydra() -> None:
    """Leave no Hydra state behind, so that `main` can run again in the same process (tests,
    notebooks) and library calls after it do not think they run inside a Hydra job."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()


if __name__ == "__main__":
    main()
