"""Markers come from fixtures: a test that uses the stack is `integration`, one that uses the
shared Spark session is `spark`, whatever its module says."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_markers_follow_the_fixtures(pytester) -> None:
    pytester.makeconftest("""
import pytest
from tests.helpers.markers import pytest_collection_modifyitems  # noqa: F401

@pytest.fixture
def stack():
    return None

@pytest.fixture
def spark():
    return None
""")
    pytester.makepyfile("""
def test_plain(): pass
def test_stack(stack): pass
def test_spark(spark): pass
""")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    result = pytester.runpytest("-m", "not integration and not spark", "-p", "no:bqemulator",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=2)


def test_the_slowest_files_are_collected_first(pytester) -> None:
    pytester.makeconftest("from tests.helpers.markers import pytest_collection_modifyitems  # noqa\n")
    pytester.makepyfile(test_a="def test_1(): pass\ndef test_2(): pass\n",
                        test_faults="def test_3(): pass\n", test_bench="def test_4(): pass\n")
    pytester.syspathinsert(str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:bqemulator",
                                "-p", "no:cacheprovider")
    listed = [line for line in result.outlines if "::" in line]
    assert listed == ["test_bench.py::test_4", "test_faults.py::test_3", "test_a.py::test_1",
                      "test_a.py::test_2"]
