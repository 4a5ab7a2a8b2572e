"""A fresh clone tests what CI tests: no test reads a file outside the repository, and a skip for
anything but a missing GPU, optional extra or platform feature fails (tests/skip_policy.py)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import PROMPTCBLUE_TOY, REPO

POLICY = "from tests.skip_policy import pytest_make_collect_report, pytest_runtest_makereport\n"


def test_a_skip_for_a_missing_file_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_reads_data():
            pytest.skip("toy rows not found at ../shared/data")

        @pytest.mark.skipif(True, reason="data file absent")
        def test_marked():
            pass
        """
    )
    pytester.makeconftest(POLICY)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, errors=1)  # the skipif mark is decided in setup
    result.stdout.fnmatch_lines(["*skipped for 'toy rows not found at ../shared/data'*"])


def test_a_module_skipped_at_collection_for_a_missing_file_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("import pytest\npytest.skip('no data', allow_module_level=True)\n")
    pytester.makeconftest(POLICY)
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped for 'no data'*"])


def test_skips_for_a_gpu_an_extra_or_the_platform_stay_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_gpu():
            pytest.skip("GPU: needs CUDA")

        def test_extra():
            pytest.importorskip("no_such_module_xyz", reason="optional extra: pip install x")

        @pytest.mark.skipif(True, reason="platform: needs /proc")
        def test_platform():
            pass

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert False
        """
    )
    pytester.makeconftest(POLICY)
    pytester.runpytest().assert_outcomes(skipped=3, xfailed=1)


def test_no_test_or_module_names_a_path_outside_the_repository() -> None:
    outside = re.compile(
        r"""["'/]\.\.["'/]|parents\[\d+\]\s*/\s*["']\.\.|\.parent\s*/\s*["']shared"""
    )
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("moelora", "tests", "scripts")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.name != "test_self_contained.py"
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if outside.search(line)
    ]
    assert not offenders


def test_the_promptcblue_rows_and_official_scores_are_in_the_repository() -> None:
    assert PROMPTCBLUE_TOY.is_relative_to(REPO)
    for split in ("train", "dev"):
        rows = (PROMPTCBLUE_TOY / f"{split}.json").read_text("utf-8").splitlines()
        assert len(rows) == 80
    scores = sorted((PROMPTCBLUE_TOY / "official_scores").glob("*.scores.json"))
    assert len(scores) == 38  # gold and 6 damage kinds x 3 seeds, for train and for dev
    assert "michael-wzhu/PromptCBLUE" in (PROMPTCBLUE_TOY / "README.md").read_text("utf-8")
