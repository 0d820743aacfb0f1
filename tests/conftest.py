"""Shared fixtures: the private Dovecot + Postfix (tests/mailservers.py) for integration tests.

The servers start once per pytest run, on first use, and stop at the end. A test that
uses them and fails gets the tails of the Dovecot and Postfix logs attached to its
report, and the full logs are copied next to pytest's temporary directories.

If the servers cannot start, every test that needs them fails with the reason. The one
exception, outside CI only (``CI`` unset or false), is a machine where they cannot be
started at all because we are not root or there is no apt-get: those tests are skipped
with that reason. In CI they never skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator

import pytest

from tests.mailservers import MailServers, MailServersError, start_mail_servers

_SERVERS = pytest.StashKey[MailServers]()
_FAILED = pytest.StashKey[bool]()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable_reason() -> str | None:
    """Why the servers cannot possibly run here, or None when they should."""
    if os.geteuid() != 0:
        return "the private Postfix needs root (its master must be started by root)"
    if shutil.which("apt-get") is None and not shutil.which("dovecot"):
        return "Dovecot/Postfix are not installed and there is no apt-get to install them"
    return None


@pytest.fixture(scope="session")
def mail_server_machine() -> None:
    """This machine can run the private Dovecot and Postfix (else skip, or fail in CI).

    For the few tests that start an instance of their own (the harness's CLI, its
    clean-up); every other integration test uses :func:`mail_servers`, which needs this.
    """
    reason = _unavailable_reason()
    if reason is not None:
        if _in_ci():
            pytest.fail(f"mail servers unavailable in CI: {reason}", pytrace=False)
        pytest.skip(f"mail servers unavailable: {reason}")


@pytest.fixture(scope="session")
def mail_servers(
    mail_server_machine: None,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MailServers]:
    """Running private Dovecot and Postfix on loopback, shared by the whole session."""
    failure: str | None = None
    try:
        servers = start_mail_servers()
    except MailServersError as exc:
        failure = f"mail servers failed to start: {exc}"
    if failure is not None:
        # Outside the except block, so the report shows the reason, not a chain.
        pytest.fail(failure, pytrace=False)
    config = request.config
    config.stash[_SERVERS] = servers
    try:
        yield servers
    finally:
        del config.stash[_SERVERS]
        keep = None
        if config.stash.get(_FAILED, False):
            keep = tmp_path_factory.getbasetemp() / "mail-server-logs"
        servers.stop(keep_logs_in=keep)
        if keep is not None:
            print(f"\nmail server logs of this failing run kept in {keep}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the server log tails to the report of a failing test that used them."""
    report = yield
    servers = item.config.stash.get(_SERVERS, None)
    if (
        report.failed
        and servers is not None
        and "mail_servers" in getattr(item, "fixturenames", ())
    ):
        item.config.stash[_FAILED] = True
        report.sections.append(("mail server logs", servers.log_tails()))
    return report


def mark_drift(items: list[pytest.Item]) -> list[str]:
    """Tests whose ``integration`` mark disagrees with their use of the real servers.

    The mark means "talks to the real servers", and ``-m "not integration"`` relies on
    it: a server-free test carrying it is silently dropped from such runs (the core
    fuzzing was, once), and a server test without it slows down and breaks them. Using
    the servers means requesting ``mail_servers`` (or, for a test that starts its own
    instance, ``mail_server_machine``, which ``mail_servers`` requests too).
    """
    drifted = []
    for item in items:
        marked = item.get_closest_marker("integration") is not None
        uses = "mail_server_machine" in getattr(item, "fixturenames", ())
        if marked and not uses:
            drifted.append(f"{item.nodeid}: marked integration but uses no mail servers")
        elif uses and not marked:
            drifted.append(f"{item.nodeid}: uses the mail servers but is not marked integration")
    return drifted


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse the run when the ``integration`` mark has drifted (before ``-m`` selects,
    so the check holds whichever tests are selected)."""
    drifted = mark_drift(items)
    if drifted:
        raise pytest.UsageError(
            "the integration mark must match the use of the mail_servers fixture:\n  "
            + "\n  ".join(drifted)
        )
