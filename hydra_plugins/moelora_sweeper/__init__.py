"""moelora's resumable Optuna search as a Hydra sweeper (Hydra finds sweepers only in the
`hydra_plugins` namespace). The search itself is moelora/cli/optuna_sweeper.py; nothing optional
is imported until a search starts, so Hydra's plugin scan stays quiet without the optuna extra."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper


class ResumableOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from moelora.cli.optuna_sweeper import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**settings)

    def setup(self, **context: Any) -> None:
        self.sweeper.setup(**context)

    def sweep(self, arguments: list[str]) -> None:
        self.sweeper.sweep(arguments)
