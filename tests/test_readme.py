"""The README's two set-up commands are exactly what CI runs."""

from __future__ import annotations

from tests.conftest import REPO


def test_ci_runs_the_readme_commands() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.startswith(("python3 -m venv", ". .venv"))]
    assert len(commands) == 2
    for command in commands:
        assert command in readme
    assert "torch==2.13.0" in commands[0] and "moelora train +experiment=demo" in commands[0]
    assert "pytest" in commands[1]
