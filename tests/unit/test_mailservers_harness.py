"""The mail-server harness's own pieces that need no server (tests/mailservers.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from tests import mailservers
from tests.mailservers import DOMAIN, User

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_user_repr_hides_password() -> None:
    user = User(address=f"x@{DOMAIN}", password="sekrit-value")
    assert "sekrit-value" not in repr(user)
    assert user.localpart == "x"


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.mailservers", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert "up" in result.stdout


def test_maildir_names_sort_numerically() -> None:
    names = [
        "1700000001.M5P1.host",
        "1700000000.M100P7Q10.prxmail-test",
        "1700000000.M100P7Q9.prxmail-test",
        "1700000000.M99P7Q11.prxmail-test",
    ]
    assert sorted(names, key=mailservers._maildir_order) == [
        "1700000000.M99P7Q11.prxmail-test",
        "1700000000.M100P7Q9.prxmail-test",
        "1700000000.M100P7Q10.prxmail-test",
        "1700000001.M5P1.host",
    ]
