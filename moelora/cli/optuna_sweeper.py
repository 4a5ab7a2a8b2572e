"""The search behind `hydra/sweeper=optuna`: the hydra-optuna-sweeper plugin's sweep, made
resumable (the `optuna` extra; Hydra finds it through `hydra_plugins/moelora_sweeper`).

The plugin keeps its study in `hydra.sweeper.storage` (our preset: `optuna.db` in the sweep
folder), but a rerun of the same command runs `n_trials` more, numbers its jobs from 0 again (so
new trials write into earlier trials' folders) and leaves a killed trial RUNNING for ever. Here a
rerun first finishes each interrupted trial in its own folder with its own settings (the run
resumes from its last checkpoint: the presets set trainer.resume=auto), then runs only the
trials still missing; every trial runs as job number = trial number, so in the folder
`hydra.sweep.subdir` names by it; and `optimization_results.yaml` lists every trial.

The plugin pins optuna < 3, whose database storage predates SQLAlchemy 2: it stamps its schema
version in a transaction SQLAlchemy 2 no longer commits, and the study then fails to open
("assert version is not None"). Opening the storage in autocommit mode makes each of its writes
final, which is what optuna 2 expected, so the extra installs beside MLflow (which needs
SQLAlchemy 2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
from omegaconf import OmegaConf
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from moelora.analysis.search import RESULTS_FILE

log = logging.getLogger(__name__)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)  # sqlite needs its folder
        if isinstance(self.storage, str):
            self.storage = _AutocommitStorage(self.storage)
        study = self._stored_study()
        if study is not None:
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self._finish_interrupted(study, trial)
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            log.info(f"Resuming study {self.study_name}: {done} of {self.n_trials} trials done")
            self.n_trials = max(0, self.n_trials - done)
            # A seeded sampler would draw the first trials' settings again from its start.
            self.sampler.reseed_rng()
        super().sweep(arguments)
        self._list_trials()

    def _stored_study(self) -> optuna.Study | None:
        """The study an earlier run of this search left in the storage, if any."""
        if self.storage is None or self.study_name is None:
            return None
        try:
            return optuna.load_study(study_name=self.study_name, storage=self.storage)
        except KeyError:  # optuna's answer for a study the storage does not hold
            return None

    def _finish_interrupted(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Run a killed trial again as the same job, so in the same folder, with its settings."""
        settings = {**trial.params, **trial.user_attrs}  # sampled, then the fixed ones
        overrides = tuple(f"{name}={value}" for name, value in settings.items())
        log.info(f"Trial {trial.number} was interrupted; finishing it: {' '.join(overrides)}")
        [job] = self.launcher.launch([overrides], initial_job_idx=trial.number)
        _tell(study, trial.number, job)

    def _configure_trials(
        self,
        trials: list[Trial],
        search_space_distributions: dict[str, Any],
        fixed_params: dict[str, Any],
    ) -> Sequence[Sequence[str]]:
        numbers = [trial.number for trial in trials]
        if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
            raise RuntimeError(f"trials {numbers} are not consecutive; run one search at a time.")
        self.job_idx = numbers[0]  # the launcher numbers the batch's jobs from here
        return super()._configure_trials(trials, search_space_distributions, fixed_params)

    def _list_trials(self) -> None:
        """Add the best trial's number and every trial to the plugin's results file."""
        if self.storage is None:  # an in-memory study is gone with the plugin's sweep
            return
        study = optuna.load_study(study_name=self.study_name, storage=self.storage)
        path = Path(self.sweep_dir) / RESULTS_FILE
        results = OmegaConf.load(path)
        results.best_trial = study.best_trial.number
        results.trials = [
            {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params}
            for t in study.trials
        ]
        OmegaConf.save(results, path)


class _AutocommitStorage(RDBStorage):
    """Optuna's database storage with each write committed as it is made (see above)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"})

    def __repr__(self) -> str:  # the plugin logs the storage it uses
        return self.url


def _tell(study: optuna.Study, number: int, job: JobReturn) -> None:
    """The job's objective into the study; a failed job fails its trial and raises its error."""
    try:
        value = float(job.return_value)  # a failed job raises its own exception here
    except Exception:
        study.tell(number, state=TrialState.FAIL)
        raise
    study.tell(number, value)
