"""A wheel (`pip install .`) carries every package and every shipped data file, not only what an
editable install finds beside the source."""

from __future__ import annotations

import fnmatch

import pytest

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="platform: Python 3.11+ reads pyproject.toml")

SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]


def test_every_python_package_is_listed() -> None:
    found = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "moelora").rglob("__init__.py")
    }
    assert found <= set(SETUPTOOLS["packages"])


def test_every_shipped_data_file_matches_a_package_data_pattern() -> None:
    patterns = SETUPTOOLS["package-data"]["moelora.demo_data"]
    root = REPO / "data"
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert "demo_base/model.safetensors" in files
    # setuptools' "**/" also matches files at the top of the folder
    missed = [f for f in files if not any(fnmatch.fnmatch("x/" + f, p) for p in patterns)]
    assert not missed
