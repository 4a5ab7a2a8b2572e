"""What clusters do to a run: a stop signal mid-run (a checkpoint, then a resume equal to the
uninterrupted run), non-finite steps (skipped; too many stop the run with its checkpoint intact),
a checkpoint write that fails half-way (the previous one stays the newest), trainer.resume=auto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelora.adapters.model import AdaptedModel
from moelora.errors import RunStopped
from moelora.train.recipe import train
from tests.conftest import REPO, compose_config
from tests.test_train import SMALL

STEPS = 150
COMMON = [
    *SMALL,
    "method=molora",  # routed experts with an aux loss: the window keeps two series
    "method.num_experts=2",
    "method.top_k=1",
    "method.rank_per_expert=4",
    f"trainer.max_steps={STEPS}",
    "trainer.log_every=2",
    "eval.enabled=false",
]


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_identical_runs(got: Path, expected: Path) -> None:
    """Bitwise: the same losses logged at the same steps, the same adapter tensors."""
    assert history(got) == history(expected)
    a, b = adapter(got), adapter(expected)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "moelora", "train", *overrides, f"run_dir={run_dir}"]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_logged_steps(process: subprocess.Popen, run_dir: Path, lines: int) -> None:
    """Until the run has logged `lines` lines of history (it is training by then)."""
    deadline = time.monotonic() + 300
    path = run_dir / "history.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= lines):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run logged nothing in 5 minutes"
        time.sleep(0.05)


def test_sigterm_mid_run_checkpoints_and_resume_equals_the_uninterrupted_run(tmp_path) -> None:
    interrupted = tmp_path / "interrupted"
    process = start(interrupted, *COMMON)
    wait_for_logged_steps(process, interrupted, 5)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err.decode()[-3000:]
    message = err.decode().strip().splitlines()[-1]
    assert message.startswith("moelora train: stopped: SIGTERM at step ")
    assert "trainer.resume=true" in message and "Traceback" not in err.decode()
    (checkpoint,) = (interrupted / "checkpoints").iterdir()
    assert 10 <= int(checkpoint.name.split("-")[1]) < STEPS
    assert not (interrupted / "adapter").exists()

    resumed = train(compose_config("train", [*COMMON, "trainer.resume=auto"], interrupted))
    reference = tmp_path / "reference"
    expected = train(compose_config("train", COMMON, reference))
    assert resumed["info"]["steps"] == expected["info"]["steps"] == STEPS
    assert resumed["info"]["train_loss_first"] == expected["info"]["train_loss_first"]
    assert_identical_runs(interrupted, reference)

    # auto on a finished run: nothing is trained or written again.
    stamp = (interrupted / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    again = train(compose_config("train", [*COMMON, "trainer.resume=auto"], interrupted))
    assert again["info"] == resumed["info"]
    assert (interrupted / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_resume_auto_starts_a_run_without_checkpoints(tmp_path) -> None:
    metrics = train(compose_config("train", [*COMMON, "trainer.max_steps=3"], tmp_path / "r"))
    assert metrics["info"]["steps"] == 3


def poison_training_forward(monkeypatch, bad_calls) -> None:
    """Make the LM loss NaN in the training forwards whose number (from 1) `bad_calls` holds."""
    forward, calls = AdaptedModel.forward, [0]

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] in bad_calls:
                out.lm_loss = out.lm_loss * float("nan")
        return out

    monkeypatch.setattr(AdaptedModel, "forward", poisoned)


def test_a_nan_step_is_skipped_and_the_run_finishes(monkeypatch, tmp_path) -> None:
    poison_training_forward(monkeypatch, {4})
    steps = ["trainer.max_steps=8", "trainer.log_every=1", "trainer.save_every=3"]
    metrics = train(compose_config("train", [*COMMON, *steps], tmp_path / "skip"))
    assert metrics["info"]["skipped_steps"] == 1
    logged = history(tmp_path / "skip")
    assert [row["step"] for row in logged if "train/loss" in row] == [1, 2, 3, 5, 6, 7, 8]
    assert logged[-1]["train/skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in adapter(tmp_path / "skip").values())
    # The skipped step changed nothing: step 4's state is step 3's (a checkpoint there).
    monkeypatch.undo()
    poison_training_forward(monkeypatch, {4})
    steps4 = ["trainer.max_steps=4", "trainer.log_every=1", "trainer.save_every=3"]
    train(compose_config("train", [*COMMON, *steps4], tmp_path / "four"))
    three = load_file(
        tmp_path / "four" / "checkpoints" / "step-00000003" / "adapter_model.safetensors"
    )
    four = adapter(tmp_path / "four")
    assert all(torch.equal(three[key], four[key]) for key in three)


def test_a_run_that_keeps_producing_nan_stops_with_its_checkpoint_intact(
    monkeypatch, tmp_path
) -> None:
    run_dir = tmp_path / "diverged"
    poison_training_forward(monkeypatch, set(range(11, 100)))
    steps = ["trainer.max_steps=30", "trainer.save_every=5", "trainer.max_bad_steps=3"]
    with pytest.raises(RunStopped) as stopped:
        train(compose_config("train", [*COMMON, *steps], run_dir))
    message = str(stopped.value)
    assert message.startswith("training stopped at step 13: 3 steps in a row had a non-finite")
    assert "lm_loss=nan" in message and "load_balance=" in message
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step-00000010'}" in message
    assert stopped.value.exit_code == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000005",
        "step-00000010",
    ]
    monkeypatch.undo()  # the cause is fixed: the checkpoint loads and the run finishes
    metrics = train(compose_config("train", [*COMMON, *steps, "trainer.resume=true"], run_dir))
    assert metrics["info"]["steps"] == 30 and metrics["info"]["skipped_steps"] == 0


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(monkeypatch, tmp_path) -> None:
    import moelora.train.checkpoint as checkpoint

    run_dir = tmp_path / "full_disk"
    save, calls = checkpoint.save_whole_adapter, [0]

    def fails_the_second_time(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # after save_state wrote the optimizer and RNG files
            raise OSError(28, "No space left on device")
        return save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_whole_adapter", fails_the_second_time)
    steps = ["trainer.max_steps=12", "trainer.save_every=4"]
    with pytest.raises(RunStopped) as failed:
        train(compose_config("train", [*COMMON, *steps], run_dir))
    message = str(failed.value)
    assert failed.value.exit_code == 3
    assert "writing " in message and "step-00000008 failed (No space left on device)" in message
    assert f"{run_dir / 'checkpoints' / 'step-00000004'} is intact" in message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000004"]
    monkeypatch.undo()
    metrics = train(compose_config("train", [*COMMON, *steps, "trainer.resume=true"], run_dir))
    assert metrics["info"]["steps"] == 12


def worker_with_local_rank(run_dir: Path, rank: int) -> int:
    """The pid of the launched training process with LOCAL_RANK=`rank` for `run_dir`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"run_dir={run_dir}".encode() in command and f"LOCAL_RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no process with LOCAL_RANK={rank} trains {run_dir}")


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc").is_dir(), reason="platform: finds the rank's process in /proc"
)
def test_a_signal_to_one_ddp_rank_stops_both_and_resume_equals_the_uninterrupted_run(
    tmp_path,
) -> None:
    ddp = ["hardware=ddp", "hardware.num_processes=2", "trainer.batch_size=4"]
    interrupted = tmp_path / "interrupted"
    process = start(interrupted, *COMMON, *ddp, "trainer.max_steps=40")
    wait_for_logged_steps(process, interrupted, 5)
    os.kill(worker_with_local_rank(interrupted, 1), signal.SIGTERM)
    _, err = process.communicate(timeout=300)  # no deadlock: rank 0 stops at the same step
    assert process.returncode != 0
    (checkpoint,) = (interrupted / "checkpoints").iterdir()
    assert int(checkpoint.name.split("-")[1]) < 40, err.decode()[-3000:]
    for run_dir, extra in ((interrupted, ["trainer.resume=true"]), (tmp_path / "reference", [])):
        done = start(run_dir, *COMMON, *ddp, "trainer.max_steps=40", *extra)
        _, err = done.communicate(timeout=600)
        assert done.returncode == 0, err.decode()[-3000:]
    assert_identical_runs(interrupted, tmp_path / "reference")


