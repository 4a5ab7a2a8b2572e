"""`moelora train -m hydra/sweeper=optuna ...`: a hyper-parameter search's command line settled
before Hydra starts (the method's search preset, the optional extra, `-m`), and what each trial
hands the sweeper (the validation overall, never the dev score it reports)."""

from __future__ import annotations

import importlib.util
import logging

from omegaconf import DictConfig

from moelora.errors import UserError
from moelora.paths import CONFIG_DIR

SWEEPER = "hydra/sweeper=optuna"
PRESETS = "hparams_search"  # configs/hparams_search/<method>.yaml: one search space per method
EXTRA = "pip install -e '.[optuna]'"


def search_overrides(overrides: list[str]) -> list[str]:
    """`hydra/sweeper=optuna` stands for the method's preset, `+hparams_search=<method>`, which
    picks moelora's resumable version of the plugin's sweeper (configs/hydra/sweeper/
    moelora_optuna.yaml); a command with neither is returned as it is."""
    asked = SWEEPER in overrides
    presets = [o for o in overrides if o.lstrip("+").startswith(f"{PRESETS}=")]
    if not asked and not presets:
        return overrides
    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise UserError(f"a search (hydra/sweeper=optuna) needs the optuna extra: {EXTRA}.")
    if "-m" not in overrides and "--multirun" not in overrides:
        raise UserError(
            "a search runs many trials: add -m (moelora train -m hydra/sweeper=optuna ...)."
        )
    if any(o.startswith("run_dir=") for o in overrides):
        raise UserError(
            "a search gives every trial its own folder under hydra.sweep.dir; drop run_dir=."
        )
    # optuna's sqlite storage imports alembic, which logs a line for each plugin it sets up.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    overrides = [o for o in overrides if o != SWEEPER]
    if not presets:
        overrides.append(f"+{PRESETS}={_preset_of(_method_of(overrides))}")
    return overrides


def _method_of(overrides: list[str]) -> str:
    """The method the command trains: its last `method=`, else what the configs compose to."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
    if given and "," in given[-1]:
        raise UserError(
            f"method={given[-1]}: a search tunes one method; run one search per method, or "
            f"name its space with +{PRESETS}=<preset>."
        )
    if given:
        return given[-1]
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [o for o in overrides if not o.startswith(("-", "hydra.", "hydra/"))]
    parsed = OverridesParser.create().parse_overrides(plain)
    fixed = [text for text, o in zip(plain, parsed, strict=True) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=fixed).method.name


def _preset_of(method: str) -> str:
    if not (CONFIG_DIR / PRESETS / f"{method}.yaml").is_file():
        raise UserError(
            f"method {method} has no search space in configs/{PRESETS}/; write "
            f"configs/{PRESETS}/{method}.yaml or name one with +{PRESETS}=<preset>."
        )
    return method


def in_search() -> bool:
    """Whether this job is a trial of an Optuna search (a multirun under an Optuna sweeper)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra = HydraConfig.get()
    sweeper = str(hydra.sweeper.get("_target_", ""))
    return hydra.mode == RunMode.MULTIRUN and "optuna" in sweeper.lower()


def check_trial(cfg: DictConfig) -> None:
    """A trial must score validation rows: the search chooses settings by them, not by dev."""
    if not in_search():
        return
    if not cfg.eval.enabled or not (cfg.data.validation or cfg.data.validation_files):
        raise UserError(
            "an Optuna search chooses settings by the validation score and this run has none; "
            "set data.validation=<a share of the training rows, e.g. 0.1> (or "
            "data.validation_files) with eval.enabled=true."
        )


def objective(metrics: dict) -> float | None:
    """What `moelora train` returns to a sweeper: the validation overall, when there is one."""
    validation = metrics.get("validation")
    return float(validation["overall"]) if validation else None
