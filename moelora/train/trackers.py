"""The experiment trackers a run reports to (`trainer.log_with`), all through accelerate:
TensorBoard under the run directory, MLflow and Weights & Biases wherever their own environment
variables send them (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; WANDB_PROJECT, WANDB_MODE,
WANDB_DIR, WANDB_API_KEY), as the Hugging Face Trainer and LLaMA-Factory read them. A finished
run's config, report, metrics and figures follow as artifacts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker, WandBTracker

from moelora.config import TrainConfig
from moelora.errors import RunStopped, UserError
from moelora.resume import FINISHED_FILE

# Each tracker's package; mlflow and wandb come with the `trackers` extra.
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
# The MLflow experiment and W&B project unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT say.
DEFAULT_PROJECT = "moelora"
# What a finished run hands its trackers, besides the figures (*.png).
ARTIFACTS = ("config.yaml", "report.md", FINISHED_FILE)
WANDB_FOLDER = "moelora"  # where they go among a W&B run's files
# Parts of metrics.json that are no measurement of the run.
UNLOGGED = ("num_rows", "empty_targets")


def check_installed(log_with: list[str]) -> None:
    """Stop before anything loads on a tracker whose package is missing (accelerate would
    drop it without a word)."""
    for name in log_with:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise UserError(
                f"trainer.log_with has {name}, but the {package} package is not installed; "
                f'install the extra with `pip install "moelora[trackers]"` (in a checkout: '
                f'`pip install -e ".[trackers]"`).'
            )


def run_name(cfg: TrainConfig) -> str:
    """trainer.run_name, else the method and the run folder's last two parts (the date and time
    of a run, the time and job number of a sweep's)."""
    if cfg.trainer.run_name:
        return cfg.trainer.run_name
    folder = Path(cfg.run_dir).resolve()
    return f"{cfg.method.name} {folder.parent.name}/{folder.name}"


def make_trackers(cfg: TrainConfig) -> list[str | GeneralTracker]:
    """What `Accelerator(log_with=...)` gets: TensorBoard by name (accelerate writes it under
    the run directory), MLflow and W&B built here so that they carry the run's name and their
    project; W&B writes its files into the run directory unless WANDB_DIR says otherwise."""
    name = run_name(cfg)
    trackers: list[str | GeneralTracker] = []
    for tracker in dict.fromkeys(cfg.trainer.log_with):  # each once, in the order given
        if tracker == "mlflow":  # MLFLOW_EXPERIMENT_NAME wins over the name given here
            trackers.append(MLflow(DEFAULT_PROJECT, run_name=name))
        elif tracker == "wandb":
            project = os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT)
            where = {} if os.environ.get("WANDB_DIR") else {"dir": cfg.run_dir}
            trackers.append(WandB(project, name=name, **where))
        elif tracker != "none":
            trackers.append(tracker)
    return trackers


def init_trackers(accelerator: Accelerator, config: dict) -> None:
    """Start the trackers with the run's config ("train" names TensorBoard's folder in the run
    directory). One that cannot start (a server out of reach, W&B without a login) stops the
    run with one line, the others closed again."""
    try:
        accelerator.init_trackers("train", config=config)
    except Exception as err:
        for tracker in accelerator.trackers:
            with contextlib.suppress(Exception):  # the one that failed has nothing to close
                tracker.finish()
        raise UserError(_start_failure(err)) from err


def _start_failure(err: Exception) -> str:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    package = type(err).__module__.split(".")[0]
    if package == "mlflow":
        return (
            f"trainer.log_with has mlflow, but MLflow could not start the run ({reason}); check "
            f"MLFLOW_TRACKING_URI ({os.environ.get('MLFLOW_TRACKING_URI', 'unset')}) and that "
            f"the server is up."
        )
    if package == "wandb":
        return (
            f"trainer.log_with has wandb, but W&B could not start the run ({reason}); log in "
            f"(WANDB_API_KEY) or set WANDB_MODE=offline."
        )
    return f"trainer.log_with: a tracker could not start ({reason})."


class MLflow(MLflowTracker):
    """accelerate's MLflow tracker, whose run ends FAILED after an error (KILLED after a stop
    signal) instead of FINISHED."""

    def finish(self) -> None:
        import mlflow

        mlflow.end_run(status=_ending()[0])


class WandB(WandBTracker):
    """accelerate's W&B tracker, whose run ends with the process's exit code (failed or
    killed in W&B) after an error or a stop signal."""

    def finish(self) -> None:
        self.run.finish(exit_code=_ending()[1])


def _ending() -> tuple[str, int]:
    """(MLflow status, exit code) of the run the trackers close: the recipe closes them in a
    `finally`, where the exception on its way out, if any, is the one being handled."""
    error = sys.exc_info()[1]
    if error is None:
        return "FINISHED", 0
    if isinstance(error, KeyboardInterrupt):
        return "KILLED", 130
    code = error.exit_code if isinstance(error, RunStopped) else 1
    return ("KILLED" if code > 128 else "FAILED"), code  # 128 + N: stopped by signal N


def report_to_trackers(accelerator: Accelerator, run_dir: Path) -> None:
    """Once report.md and metrics.json are written (main process: the others hold no tracker):
    metrics.json's numbers at the last step, so runs compare by score in MLflow and W&B; then
    config.yaml, report.md, metrics.json and the figures go to the top of MLflow's artifacts and
    to `moelora/` in the W&B run's files (uploaded with it, or by `wandb sync` offline)."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    metrics = json.loads((run_dir / FINISHED_FILE).read_text(encoding="utf-8"))
    accelerator.log(final_numbers(metrics), step=metrics["info"]["steps"])
    files = [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]
    files += sorted(run_dir.glob("*.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "mlflow":
            for path in files:
                tracker.log_artifact(str(path))
        elif tracker.name == "wandb":
            _save_in_wandb_run(tracker.tracker, files)


def final_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """metrics.json's numbers by their path ("after/overall", "after/per_task/NER",
    "info/final_eval_loss"), without the row counts."""
    numbers: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and key not in UNLOGGED:
            numbers |= final_numbers(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


def _save_in_wandb_run(run, files: list[Path]) -> None:
    """Copies under `moelora/` in the run's own folder: W&B keeps a config.yaml of its own
    there, and wandb.save would only link to the run directory (an offline run synced after
    the run directory moved would lose them)."""
    folder = Path(run.dir) / WANDB_FOLDER
    folder.mkdir(exist_ok=True)
    for path in files:
        shutil.copyfile(path, folder / path.name)
        run.save(str(folder / path.name), base_path=run.dir, policy="now")
