"""`moelora <command> [hydra overrides]`: dispatch to the Hydra application of that command.

Each command is an ordinary Hydra app, so overrides, `-m` sweeps, `--help`, `--cfg job` and
`hydra.run.dir=...` all work as in any Hydra program.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator

import hydra
from omegaconf import DictConfig

from moelora.config import register_configs
from moelora.errors import RunStopped, UserError
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
  moelora compare multirun/2026-11-23/10-00-00
  moelora eval run_dir=outputs/2026-11-23/10-00-00
  moelora predict run_dir=outputs/2026-11-23/10-00-00 data.eval_files=[test.json]
  moelora train --help            (config groups and the composed config)
"""


def _run_train(cfg: DictConfig) -> None:
    from moelora.train.recipe import train

    train(cfg)


def _run_eval(cfg: DictConfig) -> None:
    from moelora.evaluate.command import evaluate_command

    evaluate_command(cfg)


def _run_predict(cfg: DictConfig) -> None:
    from moelora.evaluate.predict import predict_command

    predict_command(cfg)


def _run_compare(argv: list[str]) -> None:
    from moelora.analysis.compare import compare_command

    with _one_line_errors("compare"):
        compare_command(argv)


@contextlib.contextmanager
def _one_line_errors(command: str) -> Iterator[None]:
    """A user's mistake (exit 2), a run stopped on purpose or by a failed write (its own exit
    code) or an unforeseen file error (exit 2) ends the command with one line on standard
    error, not a traceback."""
    try:
        yield
    except UserError as err:
        print(f"moelora {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunStopped as stop:
        print(f"moelora {command}: stopped: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except OSError as err:  # a file fault no check foresaw: still one line, naming the file
        from moelora.atomic import error_words

        where = f"{err.filename}: " if err.filename else ""
        print(
            f"moelora {command}: error: {where}{error_words(err)}; check that path, its "
            f"permissions and the free space under it.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _run_export(cfg: DictConfig) -> None:
    from moelora.export import export_command

    export_command(cfg)


COMMANDS: dict[str, Callable[[DictConfig], None]] = {
    "train": _run_train,
    "eval": _run_eval,
    "predict": _run_predict,
    "export": _run_export,
}


def _hydra_app(command: str) -> Callable[[], None]:
    """Wrap one command as a Hydra app whose user errors print one line instead of a traceback."""

    @hydra.main(config_path=str(CONFIG_DIR), config_name=command, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        _quiet_libraries()
        with _one_line_errors(command):
            COMMANDS[command](cfg)
            _end_processes()

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


# The key that names where a command writes; it also becomes Hydra's output dir.
OUTPUT_KEYS = {"train": "run_dir", "eval": "output_dir", "predict": "output_dir"}


def _translate(command: str, overrides: list[str]) -> tuple[list[str], str | None]:
    """`run_dir=X` on `train` (`output_dir=X` on `eval` and `predict`) also moves Hydra's output
    dir there, so resuming is one override. Before Hydra writes into it, a training folder is
    checked (`moelora.resume.plan_run`) and locked; returns the overrides and the locked folder.
    A finished run under trainer.resume=auto ends the command here, with status 0."""
    key = OUTPUT_KEYS.get(command)
    if key is None:
        return overrides, None
    folders = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    if not folders and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each rank would resolve Hydra's ${now:...} run dir on its own and write elsewhere.
        print(
            f"moelora {command}: error: under a distributed launch pass {key}=<folder> so every "
            f"process writes to the same directory.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if not folders:
        return overrides, None
    from moelora import run_lock
    from moelora.resume import plan_run
    from moelora.rundir import guard_eval_output

    folder = folders[-1]
    overrides = [f"hydra.run.dir={folder}", *overrides]  # before any --flag argparse reads
    with _one_line_errors(command):
        if command != "train":
            guard_eval_output(folder)
            return overrides, None
        run_lock.acquire(folder)  # first: a folder in use is refused for that reason
        try:
            resume = _resume_setting(overrides)
            # An unknown value is left to the config's own check, which names it.
            plan = plan_run(folder, resume) if resume in (True, False, "auto") else None
        except BaseException:
            run_lock.release(folder)
            raise
        if plan is not None and plan.action == "finished":
            run_lock.release(folder)
            print(f"moelora train: run_dir={folder} has finished already; nothing to do.")
            raise SystemExit(0)
    return overrides, folder


def _resume_setting(overrides: list[str]) -> bool | str:
    """trainer.resume as the command composes it (a config file may set it too); read from the
    overrides when they do not compose on their own (a sweep's lists: Hydra reports those)."""
    from hydra import compose, initialize_config_dir

    plain = [o for o in overrides if not o.startswith(("-", "hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=plain).trainer.resume
    except Exception:
        given = [o.split("=", 1)[1].lower() for o in plain if o.startswith("trainer.resume=")]
        value = given[-1] if given else "false"
        return "auto" if value == "auto" else value in {"true", "1", "yes"}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.device_count() > 0


def _drop_local_rank(argv: list[str]) -> list[str]:
    """`deepspeed` (without --no_local_rank) passes --local_rank=N; LOCAL_RANK in the
    environment says the same, and Hydra would reject the flag."""
    return [a for a in argv if not a.startswith("--local_rank=")]


def _config_error(err: Exception) -> str:
    """One line for Hydra's composition errors; a key the chosen schema lacks gets a sentence
    that names it, its owner (the method for `method.*`) and the fix."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    missing_key = isinstance(cause, ConfigKeyError | ConfigAttributeError)
    if missing_key and cause.full_key and cause.object_type is not None:
        return _unknown_key(cause.full_key, cause.object_type)
    text = str(err).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 2 and lines[1].endswith(":"):  # a heading over a list of options
        lines = [lines[0], f"{lines[1]} {', '.join(lines[2:])}"]
    if cause is not None:
        lines.append(str(cause).splitlines()[0])
    return "; ".join(lines)


def _unknown_key(full_key: str, owner: type) -> str:
    from dataclasses import fields

    from moelora.adapters.methods import METHOD_REGISTRY

    key = full_key.rsplit(".", 1)[-1]
    methods = {m.config_class: name for name, m in METHOD_REGISTRY.items()}
    if owner in methods:
        having = sorted(
            n for n, m in METHOD_REGISTRY.items() if key in m.config_class.__dataclass_fields__
        )
        fix = (
            f"choose a method that has it ({', '.join(having)})" if having else "check its spelling"
        )
        return f"{full_key} is not a setting of method {methods[owner]}; remove it or {fix}."
    own = ", ".join(f.name for f in fields(owner)) if hasattr(owner, "__dataclass_fields__") else ""
    return f"{full_key} is not a setting ({owner.__name__} has {own}); check its spelling."


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
    overrides, locked = _translate(command, overrides)
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
        print(f"moelora {command}: error: {_config_error(err)}", file=sys.stderr)
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
