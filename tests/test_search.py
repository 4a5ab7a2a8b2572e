"""The hyper-parameter search (`moelora train -m hydra/sweeper=optuna ...`): the command line the
CLI settles (the method's preset), every preset's space against its method's settings, the
objective (validation, never dev), and a search that is killed and continues to exactly its
number of trials, each in its own folder, with the best one named in summary.md."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moelora.adapters.methods import METHOD_REGISTRY
from moelora.cli.search import search_overrides
from moelora.errors import UserError
from moelora.paths import CONFIG_DIR
from tests.conftest import REPO, TINY_SHAPE, compose_config
from tests.test_config import in_process

needs_plugin = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None,
    reason="optional extra: optuna (hydra-optuna-sweeper)",
)
# A trial of a few steps on the smallest tiny base; 5 validation rows per task (data.validation
# 0.01 of the demo's 500), one dev row per task, four new tokens.
TINY_TRIAL = [
    "+experiment=demo",
    *TINY_SHAPE,
    "model.tiny.pretrain_steps=0",
    "data.validation=0.01",
    "data.max_eval_samples_per_task=1",
    "eval.max_new_tokens=4",
    "trainer.max_steps=4",
    "trainer.batch_size=4",
    "trainer.save_every=2",
]


@needs_plugin
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("-m hydra/sweeper=optuna method=moelora", "-m method=moelora +hparams_search=moelora"),
        ("-m hydra/sweeper=optuna", "-m +hparams_search=lora"),  # train.yaml's method
        ("-m hydra/sweeper=optuna +experiment=cmedical",  # the experiment's method
         "-m +experiment=cmedical +hparams_search=moelora"),
        ("-m hydra/sweeper=optuna +hparams_search=lora", "-m +hparams_search=lora"),
        ("-m hydra/sweeper=optuna trainer.lr=interval(0.1,1)",  # a range of its own
         "-m trainer.lr=interval(0.1,1) +hparams_search=lora"),
        ("-m +hparams_search=molora method=molora", "-m +hparams_search=molora method=molora"),
        ("-m method=lora,moelora", "-m method=lora,moelora"),  # no search: untouched
    ],
)  # fmt: skip
def test_the_sweeper_shortcut_picks_the_methods_preset(given: str, expected: str) -> None:
    assert search_overrides(given.split()) == expected.split()


@needs_plugin
@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["hydra/sweeper=optuna"], "add -m"),
        (["-m", "hydra/sweeper=optuna", "method=lora,moelora"], "a search tunes one method"),
        (["-m", "hydra/sweeper=optuna", "run_dir=x"], "drop run_dir="),
    ],
)
def test_a_search_the_cli_cannot_run_stops_in_one_sentence(given: list[str], message: str):
    with pytest.raises(UserError, match=message):
        search_overrides(given)


def test_a_search_without_the_extra_names_it(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"optuna extra: pip install -e '\.\[optuna\]'"):
        search_overrides(["-m", "hydra/sweeper=optuna"])


@needs_plugin
@pytest.mark.parametrize("method", sorted(METHOD_REGISTRY))
def test_every_method_has_a_search_space_of_its_own_settings(method: str, tmp_path) -> None:
    """Each preset composes with its method, holds out validation rows, maximizes, and
    searches only keys the method's config has (a misspelt key would fail every trial)."""
    cfg = compose_config("train", [f"method={method}", f"+hparams_search={method}"], tmp_path)
    assert cfg.data.validation > 0 and cfg.trainer.resume == "auto"
    with_hydra = _compose_with_hydra([f"method={method}", f"+hparams_search={method}"])
    sweeper = with_hydra.hydra.sweeper
    assert sweeper.direction == "maximize" and "optuna.db" in sweeper.storage
    assert "trainer.lr" in sweeper.params
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key


@needs_plugin
def test_a_search_without_validation_rows_stops_before_training(tmp_path, capsys) -> None:
    done = in_process(
        capsys,
        *["train", "-m", "hydra/sweeper=optuna", *TINY_TRIAL, "data.validation=0"],
        *["hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}"],
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("moelora train:")]
    # optuna's own notes aside, the error is one line, the last
    assert len(errors) == 1 and errors == done.stderr.strip().splitlines()[-1:]
    assert "chooses settings by the validation score and this run has none" in errors[0]
    assert not (tmp_path / "0" / "config.yaml").exists()  # the trial stopped before its run began


@needs_plugin
@pytest.mark.slow
def test_a_killed_search_continues_to_its_number_of_trials(tmp_path: Path) -> None:
    """Kill a search of 3 trials (SIGKILL) once the second has started; the same command
    finishes the second in its own folder and runs only the third. Each trial's folder holds
    its own settings and score, and summary.md names the best trial."""
    sweep = tmp_path / "search"
    command = [sys.executable, "-m", "moelora", "train", "-m", "hydra/sweeper=optuna"]
    command += [*TINY_TRIAL, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    _wait_for(sweep / "1" / "config.yaml", first)  # trial 0 has finished, trial 1 trains
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert not (sweep / "2").exists()

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Trial 1 was interrupted; finishing it" in again.stdout + again.stderr
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert [(t.number, t.state) for t in results.trials] == [(n, "COMPLETE") for n in range(3)]
    for trial in results.trials:  # the trial's own folder, settings and score
        run = sweep / str(trial.number)
        assert OmegaConf.load(run / "config.yaml").trainer.lr == trial.params["trainer.lr"]
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["validation"]["overall"] == trial.value
    best = max(results.trials, key=lambda t: t.value)
    assert results.best_trial == best.number and results.best_value == best.value
    summary = (sweep / "summary.md").read_text(encoding="utf-8")
    assert f"**Best: trial {best.number}** (`{sweep / str(best.number)}`)" in summary
    assert f"trainer.lr={best.params['trainer.lr']:.3g}" in summary


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the search ended (status {process.returncode})"
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.1)


def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)