def test_a_second_signal_stops_at_once_but_a_forwarded_copy_does_not(monkeypatch) -> None:
    from moelora import signals

    exits: list[int] = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    with signals.StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop._handle(signal.SIGINT, None)
        clock[0] += 0.5  # a launcher passing the same Ctrl-C on
        stop._handle(signal.SIGTERM, None)
        assert stop.signum == signal.SIGINT and exits == []
        clock[0] += 5
        stop._handle(signal.SIGTERM, None)
        assert exits == [128 + signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) != stop._handle  # the old handlers are back


def test_a_disk_too_small_for_the_checkpoints_is_said_before_training(
    monkeypatch, capsys, tmp_path
) -> None:
    import shutil as shell

    from moelora.train.checkpoint import check_free_space

    usage = shell.disk_usage(tmp_path)
    monkeypatch.setattr(shell, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    root = tmp_path / "checkpoints"
    check_free_space(root, adapter_parameters=1_000_000, saves=3)  # 4 MB x 10 = 40 MB
    out = capsys.readouterr().out
    assert out.startswith(f"warning: {tmp_path} has 0.01 GiB free, and the checkpoints")
    assert "need about 0.04 GiB" in out
    check_free_space(root, adapter_parameters=100_000, saves=3)  # 4 MB: fits
    assert capsys.readouterr().out == ""
