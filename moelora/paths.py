"""Where the shipped configs and demo data live, in a source checkout and in an installed wheel.

The wheel maps the top-level `configs/` and `data/` folders to the packages `moelora.configs` and
`moelora.demo_data`; an editable install or a plain checkout finds them beside the package.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _find(installed: str, checkout: str) -> Path:
    for candidate in (_PACKAGE / installed, _PACKAGE.parent / checkout):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"moelora's '{checkout}' folder is missing; reinstall the package with `pip install .`."
    )


CONFIG_DIR = _find("configs", "configs")
DATA_DIR = _find("demo_data", "data")
