"""The doctor's report: steps, their results, the limits every step runs under.

Theory of operation: a run produces one :class:`StepResult` per step, collected per
protocol by a :class:`_Chain` that skips every later step after the first failure
(each depends on the one before) and passes every text through the run's
:class:`~prxmail._redact.Redactor`, so no password reaches the report whatever the
server echoes. :class:`DoctorReport` orders them and decides the exit status: any
FAIL blocks the channel.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs

from prxmail._redact import Redactor

# Exit statuses, as ``prxmail serve`` uses them: 2 means "fix the configuration file
# first" (nothing else could be checked), 1 means something else blocks the channel.
EXIT_OK: Final = 0
EXIT_BLOCKED: Final = 1
EXIT_CONFIG: Final = 2

# Step timeouts. Each bounds one step, so a run against hosts that never answer ends
# in well under a minute, and normally in about a second. Resolvers retry for 5 s
# and more when the DNS server is down; a name that has not resolved in 5 s will not
# work for the service either.
DNS_TIMEOUT: Final = 5.0
# All addresses of a host together: a firewall that drops packets makes connect() wait
# for the kernel's SYN retries (more than a minute); 5 s is plenty on any real network.
CONNECT_TIMEOUT: Final = 5.0
# The TLS handshake is two round trips plus certificate checks.
TLS_TIMEOUT: Final = 5.0
# Servers greet at once; one that has not spoken in 5 s is most likely waiting for a
# TLS ClientHello (implicit-TLS port used as STARTTLS / plain).
GREETING_TIMEOUT: Final = 5.0
# One protocol command (CAPABILITY, LOGIN, EXAMINE, EHLO, AUTH). Authentication can be
# slow on purpose (servers delay failed logins by a few seconds), hence 10 s.
COMMAND_TIMEOUT: Final = 10.0
# Saying goodbye (LOGOUT, QUIT) is a courtesy; nothing depends on its answer.
CLOSE_TIMEOUT: Final = 2.0
# The whole of one chain (IMAP or SMTP). A server that answers every step just before
# its own limit could otherwise stretch a run to over a minute; the doctor must end in
# seconds, and a server that slow is itself the problem to report.
CHAIN_TIMEOUT: Final = 30.0

# How many bytes of what the server sent first are kept to recognise plain text, TLS
# records or another protocol: one greeting line is enough to tell.
FIRST_BYTES_KEPT: Final = 512
# At most this many server addresses are tried for TCP (all within CONNECT_TIMEOUT).
MAX_ADDRESSES: Final = 4
# Folder names listed when the configured folder is missing: enough to spot the right
# one, short enough for one line.
MAX_FOLDERS_SHOWN: Final = 12
# Server texts are cut to this many characters: a hostile or chatty server must not
# flood the report.
MAX_SERVER_TEXT: Final = 300
# A certificate that expires sooner than this is a warning: the service would stop
# working within days.
CERT_EXPIRY_WARN_DAYS: Final = 14


_LOGIN_HINT: Final = (
    "check username and password; Gmail and Google Workspace with 2-step verification"
    " need an app password (not the account password), as do iCloud, Yahoo and"
    " Outlook.com; make sure IMAP/SMTP access is enabled in the provider's settings"
)


class Status(enum.Enum):
    """The outcome of one step."""

    PASS = "pass"  # noqa: S105 - a status name
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@attrs.frozen
class StepResult:
    """What one check found.

    Attributes:
        name: Dotted step name, e.g. ``"imap.tls"``.
        status: pass, warn (works but deserves attention), fail (blocks the channel),
            skip (not checked because an earlier step of the same chain failed).
        summary: One line saying what was found.
        detail: More lines (server text, folder list, config problems), may be empty.
        hint: On warn/fail: the fix in plain words, may be empty.
    """

    name: str
    status: Status
    summary: str
    detail: tuple[str, ...] = ()
    hint: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this result."""
        return {
            "name": self.name,
            "status": self.status.value,
            "summary": self.summary,
            "detail": list(self.detail),
            "hint": self.hint,
        }


@attrs.frozen
class DoctorReport:
    """Every step's result, in a fixed order.

    Attributes:
        config_path: The configuration file checked.
        steps: The results: config, IMAP, SMTP, policy, state.
        account: The account checked (:attr:`prxmail.config.Config.name`); ``None``
            when the file could not be used at all.
    """

    config_path: str
    steps: tuple[StepResult, ...]
    account: str | None = None

    @property
    def ok(self) -> bool:
        """True when no step failed (warnings do not block the channel)."""
        return all(step.status is not Status.FAIL for step in self.steps)

    @property
    def exit_status(self) -> int:
        """The process exit status of ``prxmail doctor`` for this report.

        Returns:
            :data:`EXIT_CONFIG` (2) when the ``config`` step failed (the file is
            missing, unreadable or invalid), :data:`EXIT_BLOCKED` (1) when another step
            failed, :data:`EXIT_OK` (0) otherwise (warnings do not block).
        """
        if any(s.name == "config" and s.status is Status.FAIL for s in self.steps):
            return EXIT_CONFIG
        return EXIT_OK if self.ok else EXIT_BLOCKED

    def step(self, name: str) -> StepResult:
        """The result of the step called ``name``.

        Raises:
            KeyError: no such step in this report.
        """
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``ok``, ``config`` and ``steps``."""
        return {
            "ok": self.ok,
            "config": self.config_path,
            "steps": [step.to_json() for step in self.steps],
        }


@attrs.frozen
class Timeouts:
    """Per-step time limits in seconds (see the module constants for the reasons)."""

    dns: float = DNS_TIMEOUT
    connect: float = CONNECT_TIMEOUT
    tls: float = TLS_TIMEOUT
    greeting: float = GREETING_TIMEOUT
    command: float = COMMAND_TIMEOUT
    close: float = CLOSE_TIMEOUT
    chain: float = CHAIN_TIMEOUT


# -- secrets ----------------------------------------------------------------------------


def _redact_step(redact: Redactor, step: StepResult) -> StepResult:
    return StepResult(
        name=step.name,
        status=step.status,
        summary=redact(step.summary),
        detail=tuple(redact(line) for line in step.detail),
        hint=redact(step.hint),
    )


def _server_text(text: str) -> str:
    """A server's text made safe to print: one line, printable, bounded."""
    flat = " ".join(text.split())
    flat = "".join(ch if ch.isprintable() else "?" for ch in flat)
    if len(flat) > MAX_SERVER_TEXT:
        flat = flat[:MAX_SERVER_TEXT] + "..."
    return flat


# -- the chain of steps -----------------------------------------------------------------


class _Chain:
    """The steps of one protocol, in order; after a failure the rest are skipped."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.results: list[StepResult] = []
        self.failed: str | None = None

    def add(
        self,
        name: str,
        status: Status,
        summary: str,
        *,
        detail: Iterable[str] = (),
        hint: str = "",
    ) -> bool:
        """Record a result; return True when the chain may go on."""
        assert name in self.names, name
        self.results.append(StepResult(name, status, summary, tuple(detail), hint))
        if status is Status.FAIL and self.failed is None:
            self.failed = name
        return status is not Status.FAIL

    def finish(self) -> list[StepResult]:
        """The results, with a SKIP for every step that did not run."""
        done = {r.name for r in self.results}
        reason = f"not checked: {self.failed} failed" if self.failed else "not checked"
        skipped = [StepResult(n, Status.SKIP, reason) for n in self.names if n not in done]
        order = {name: i for i, name in enumerate(self.names)}
        return sorted(self.results + skipped, key=lambda r: order[r.name])
