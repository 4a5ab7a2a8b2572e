"""Experiment trackers as a user runs them: one tiny `moelora train` reports to TensorBoard, to
a real MLflow tracking server (sqlite store, started here on 127.0.0.1) and to W&B offline, and
what MLflow serves and W&B's offline run holds is what the run directory holds: the config, the
loss by step, the final scores, report.md, metrics.json and the figures. A run that stopped on
an error or a signal is not shown as finished; a misspelt tracker, a missing package or a server
out of reach stops with one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from moelora.errors import RunStopped
from moelora.train.trackers import MLflow, WandB
from tests.conftest import TINY_SHAPE
from tests.test_config import in_process

TRACKED = [
    "+experiment=demo",
    *TINY_SHAPE,
    "model.tiny.pretrain_steps=0",
    "method=moelora",  # a gate, so the run draws routing.png too
    "method.num_experts=2",
    "data.max_eval_samples_per_task=2",
    "eval.before=false",
    "eval.max_new_tokens=4",
    "trainer.max_steps=6",
    "trainer.log_every=2",
    "trainer.batch_size=4",
    "trainer.log_with=[tensorboard,mlflow,wandb]",
]
EXPERIMENT = "moelora-tests"  # the MLflow experiment and the W&B project
# What the run hands its trackers: its config, report, metrics and figures.
HANDED_OVER = {"config.yaml", "report.md", "metrics.json", "curves.png", "routing.png"}
EXTRA = "optional extra: pip install -e '.[trackers]'"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(run directory, MLflow server URL) of one finished run; the server lives until the
    module's tests are done."""
    pytest.importorskip("mlflow", reason=EXTRA)
    pytest.importorskip("wandb", reason=EXTRA)
    root = tmp_path_factory.mktemp("trackers")
    with mlflow_server(root / "server") as url:
        run_dir = root / "run"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            "WANDB_MODE": "offline",
            "WANDB_PROJECT": EXPERIMENT,
            **{f"WANDB_{name}_DIR": str(root / name.lower()) for name in ("CACHE", "CONFIG")},
        }
        env.pop("WANDB_DIR", None)
        command = [sys.executable, "-m", "moelora", "train", *TRACKED, f"run_dir={run_dir}"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield run_dir, url


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on a free local port with a sqlite store in `folder`; stopped with its
    workers (its own process group) at the end."""
    folder.mkdir()
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job workers
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(server, url, folder / "server.log")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)  # a worker that outlived the server
            log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(server: subprocess.Popen, url: str, log: Path, seconds: float = 180) -> None:
    deadline, health = time.monotonic() + seconds, f"{url}/health"
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.25)
    raise AssertionError(f"mlflow server not up after {seconds} s: {log.read_text()[-3000:]}")


def config_scalars(run_dir: Path) -> dict:
    """config.yaml's scalar settings by their dotted key (what the trackers get as params)."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, int | float | str | bool):
                flat[f"{prefix}{key}"] = value

    walk(yaml.safe_load((run_dir / "config.yaml").read_text()), "")
    return flat


def history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").open()]
    return [(row["step"], row[key]) for row in rows if key in row]


@pytest.mark.slow
def test_mlflow_server_holds_params_metrics_and_artifacts(tracked_run, tmp_path) -> None:
    from mlflow import MlflowClient

    run_dir, url = tracked_run
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"moelora {run_dir.parent.name}/{run_dir.name}"
    assert run.data.params == {key: str(value) for key, value in config_scalars(run_dir).items()}
    for key in ("train/loss", "train/lr"):
        logged = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in logged] == history(run_dir, key), key
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = run.data.metrics
    assert final["after/overall"] == metrics["after"]["overall"]
    assert final["info/final_eval_loss"] == metrics["info"]["final_eval_loss"]
    assert final["after/per_task/DEMO-NER"] == metrics["after"]["per_task"]["DEMO-NER"]
    names = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert names == HANDED_OVER
    for name in names:
        copy = client.download_artifacts(run.info.run_id, name, str(tmp_path))
        assert Path(copy).read_bytes() == (run_dir / name).read_bytes(), name


