"""The fault matrix: what a run does when the disk fills at each of its writes, when a file it
reads is unreadable, not UTF-8, a folder, a link loop, empty or cut short, and when a second run
starts on the same folder. Each case is one line on stderr with exit code 2 (bad input) or 3
(run stopped), no traceback, nothing partial left where the next run would read it, and nothing
earlier lost: the same command with trainer.resume=auto then finishes.

SIGKILL mid-run and mid-checkpoint, and the requeue loop of a cluster job, are in
test_requeue.py."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from functools import partial
from pathlib import Path

import pytest
from safetensors import SafetensorError

from moelora import atomic
from moelora.adapters import storage
from moelora.paths import DATA_DIR
from tests.test_config import in_process
from tests.test_reliability import start, wait_for_logged_steps
from tests.test_train import SMALL

# Two checkpoints (steps 2 and 4), every kind of file: history, base scores, predictions,
# curves, routing (molora), report and metrics.
FAST = [
    *SMALL,
    "method=molora",
    "method.num_experts=2",
    "method.top_k=1",
    "method.rank_per_expert=4",
    "trainer.max_steps=4",
    "trainer.save_every=2",
    "trainer.log_every=1",
    "data.max_eval_samples_per_task=1",
    "eval.max_new_tokens=4",
]
NO_SPACE = os.strerror(errno.ENOSPC)


def train_cli(capsys, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return in_process(capsys, "train", *FAST, *extra, f"run_dir={run_dir}")


def one_line(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The command failed with `code` and said so in one line holding every needle."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("moelora ")]  # besides progress bars
    assert len(said) == 1 and lines[-1] == said[0], lines[-5:]
    for needle in needles:
        assert needle in said[0], said[0]
    return said[0]


def leftovers(run_dir: Path) -> list[Path]:
    """Temporaries of an interrupted write anywhere under the run."""
    marks = (atomic.TMP_MARK, atomic.OLD_MARK, "tmp-")
    return [p for p in run_dir.rglob("*") if any(m in p.name for m in marks)]


def checkpoint_steps(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# --------------------------------------------------------------------------------------------
# The disk fills at each write
# --------------------------------------------------------------------------------------------


def fill_disk_at_commit(monkeypatch, name: str) -> None:
    """The write of the file `name` runs out of space half-way: its temporary holds part of
    the content when the error comes."""
    commit = atomic._commit

    def failing(tmp: Path, path: Path) -> None:
        if path.name == name:
            if tmp.is_file():
                tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            raise OSError(errno.ENOSPC, NO_SPACE)
        commit(tmp, path)

    monkeypatch.setattr(atomic, "_commit", failing)


def fill_disk_at_safetensors(monkeypatch, call: int) -> None:
    """The `call`-th safetensors file (1, 2: the checkpoints; 3: the final adapter) fails the
    way safetensors fails on a full disk, after writing half of it."""
    save_file, calls = storage.save_file, [0]

    def failing(tensors, filename, *args, **kwargs):
        calls[0] += 1
        save_file(tensors, filename, *args, **kwargs)
        if calls[0] == call:
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                'space left on device" })'
            )

    monkeypatch.setattr(storage, "save_file", failing)


def fill_disk_at_history(monkeypatch, line: int) -> None:
    append, calls = atomic._append, [0]

    def failing(path: Path, data: bytes) -> None:
        calls[0] += 1
        if path.name == "history.jsonl" and calls[0] == line:
            append(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, NO_SPACE)
        append(path, data)

    monkeypatch.setattr(atomic, "_append", failing)


# (the file named in the line, how the disk fills, the checkpoints left intact)
DISK_FULL = [
    ("config.yaml", partial(fill_disk_at_commit, name="config.yaml"), []),
    ("tasks.json", partial(fill_disk_at_commit, name="tasks.json"), []),
    ("predictions_before.jsonl", partial(fill_disk_at_commit, name="predictions_before.jsonl"), []),
    ("scores_before.json", partial(fill_disk_at_commit, name="scores_before.json"), []),
    ("history.jsonl", partial(fill_disk_at_history, line=3), ["step-00000002"]),
    ("checkpoints/step-00000004", partial(fill_disk_at_safetensors, call=2), ["step-00000002"]),
    ("adapter", partial(fill_disk_at_safetensors, call=3), []),
    ("predictions_after.jsonl", partial(fill_disk_at_commit, name="predictions_after.jsonl"), []),
    ("curves.png", partial(fill_disk_at_commit, name="curves.png"), []),
    ("routing.json", partial(fill_disk_at_commit, name="routing.json"), []),
    ("routing.png", partial(fill_disk_at_commit, name="routing.png"), []),
    ("report.md", partial(fill_disk_at_commit, name="report.md"), []),
    ("metrics.json", partial(fill_disk_at_commit, name="metrics.json"), []),
]
AFTER_TRAINING = {"adapter", "predictions_after.jsonl", "curves.png", "routing.json"}
AFTER_TRAINING |= {"routing.png", "report.md", "metrics.json"}


@pytest.mark.parametrize(("name", "fill", "kept"), DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_a_full_disk_at_each_write_stops_in_one_line_and_auto_finishes_the_run(
    name, fill, kept, monkeypatch, capsys, tmp_path
) -> None:
    run_dir = tmp_path / "run"
    fill(monkeypatch)
    result = train_cli(capsys, run_dir)
    line = one_line(result, 3, f"writing {run_dir / name}", NO_SPACE, "free space under")
    assert line.startswith("moelora train: stopped: writing ")
    assert not leftovers(run_dir)
    target = run_dir / name
    if name == "history.jsonl":  # cut back to its last whole line
        assert all(json.loads(row) for row in target.read_text().splitlines())
    else:
        assert not target.exists()
    if name in AFTER_TRAINING:  # training is done: both checkpoints are kept
        kept = ["step-00000002", "step-00000004"]
    assert checkpoint_steps(run_dir) == kept
    assert not (run_dir / "metrics.json").exists()  # the run does not count as finished

    monkeypatch.undo()  # space is freed: the same command continues and finishes
    done = train_cli(capsys, run_dir, "trainer.resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["info"]["steps"] == 4 and "after" in metrics
    assert not leftovers(run_dir)


def test_a_real_full_disk_stops_in_one_line_and_leaves_every_checkpoint_whole(
    capsys, tmp_path
) -> None:
    """A 2 MB tmpfs: whichever write meets the full disk, the run stops in one line."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)])
    if mounted.returncode != 0:
        pytest.skip("platform: mounting a tmpfs needs root and a kernel that allows it")
    try:
        (mount / "ballast").write_bytes(b"\0" * (1900 * 1024))  # about 150 KB left
        run_dir = mount / "run"
        steps = ["trainer.max_steps=8", "trainer.log_with=[]"]
        result = train_cli(capsys, run_dir, *steps)
        one_line(result, 3, f"writing {run_dir}", NO_SPACE)
        assert not leftovers(run_dir)
        for checkpoint in (run_dir / "checkpoints").glob("step-*"):
            assert (checkpoint / "trainer_state.json").is_file()
        (mount / "ballast").unlink()
        done = train_cli(capsys, run_dir, *steps, "trainer.resume=auto")
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((run_dir / "metrics.json").read_text())["info"]["steps"] == 8
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)  # the log file is open


