"""The conftest check that keeps the ``integration`` mark honest."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]


def _write_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    # The project's own conftest (with its mail_servers fixtures and the check); it
    # imports tests.mailservers, so the subprocess needs the repository on its path
    # (the package itself may be installed, as in CI, or not).
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv(
        "PYTHONPATH", str(ROOT) if not pythonpath else f"{ROOT}{os.pathsep}{pythonpath}"
    )
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    integration: talks to the real servers\n")
    pytester.makepyfile(test_suite=textwrap.dedent(body))


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (
            """
            import pytest
            pytestmark = pytest.mark.integration
            def test_pure_function():
                assert 1 + 1 == 2
            """,
            "test_pure_function: marked integration but uses no mail servers",
        ),
        (
            """
            def test_sneaks_a_server(mail_servers):
                pass
            """,
            "test_sneaks_a_server: uses the mail servers but is not marked integration",
        ),
    ],
)
def test_a_drifted_mark_fails_the_run_whatever_is_selected(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, body: str, complaint: str
) -> None:
    _write_suite(pytester, monkeypatch, body)
    for args in ((), ("-m", "not integration")):
        result = pytester.runpytest_subprocess(*args)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*{complaint}*"])


def test_matching_marks_pass_the_check(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_suite(
        pytester,
        monkeypatch,
        """
        def test_pure_function():
            assert 1 + 1 == 2
        """,
    )
    result = pytester.runpytest_subprocess("-m", "not integration")
    result.assert_outcomes(passed=1)