@pytest.mark.slow
def test_wandb_offline_run_holds_config_history_and_files(tracked_run) -> None:
    run_dir, _ = tracked_run
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    records = wandb_records(log)
    (started,) = (r["run"] for r in records if r["type"] == "run")
    assert started["project"] == EXPERIMENT
    assert started["display_name"] == f"moelora {run_dir.parent.name}/{run_dir.name}"
    config: dict = {}
    for record in records:
        if record["type"] == "config":
            config |= record["config"]["update"]
    assert config == config_scalars(run_dir)
    rows = [r["history"]["item"] | {"_step": r["history"]["step"]["num"]} for r in records
            if r["type"] == "history"]  # fmt: skip
    for key in ("train/loss", "train/lr"):
        assert [(row["_step"], row[key]) for row in rows if key in row] == history(run_dir, key)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert rows[-1]["after/overall"] == metrics["after"]["overall"]
    assert rows[-1]["_step"] == metrics["info"]["steps"]
    saved = {f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]}
    assert {f"moelora/{name}" for name in HANDED_OVER} <= saved
    for name in HANDED_OVER:
        copy = folder / "files" / "moelora" / name
        assert copy.read_bytes() == (run_dir / name).read_bytes(), name
    assert list((run_dir / "train").rglob("events.out.tfevents.*")), "no TensorBoard log"


def wandb_records(log: Path) -> list[dict]:
    """The records of a W&B run's transaction log (run-*.wandb), read by wandb's own reader."""
    inspect = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)]
    result = subprocess.run(inspect, capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# How training ended (the exception leaving the recipe) -> MLflow status, W&B exit code.
ENDINGS = [
    (None, "FINISHED", 0),
    (RunStopped("SIGTERM at step 5", 143), "KILLED", 143),
    (ValueError("a bug"), "FAILED", 1),
]


@pytest.mark.slow
def test_tracker_runs_end_as_training_did(tmp_path, monkeypatch) -> None:
    """The trackers close in the recipe's `finally`: a run that stopped on an error or a
    signal must not show as finished."""
    pytest.importorskip("mlflow", reason=EXTRA)
    pytest.importorskip("wandb", reason=EXTRA)
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's local artifacts
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("CACHE", "CONFIG"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / name.lower()))
    for index, (error, _, _) in enumerate(ENDINGS):
        trackers = [MLflow("endings", run_name=str(index)), WandB("endings", name=str(index))]
        for tracker in trackers:
            tracker.start()
        with contextlib.suppress(Exception):
            try:
                if error is not None:
                    raise error
            finally:
                for tracker in trackers:
                    tracker.finish()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("endings").experiment_id])
    assert {run.info.run_name: run.info.status for run in runs} == {
        str(index): status for index, (_, status, _) in enumerate(ENDINGS)
    }
    codes = {}
    for log in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        records = wandb_records(log)
        (started,) = (r["run"] for r in records if r["type"] == "run")
        (ended,) = (r["exit"] for r in records if r["type"] == "exit")
        codes[started["display_name"]] = ended.get("exit_code", 0)
    assert codes == {str(index): code for index, (_, _, code) in enumerate(ENDINGS)}


def test_misspelt_tracker_names_the_choices(capsys, tmp_path) -> None:
    result = in_process(
        capsys, "train", "+experiment=demo", "trainer.log_with=[mlfow]", f"run_dir={tmp_path}/r"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "moelora train: error: trainer.log_with='mlfow' is unknown; use one of tensorboard, "
        "mlflow, wandb, none."
    ]


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_tracker_package_names_the_extra(tracker, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # import (and find_spec) now find nothing
    result = in_process(
        capsys, "train", "+experiment=demo", f"trainer.log_with=[{tracker}]",
        f"run_dir={tmp_path}/r",
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"moelora train: error: trainer.log_with has {tracker}, but the {tracker} package is not "
        f'installed; install the extra with `pip install "moelora[trackers]"` (in a checkout: '
        f'`pip install -e ".[trackers]"`).'
    )
    assert not (tmp_path / "r" / "config.yaml").exists()  # stopped before the run started


def test_unreachable_mlflow_server_stops_with_one_line(capsys, tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason=EXTRA)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = in_process(
        capsys, "train", "+experiment=demo", *TINY_SHAPE, "model.tiny.pretrain_steps=0",
        "trainer.log_with=[tensorboard,mlflow]", f"run_dir={tmp_path}/r",
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "moelora train: error: trainer.log_with has mlflow, but MLflow could not start the run ("
    )
    assert "Connection refused" in line
    assert line.endswith(f"check MLFLOW_TRACKING_URI ({url}) and that the server is up.")
