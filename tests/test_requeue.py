"""A cluster job's life: the same `moelora train ... trainer.resume=auto` command started again
after every pre-emption (SIGTERM: a checkpoint at the current step) or hard kill (SIGKILL:
nothing written, even in the middle of a checkpoint), until it finishes. The final adapter and
logged losses equal an uninterrupted run's, bitwise."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moelora.train.recipe import train
from tests.conftest import REPO, compose_config
from tests.test_reliability import assert_identical_runs, start, wait_for_logged_steps
from tests.test_train import SMALL

pytestmark = pytest.mark.slow  # end-to-end runs: `pytest -m 'not slow'` skips them

JOB = [
    *SMALL,
    "method=molora",
    "method.num_experts=2",
    "method.top_k=1",
    "method.rank_per_expert=4",
    "trainer.max_steps=40",
    "trainer.log_every=2",
    "trainer.save_every=6",
    "eval.enabled=false",
    "trainer.resume=auto",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(compose_config("train", JOB, run_dir))
    return run_dir


@pytest.mark.parametrize(
    ("kill", "stops"),
    # stopped after that many lines of history (2 steps each); a hard kill at step 14 loses the
    # steps after the step-12 checkpoint, which the next start trains again
    [(signal.SIGTERM, (6, 12)), (signal.SIGKILL, (7,))],
    ids=["SIGTERM", "SIGKILL"],
)
def test_requeued_until_done_the_job_equals_the_uninterrupted_run(
    kill, stops, uninterrupted, tmp_path
) -> None:
    run_dir, attempts = tmp_path / "job", []
    for logged in (*stops, None):  # stopped mid-run; the last start finishes
        job = start(run_dir, *JOB)
        if logged is not None:
            wait_for_logged_steps(job, run_dir, logged)
            job.send_signal(kill)
        _, err = job.communicate(timeout=300)
        attempts.append(job.returncode)
        assert "Traceback" not in err.decode(), err.decode()[-3000:]
    expected = 128 + signal.SIGTERM if kill == signal.SIGTERM else -signal.SIGKILL
    assert attempts == [expected] * len(stops) + [0]
    assert_identical_runs(run_dir, uninterrupted)


KILLED_MID_CHECKPOINT = """
import os, signal, sys
from moelora.cli import main
from moelora.train import checkpoint

save, calls = checkpoint.save_whole_adapter, [0]

def killed_on_the_second(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:  # the optimizer and RNG files are written, the adapter is not
        os.kill(os.getpid(), signal.SIGKILL)
    return save(*args, **kwargs)

checkpoint.save_whole_adapter = killed_on_the_second
main(sys.argv[1:])
"""


def test_a_kill_in_the_middle_of_a_checkpoint_resumes_from_the_one_before(
    uninterrupted, tmp_path
) -> None:
    run_dir = tmp_path / "job"
    command = [sys.executable, "-c", KILLED_MID_CHECKPOINT, "train", *JOB, f"run_dir={run_dir}"]
    killed = subprocess.run(command, cwd=REPO, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000006", "tmp-00000012"]

    again = start(run_dir, *JOB)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-3000:]
    assert f"trainer.resume=auto: resuming from {checkpoints / 'step-00000006'}" in out.decode()
    assert not any(p.name.startswith("tmp-") for p in checkpoints.iterdir())
    assert_identical_runs(run_dir, uninterrupted)