# --------------------------------------------------------------------------------------------
# Files that cannot be read as they should
# --------------------------------------------------------------------------------------------


def demo_data(root: Path) -> Path:
    """A copy of the demo's data folder to damage."""
    shutil.copytree(DATA_DIR / "demo", root)
    return root


def damage_permissions(root: Path, monkeypatch) -> None:
    """Root reads every file whatever its mode, so the refusal is the OS's answer, simulated."""
    train_file, read_bytes = root / "train.jsonl", Path.read_bytes

    def refused(path: Path) -> bytes:
        if path == train_file:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refused)


def damage_encoding(root: Path, monkeypatch) -> None:
    lines = (root / "train.jsonl").read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace("：".encode(), b"\xff\xfe", 1)
    (root / "train.jsonl").write_bytes(b"".join(lines))


def damage_into_folder(root: Path, monkeypatch) -> None:
    (root / "train.jsonl").unlink()
    (root / "train.jsonl").mkdir()


def damage_link_loop(root: Path, monkeypatch) -> None:
    (root / "train.jsonl").unlink()
    (root / "loop.jsonl").symlink_to(root / "train.jsonl")
    (root / "train.jsonl").symlink_to(root / "loop.jsonl")


def damage_emptied(root: Path, monkeypatch) -> None:
    (root / "train.jsonl").write_bytes(b"")


# (how the train file is damaged, what the line says)
BAD_DATA = [
    (damage_permissions, f"train.jsonl cannot be read ({os.strerror(errno.EACCES)})"),
    (damage_encoding, "train.jsonl:3 is not UTF-8 text (byte 0xff); save the file as UTF-8"),
    (damage_into_folder, "data.train_files matched no .json/.jsonl files"),
    (damage_link_loop, "is a symbolic link that leads nowhere"),
    (damage_emptied, "train.jsonl is empty"),
]


