"""The console logger: plain lines on standard output, a `warning:` prefix, and silence on every
process but each machine's first, so a distributed run reads like a single one."""

from __future__ import annotations

import pytest

from moelora.log import get_logger


@pytest.mark.parametrize(("local_rank", "shown"), [(None, True), ("0", True), ("1", False)])
def test_lines_show_on_the_local_main_process_only(monkeypatch, capsys, local_rank, shown) -> None:
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    log = get_logger("moelora.tests")
    log.info("a note")
    log.warning("careful")
    out = capsys.readouterr().out
    assert out == ("a note\nwarning: careful\n" if shown else "")
