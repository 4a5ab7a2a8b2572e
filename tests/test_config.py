"""Config composition: every experiment composes and validates; typos fail with the key's name."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from moelora.cli import main
from moelora.config import TrainConfig
from moelora.paths import CONFIG_DIR
from tests.conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


def in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """`moelora <args>` run by its `main` in this process (no interpreter start-up), with the
    exit status and output a subprocess would give."""
    code = 0
    try:
        main(list(args))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["moelora", *args], code, out.out, out.err)


def moelora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moelora", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str, tmp_path) -> None:
    cfg = compose_config("train", [f"+experiment={experiment}"], tmp_path)
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, TrainConfig)
    assert typed.trainer.max_steps > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_preset_validates(method: str, tmp_path) -> None:
    cfg = compose_config("train", ["+experiment=demo", f"method={method}"], tmp_path)
    assert OmegaConf.to_object(cfg).method.name == method


def test_eval_config_composes(tmp_path) -> None:
    cfg = compose_config("eval", ["run_dir=/somewhere"], tmp_path)
    assert cfg.run_dir == "/somewhere"


def test_command_line_group_choice_beats_the_experiment(tmp_path) -> None:
    cfg = compose_config("train", ["+experiment=cmedical", "model=tiny", "data=demo"], tmp_path)
    assert cfg.model.name_or_path == "tiny"
    assert cfg.data.name == "demo"
    assert cfg.method.name == "moelora"


def test_misspelt_override_names_the_key(capsys) -> None:
    result = in_process(capsys, "train", "+experiment=demo", "trainer.lrr=1e-4")
    assert result.returncode != 0
    assert "lrr" in result.stderr


def test_misspelt_group_option_lists_the_choices(capsys) -> None:
    result = in_process(capsys, "train", "+experiment=demo", "method=lorra")
    assert result.returncode != 0
    assert "lorra" in result.stderr and "moelora" in result.stderr


def test_wrong_type_names_the_key(capsys) -> None:
    result = in_process(capsys, "train", "+experiment=demo", "trainer.max_steps=many")
    assert result.returncode != 0
    assert "max_steps" in result.stderr


def test_contradictory_method_stops_with_one_sentence(tmp_path, capsys) -> None:
    result = in_process(
        capsys, "train", "+experiment=demo", "method.dropout=1.5", f"run_dir={tmp_path}/r"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("moelora train: error: method:")
    assert "dropout" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_folder_says_where_to_point(tmp_path, capsys) -> None:
    result = in_process(
        capsys,
        "train",
        "+experiment=cmedical",
        "model=tiny",
        "hardware=cpu",
        "data.root=/nonexistent/PromptCBLUE",
        f"run_dir={tmp_path}/r",
    )
    assert result.returncode == 2
    assert "data.root='/nonexistent/PromptCBLUE' is not a folder" in result.stderr


def test_help_lists_config_groups(capsys) -> None:
    result = in_process(capsys, "train", "--help")
    assert result.returncode == 0
    for group in ("method", "model", "data", "hardware", "experiment"):
        assert f"{group}:" in result.stdout


def test_cfg_job_prints_the_composed_config(capsys) -> None:
    result = in_process(capsys, "train", "+experiment=demo", "method=moelora", "--cfg", "job")
    assert result.returncode == 0
    assert OmegaConf.create(result.stdout).method.name == "moelora"


def test_unknown_command_is_refused(capsys) -> None:
    result = in_process(capsys, "trian")
    assert result.returncode == 2
    assert "unknown command 'trian'" in result.stderr


def test_run_dir_and_cfg_flag_combine(tmp_path, capsys) -> None:
    result = in_process(
        capsys, "train", "+experiment=demo", f"run_dir={tmp_path}/r", "--cfg", "job"
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_distributed_launch_needs_one_run_dir() -> None:
    import os

    env = {**os.environ, "WORLD_SIZE": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "moelora", "train", "+experiment=demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    assert "under a distributed launch pass run_dir=<folder>" in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.scheduler=cosin", "trainer.scheduler='cosin' is unknown; use one of cosine, "),
        ("data.length_policy=cut", "data.length_policy='cut' is unknown; use one of truncate_"),
        ("data.template=chatml", "data.template='chatml' is unknown; use one of auto, chat, "),
        ("eval.scorer=offical", "eval.scorer='offical' is unknown; use one of official, "),
        ("hardware.launcher=mpirun", "hardware.launcher='mpirun' is unknown; use one of "),
    ],
)
def test_a_bad_value_stops_at_start_with_one_sentence(override, message, capsys, tmp_path) -> None:
    """Each schema checks its own values (`__post_init__`) before anything loads."""
    result = in_process(capsys, "train", "+experiment=demo", override, f"run_dir={tmp_path}/r")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"moelora train: error: {message}")
    assert not (tmp_path / "r" / "config.yaml").exists()