@pytest.mark.parametrize(("damage", "message"), BAD_DATA, ids=[c[0].__name__ for c in BAD_DATA])
def test_a_damaged_data_file_stops_in_one_line(damage, message, monkeypatch, capsys, tmp_path):
    root = demo_data(tmp_path / "data")
    damage(root, monkeypatch)
    run_dir = tmp_path / "run"
    one_line(train_cli(capsys, run_dir, f"data.root={root}"), 2, message)
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("form", ["bom", "crlf"])
def test_a_byte_order_mark_and_crlf_line_ends_read_like_plain_utf8(form, tmp_path) -> None:
    from moelora.data.reader import read_rows

    plain = DATA_DIR / "demo" / "dev.jsonl"
    data = plain.read_bytes()
    data = b"\xef\xbb\xbf" + data if form == "bom" else data.replace(b"\n", b"\r\n")
    (tmp_path / "dev.jsonl").write_bytes(data)
    assert read_rows(tmp_path / "dev.jsonl").to_list() == read_rows(plain).to_list()


def model_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(DATA_DIR / "demo_base", folder)
    return folder


# (how the model folder is damaged, what the line says)
BAD_MODELS = [
    (lambda f: (f / "model.safetensors").write_bytes(b""), "header too small"),
    (lambda f: (f / "config.json").write_text("{ cut"), "is not a valid JSON file"),
    (lambda f: shutil.rmtree(f) or f.write_text("not a folder"), "is a file; point it at"),
]


@pytest.mark.parametrize(("damage", "message"), BAD_MODELS, ids=["empty", "json", "file"])
def test_a_damaged_model_folder_stops_in_one_line(damage, message, capsys, tmp_path) -> None:
    folder = model_copy(tmp_path)
    damage(folder)
    run_dir = tmp_path / "run"
    model = ["model=demo_base", f"model.name_or_path={folder}"]
    one_line(train_cli(capsys, run_dir, *model), 2, str(folder), message)
    assert not (run_dir / "config.yaml").exists()


# --------------------------------------------------------------------------------------------
# Damaged adapters and checkpoints, and run folders that are not what they should be
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moelora.train.recipe import train
    from tests.conftest import compose_config

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(compose_config("train", FAST, run_dir))
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


RUN_FILES = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json"]
RUN_FILES += ["tasks.json", "config.yaml"]


@pytest.mark.parametrize("damaged", RUN_FILES)
def test_eval_of_a_run_with_a_damaged_file_stops_in_one_line(
    damaged, finished, capsys, tmp_path
) -> None:
    run_dir = copy_of(finished, tmp_path)
    path = run_dir / damaged
    if path.suffix == ".safetensors":
        cut_in_half(path)
    else:
        path.write_text("{ cut: [")
    result = in_process(capsys, "eval", f"run_dir={run_dir}", f"output_dir={tmp_path / 'eval'}")
    line = one_line(result, 2, f"{path} cannot be read (", "is damaged or was cut short")
    assert line.startswith("moelora eval: error: ")


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "trainer_state.json"])
def test_resume_from_a_damaged_checkpoint_stops_and_names_the_one_before(
    damaged, finished, capsys, tmp_path
) -> None:
    run_dir = copy_of(finished, tmp_path)
    for name in ("metrics.json", "adapter"):  # as if the run had stopped after step 4
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    newest = run_dir / "checkpoints" / "step-00000004"
    cut_in_half(newest / damaged)
    result = train_cli(capsys, run_dir, "trainer.resume=auto")
    one_line(result, 2, f"checkpoint {newest} is damaged", f"resume from {newest.parent}/step-0")
    assert checkpoint_steps(run_dir) == ["step-00000002", "step-00000004"]  # nothing removed


def test_auto_on_a_finished_run_returns_at_once_without_touching_it(finished, capsys) -> None:
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.name != ".lock"}
    result = train_cli(capsys, finished, "trainer.resume=auto")
    assert result.returncode == 0 and result.stderr == ""
    assert (
        result.stdout.strip() == f"moelora train: run_dir={finished} has finished already; "
        "nothing to do."
    )
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_run_dir_that_is_a_file_stops_in_one_line(capsys, tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    for resume in ("false", "auto"):
        result = train_cli(capsys, path, f"trainer.resume={resume}")
        one_line(result, 2, f"run_dir={path} is a file, not a folder")
    assert path.read_text() == "mine"


def test_a_run_dir_holding_other_files_is_refused(capsys, tmp_path) -> None:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("mine")
    result = train_cli(capsys, folder, "trainer.resume=auto")
    one_line(result, 2, "holds files that are not a moelora run (chapter1.tex)")
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.tex"]


def test_resuming_with_another_method_names_both_methods(finished, capsys, tmp_path) -> None:
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "metrics.json").unlink()
    result = in_process(
        capsys, "train", *SMALL, "method=lora", "trainer.resume=true", f"run_dir={run_dir}"
    )
    one_line(result, 2, "is a molora run, and this command asks for method=lora")


