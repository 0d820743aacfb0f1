"""Running the doctor: both chains concurrently, the local checks, the output.

Theory of operation: :func:`run_checks` loads the config in a worker thread, then
runs the IMAP and SMTP chains in one nursery, each under
:data:`~._report.CHAIN_TIMEOUT`; every check is guarded, so a bug in one becomes a
FAIL result instead of a crash. :func:`run_doctor` prints the report (text or JSON)
and returns the exit status.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO

import trio

from prxmail._login import AccountLogin
from prxmail._redact import Redactor, config_secrets
from prxmail._tls import shared_ssl_context
from prxmail.config import Config, load_accounts, load_config
from prxmail.doctor._imap import _imap_chain, _imap_names
from prxmail.doctor._local import (
    _check_from_address,
    _check_policy,
    _check_state_db,
    _check_state_dir,
    _config_step,
)
from prxmail.doctor._oauth2 import _oauth2_chain, _oauth2_names
from prxmail.doctor._render import render_accounts, render_text
from prxmail.doctor._report import (
    DoctorReport,
    Status,
    StepResult,
    Timeouts,
    _Chain,
    _redact_step,
)
from prxmail.doctor._smtp import _smtp_chain, _smtp_names
from prxmail.errors import (
    ConfigError,
)


async def run_checks(config_path: Path, *, timeouts: Timeouts | None = None) -> DoctorReport:
    """Run every check and return the report (nothing is printed).

    Args:
        config_path: The configuration file.
        timeouts: Per-step limits; the module defaults when ``None``.

    Returns:
        The report; no exception escapes for problems the checks find.
    """
    limits = timeouts if timeouts is not None else Timeouts()
    try:
        # Loading reads the file and the files it names (password_file, tls_ca_file)
        # and parses certificates: slow disk work that must not block the event loop.
        config = await trio.to_thread.run_sync(load_config, config_path)
    except ConfigError as exc:
        return _config_failed(config_path, exc.problems)
    return await _check_account(config_path, config, limits)


async def run_account_checks(
    config_path: Path, *, account: str | None = None, timeouts: Timeouts | None = None
) -> tuple[DoctorReport, ...]:
    """Check every account of the file (or one), concurrently: one report each.

    Args:
        config_path: The configuration file.
        account: Only the account of this name (``--account``).
        timeouts: Per-step limits; the module defaults when ``None``.

    Returns:
        One report per account, in the file's order, each with its ``account``; a
        single report with a failed ``config`` step when the file cannot be used or
        has no such account.
    """
    limits = timeouts if timeouts is not None else Timeouts()
    try:
        configs = await trio.to_thread.run_sync(load_accounts, config_path)
    except ConfigError as exc:
        return (_config_failed(config_path, exc.problems),)
    if account is not None:
        names = ", ".join(c.name for c in configs)
        configs = tuple(c for c in configs if c.name == account)
        if not configs:
            return (
                _config_failed(
                    config_path,
                    (f"no account {account!r} in {config_path}; its accounts: {names}",),
                    hint="pass one of the names listed, or leave out --account",
                ),
            )
    reports: list[DoctorReport | None] = [None] * len(configs)

    async def check(index: int, config: Config) -> None:
        reports[index] = await _check_account(config_path, config, limits)

    async with trio.open_nursery() as nursery:
        for index, config in enumerate(configs):
            nursery.start_soon(check, index, config)
    return tuple(report for report in reports if report is not None)


def _config_failed(
    config_path: Path,
    problems: Sequence[str],
    hint: str = "fix each key named above; nothing else was checked",
) -> DoctorReport:
    return DoctorReport(
        str(config_path),
        (
            StepResult(
                "config", Status.FAIL, f"{config_path} cannot be used", tuple(problems), hint=hint
            ),
        ),
    )


async def _check_account(config_path: Path, config: Config, limits: Timeouts) -> DoctorReport:
    """Every check of one account (the IMAP and SMTP chains concurrently)."""
    redact = Redactor(config_secrets(config))
    # One login (and one token source) for every check, as in the service: the token
    # the OAuth 2 chain gets is the one the IMAP and SMTP logins use.
    # The trust store is loaded in a thread (tens of ms), like the configuration.
    context = await trio.to_thread.run_sync(shared_ssl_context, config.tls_ca_file)
    login = AccountLogin(config, context)
    oauth2 = _Chain(_oauth2_names(config))
    if oauth2.names:
        oauth2_chain = functools.partial(_oauth2_chain, source=login.token_source)
        await _guarded(oauth2_chain, config, limits, oauth2)
    imap = _Chain(_imap_names(config.imap_security))
    smtp = _Chain(_smtp_names(config.smtp_security))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            _guarded, functools.partial(_imap_chain, login=login), config, limits, imap
        )
        nursery.start_soon(
            _guarded, functools.partial(_smtp_chain, login=login), config, limits, smtp
        )
    # SQLite reads (and a busy database's wait) stay off the event loop too.
    state_db = await trio.to_thread.run_sync(_check_state_db, config)
    steps = [
        _config_step(config_path, config),
        *oauth2.finish(),
        *imap.finish(),
        *smtp.finish(),
        _check_from_address(config),
        _check_policy(config),
        _check_state_dir(config.state_dir),
        state_db,
    ]
    return DoctorReport(
        str(config_path),
        tuple(_redact_step(redact, s) for s in steps),
        account=config.name,
    )


async def _guarded(
    chain_fn: Callable[[Config, Timeouts, _Chain], Awaitable[None]],
    config: Config,
    timeouts: Timeouts,
    chain: _Chain,
) -> None:
    """Run one chain within its time limit; a bug in a check or the limit becomes a FAIL
    of the step that was running, not a crash."""

    def fail_pending(summary: str, hint: str = "") -> None:
        done = {r.name for r in chain.results}
        pending = next((n for n in chain.names if n not in done), None)
        if pending is not None:
            chain.add(pending, Status.FAIL, summary, hint=hint)

    try:
        with trio.move_on_after(timeouts.chain) as scope:
            await chain_fn(config, timeouts, chain)
    except Exception as exc:  # a diagnostic tool must finish its report
        fail_pending(f"unexpected error: {type(exc).__name__}: {exc}")
        return
    if scope.cancelled_caught:
        fail_pending(
            f"the checks did not finish within {timeouts.chain:g} s",
            hint="the server answers very slowly; the service would time out as well",
        )


def run_doctor(config_path: Path, *, as_json: bool, out: TextIO, account: str | None = None) -> int:
    """Run the checks and print one line per step (one block per account).

    A file with one account prints as it always did. With several accounts (or
    ``--account``), the text has one block per account, headed by its name, and the
    JSON is ``{"ok", "config", "accounts": [...]}`` with one report (``account``,
    ``ok``, ``config``, ``steps``) per account.

    Args:
        config_path: The configuration file to check.
        as_json: Print one JSON document (``ok``, ``config``, ``steps``) instead of lines.
        out: Where to print.
        account: Check only this account (``--account NAME``).

    Returns:
        The exit status: 0 when nothing blocks the channel (warnings allowed), 1 when
        a step after ``config`` failed, 2 when the ``config`` step failed (the file is
        missing, unreadable or invalid, so nothing else was checked) -- the worst over
        the accounts.
    """
    reports = trio.run(functools.partial(run_account_checks, config_path, account=account))
    if len(reports) == 1 and account is None:
        (report,) = reports
        if as_json:
            print(json.dumps(report.to_json(), indent=2), file=out)
        else:
            out.write(render_text(report))
        return report.exit_status
    if as_json:
        document = {
            "ok": all(r.ok for r in reports),
            "config": str(config_path),
            "accounts": [{"account": r.account, **r.to_json()} for r in reports],
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        out.write(render_accounts(reports))
    # The statuses are ordered by weight: a config problem (2) over a blocked step (1)
    # over OK (0).
    return max(r.exit_status for r in reports)
