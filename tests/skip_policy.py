"""The suite's rule for skips: a test may be skipped only when the machine lacks a GPU, an
optional extra or a platform feature, and its reason says which (`GPU: ...`, `optional extra: ...`,
`platform: ...`). Any other skip fails, a missing data file above all: the data a test reads is in
the repository, so a fresh clone checks what CI checks."""

from __future__ import annotations

import pytest

ALLOWED_SKIPS = ("GPU:", "optional extra:", "platform:")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    """The reason a skipped report gives (pytest stores it as (path, line, 'Skipped: reason'))."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


def enforce(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip whose reason is not an allowed kind into a failure that says why."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if not reason.startswith(ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped for {reason!r}; a test may skip only for a missing GPU, optional extra or "
            f"platform feature, with a reason starting {' / '.join(ALLOWED_SKIPS)}; "
            "data a test reads belongs in the repository (tests/data/)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    enforce(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    enforce(outcome.get_result())