def test_a_predictions_file_error_names_the_gold_files(capsys, tmp_path) -> None:
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text('{"sample_id": "nope", "prediction": "x"}\n')
    args = ["eval", f"predictions={predictions}", f"output_dir={tmp_path / 'out'}"]
    line = one_line(in_process(capsys, *args), 2, "preds.jsonl:1 has sample_id nope")
    assert str(DATA_DIR / "demo" / "dev.jsonl") in line and "['" not in line


# --------------------------------------------------------------------------------------------
# Two runs on one folder
# --------------------------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_stops_naming_the_first(capsys, tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = start(run_dir, *FAST, "trainer.max_steps=2000", "eval.enabled=false")
    try:
        wait_for_logged_steps(first, run_dir, 2)
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        for resume in ("false", "auto", "true"):
            result = train_cli(capsys, run_dir, f"trainer.resume={resume}")
            one_line(result, 2, f"run_dir={run_dir} is in use by process {first.pid} on ")
        assert (run_dir / ".hydra" / "overrides.yaml").read_text() == overrides
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The kernel dropped the dead process's lock: a requeued job goes on.
    assert train_cli(capsys, run_dir, "trainer.resume=auto").returncode == 0


def test_a_killed_process_leftovers_are_swept_and_a_half_swapped_folder_restored(tmp_path):
    (tmp_path / f".report.md{atomic.TMP_MARK}123").write_text("half")
    (tmp_path / f".adapter{atomic.OLD_MARK}123").mkdir()  # killed between the two renames
    (tmp_path / f".peft{atomic.OLD_MARK}9").mkdir()
    (tmp_path / "peft").mkdir()  # ... or after the second
    atomic.clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "peft"]


# --------------------------------------------------------------------------------------------
# One resume decision
# --------------------------------------------------------------------------------------------


def test_the_issue_s_requeue_command_finishes_then_returns_and_resumes_a_cut_run(
    capsys, tmp_path
) -> None:
    """The same command twice: the second returns at once; with only checkpoints/ left (the
    run was cut short after its last checkpoint) it resumes and finishes."""
    run_dir = tmp_path / "R"
    command = ["train", "+experiment=demo", "trainer.max_steps=6", "trainer.save_every=3"]
    command += ["eval.enabled=false", f"run_dir={run_dir}", "trainer.resume=auto"]
    first = in_process(capsys, *command)
    assert first.returncode == 0, first.stderr[-3000:]
    second = in_process(capsys, *command)
    assert second.returncode == 0 and "has finished already" in second.stdout
    for name in ("metrics.json", "history.jsonl", "config.yaml", "tasks.json"):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "adapter")
    third = in_process(capsys, *command)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'step-00000006'}" in third.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["info"]["steps"] == 6


def make_run(folder: Path, *, config=False, checkpoint=False, partial=False, finished=False):
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / "moelora-train.log").write_text("")
    if config:
        (folder / "config.yaml").write_text("{}")
    if checkpoint:
        (folder / "checkpoints" / "step-00000002").mkdir(parents=True)
        (folder / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("{}")
    if partial:
        (folder / "checkpoints" / "tmp-00000004").mkdir(parents=True)
    if finished:
        (folder / "adapter").mkdir()
        (folder / "metrics.json").write_text("{}")


# (what the folder holds, resume=false, resume=true, resume=auto); None: refused
PLANS = [
    ({}, "start", None, "start"),
    ({"config": True}, "start", None, "start"),
    ({"config": True, "partial": True}, None, None, "start"),
    ({"config": True, "checkpoint": True}, None, "resume", "resume"),
    ({"config": True, "checkpoint": True, "partial": True}, None, "resume", "resume"),
    ({"config": True, "checkpoint": True, "finished": True}, None, "resume", "finished"),
]


@pytest.mark.parametrize(("holds", "false", "true", "auto"), PLANS)
def test_one_decision_for_every_folder_and_setting(holds, false, true, auto, tmp_path) -> None:
    from moelora.errors import UserError
    from moelora.resume import plan_run

    folder = tmp_path / "run"
    make_run(folder, **holds)
    for resume, expected in ((False, false), (True, true), ("auto", auto)):
        if expected is None:
            with pytest.raises(UserError, match=f"run_dir={folder}|trainer.resume=true, but"):
                plan_run(folder, resume)
        else:
            assert plan_run(folder, resume).action == expected, resume
    assert plan_run(tmp_path / "absent", "auto").action == "start"
