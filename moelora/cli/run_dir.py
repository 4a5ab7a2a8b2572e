"""Where `train`, `eval` and `predict` write, settled before Hydra starts: the folder pinned as
Hydra's output dir, checked, and for training locked and planned (start, resume or done)."""

from __future__ import annotations

import os
import sys

from moelora.cli.errors import one_line_errors
from moelora.paths import CONFIG_DIR

# The key that names where a command writes; it also becomes Hydra's output dir.
OUTPUT_KEYS = {"train": "run_dir", "eval": "output_dir", "predict": "output_dir"}


def pin_output_dir(command: str, overrides: list[str]) -> tuple[list[str], str | None]:
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
    from moelora.rundir import guard_eval_output

    folder = folders[-1]
    overrides = [f"hydra.run.dir={folder}", *overrides]  # before any --flag argparse reads
    with one_line_errors(command):
        if command != "train":
            guard_eval_output(folder)
            return overrides, None
        _lock_and_plan(folder, overrides)
    return overrides, folder


def _lock_and_plan(folder: str, overrides: list[str]) -> None:
    """Lock the training folder, then ask `plan_run` about it: a folder in use, or one that
    cannot be resumed, stops here; a finished one ends the command with status 0."""
    from moelora import run_lock
    from moelora.resume import plan_run

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
