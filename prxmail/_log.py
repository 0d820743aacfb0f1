"""Logging for ``prxmail serve``: stderr, one line per event, human or JSON.

Theory of operation: everything logs through the ``prxmail`` logger with structured
fields passed in ``extra={"fields": {...}}``. :func:`setup_logging` installs one stderr
handler with either formatter. The human format is ``TIME LEVEL message key=value ...``;
the JSON format is one object per line with ``time``, ``level``, ``event`` and the fields,
for log shippers.

Three guarantees hold for every line, whoever wrote the record, so that no call site can
forget them:

* **No secrets.** A server may echo the password we sent in a ``BYE`` or an error, and
  that text travels on inside exceptions. Every event text, field value and exception
  text goes through one :class:`~prxmail._redact.Redactor` built from the secrets
  registered here -- by :func:`setup_logging` (``secrets=``) and, for as long as a
  service runs, by :func:`redacting`. :func:`log_event` redacts *before* it cuts a value
  to :data:`MAX_FIELD_CHARS`, so a cut can never leave half a password behind; the
  formatters redact again, which also covers records that did not come through
  :func:`log_event` (``exc_info``, other libraries).
* **One event, one line.** Values come from strangers (subjects, file names, server
  texts): line breaks become spaces and every other non-printable character is shown
  escaped (``\\x1b``), in both formats; the JSON format is json-escaped on top.
* **Whose line it is.** A process may serve several accounts; code running for one
  (its channel's tasks, its handler runs, the threads they start) runs inside
  :func:`account_context`, and every line logged there -- by any module -- carries
  ``account=NAME`` first among its fields.
* **Nobody else writes to stderr.** Third-party libraries log too -- mail-parser logs raw
  header text, which a crafted attachment name turns into a forged JSON line when it
  reaches Python's last-resort handler. :func:`setup_logging` therefore also owns the
  root logger: every other logger's records at :data:`THIRD_PARTY_LEVEL` and above go
  through the same formatter (with a ``logger`` field), Python warnings are captured
  into logging, and mail-parser, which warns once per attachment it does not render, is
  held at ERROR unless the application set its level itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import itertools
import json
import logging
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, TextIO

from prxmail._redact import Redactor

__all__ = [
    "LOGGER_NAME",
    "MAX_FIELD_CHARS",
    "THIRD_PARTY_LEVEL",
    "account_context",
    "current_account",
    "get_logger",
    "log_event",
    "redact",
    "redacting",
    "setup_logging",
]

LOGGER_NAME: Final = "prxmail"

# Field values (subjects, error texts, handler stderr tails) are cut here: enough to
# recognise the message or the error, small enough that a log line stays one line a
# person can read and a hostile message cannot make our logs large.
MAX_FIELD_CHARS: Final = 300

# Other libraries' records shown in our log: warnings and errors say something is wrong;
# their INFO/DEBUG chatter (mail-parser alone logs several lines per message part) would
# drown the one line per message the service promises.
THIRD_PARTY_LEVEL: Final = logging.WARNING

# mail-parser warns once for every part it does not turn into text ("Email content
# 'octet-stream' not handled"): one line per attachment of every message, thousands for
# a hostile one. Only its errors are let through.
_MAILPARSER_LOGGER: Final = "mailparser"
_MAILPARSER_LEVEL: Final = logging.ERROR

_HANDLER_MARK: Final = "_prxmail_handler"

# Characters that end a line for someone (str.splitlines, log viewers, terminals): they
# become spaces, so a value can never start a second event.
_LINE_BREAKS: Final = frozenset("\r\n\0\t\v\f\x1c\x1d\x1e\x85\u2028\u2029")


class _SecretRegistry:
    """The secrets to cut out of every log line, from several owners at once.

    Owners are setup_logging (one slot, replaced on each call) and every running
    service (one slot each, removed when it stops). Records are formatted in worker
    threads too, so updates take a lock; readers use the current Redactor as is.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[object, tuple[str | bytes, ...]] = {}
        self._ids = itertools.count()
        self.redactor: Redactor | None = None

    def _rebuild(self) -> None:
        every = [secret for slot in self._slots.values() for secret in slot]
        self.redactor = Redactor(every) if every else None

    def set(self, key: object, secrets: Iterable[str | bytes]) -> None:
        with self._lock:
            kept = tuple(s for s in secrets if s)
            if kept:
                self._slots[key] = kept
            else:
                self._slots.pop(key, None)
            self._rebuild()

    def add(self, secrets: Iterable[str | bytes]) -> object:
        key = ("scope", next(self._ids))
        self.set(key, secrets)
        return key

    def remove(self, key: object) -> None:
        with self._lock:
            self._slots.pop(key, None)
            self._rebuild()


_SECRETS: Final = _SecretRegistry()
_SETUP_SLOT: Final = "setup_logging"


def redact(text: str) -> str:
    """Cut every registered secret out of ``text`` (see :func:`redacting`).

    Args:
        text: Any text about to be shown.

    Returns:
        The text with every form of every registered secret replaced.
    """
    redactor = _SECRETS.redactor
    return text if redactor is None else redactor(text)


@contextlib.contextmanager
def redacting(secrets: Iterable[str | bytes]) -> Iterator[None]:
    """Cut ``secrets`` out of every log line for the duration of the block.

    A service wraps its run in this with its configuration's secrets
    (:func:`prxmail._redact.config_secrets`), so every record logged while it runs --
    by any module, any thread -- is redacted, whichever handler the application
    installed.

    Args:
        secrets: Passwords, tokens and SASL payloads; empty ones are ignored.

    Yields:
        Nothing; the secrets stay registered until the block ends.
    """
    key = _SECRETS.add(secrets)
    try:
        yield
    finally:
        _SECRETS.remove(key)


# The account the running code works for. A context variable, because trio copies the
# context into every task a task starts and trio.to_thread into its threads: set once
# per account task, it reaches everything that account does, and nothing else.
_ACCOUNT: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "prxmail_account", default=None
)
_ACCOUNT_FIELD: Final = "account"


@contextlib.contextmanager
def account_context(name: str) -> Iterator[None]:
    """Mark every log line of the block (and of the tasks it starts) with ``account=name``.

    Args:
        name: The account's name (:attr:`prxmail.config.Config.name`).

    Yields:
        Nothing; the previous account (if any) is back after the block.
    """
    token = _ACCOUNT.set(name)
    try:
        yield
    finally:
        _ACCOUNT.reset(token)


def current_account() -> str | None:
    """Returns: the account set by the innermost :func:`account_context`, or ``None``."""
    return _ACCOUNT.get()


def _with_account(fields: dict[str, object]) -> dict[str, object]:
    account = _ACCOUNT.get()
    if account is None or _ACCOUNT_FIELD in fields:
        return fields
    return {_ACCOUNT_FIELD: account, **fields}


def get_logger() -> logging.Logger:
    """Returns: the ``prxmail`` logger everything in the service logs through."""
    return logging.getLogger(LOGGER_NAME)


def _escape(text: str) -> str:
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ch in _LINE_BREAKS:
            out.append(" ")
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def _clean(value: object) -> object:
    if isinstance(value, bool | int | float) or value is None:
        return value
    # Redact first, cut last: a cut through a secret would leave its start behind,
    # and escaping may lengthen the text.
    text = _escape(redact(str(value)))
    if len(text) > MAX_FIELD_CHARS:
        text = text[: MAX_FIELD_CHARS - 3] + "..."
    return text


def log_event(level: int, event: str, /, **fields: object) -> None:
    """Log one event with structured fields.

    Every value is redacted (registered secrets), made one line and cut to
    :data:`MAX_FIELD_CHARS` here, before any handler sees the record.

    Args:
        level: A ``logging`` level.
        event: A short description, e.g. ``"message replied"``.
        fields: Values shown as ``key=value`` (human) or JSON members; ``None`` values
            are left out. Inside :func:`account_context` an ``account`` field comes
            first unless one is given.
    """
    cleaned = _with_account({k: _clean(v) for k, v in fields.items() if v is not None})
    get_logger().log(level, str(_clean(event)), extra={"fields": cleaned})


def _is_ours(record: logging.LogRecord) -> bool:
    return record.name == LOGGER_NAME or record.name.startswith(LOGGER_NAME + ".")


class _EventFormatter(logging.Formatter):
    """Turns any record into (event, fields), redacted, escaped and bounded."""

    def event(self, record: logging.LogRecord) -> tuple[str, dict[str, object]]:
        try:
            message = record.getMessage()
        except Exception as bad:  # a foreign record with bad %-arguments
            message = f"{record.msg!s} (unformattable arguments: {type(bad).__name__})"
        fields: dict[str, object] = {}
        raw = getattr(record, "fields", None)
        if _is_ours(record) and isinstance(raw, Mapping):
            # Cleaned once by log_event; cleaned again because a record can also be
            # made by hand, and cleaning is idempotent.
            fields = {str(k): _clean(v) for k, v in raw.items() if v is not None}
        elif not _is_ours(record):
            fields["logger"] = _clean(record.name)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error"] = _clean(f"{type(exc).__name__}: {exc}")
        # Also for records made outside log_event (other libraries, exc_info): they
        # are formatted in the thread, and so the context, that logged them.
        return str(_clean(message)), _with_account(fields)


class _HumanFormatter(_EventFormatter):
    def format(self, record: logging.LogRecord) -> str:
        when = _dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        event, fields = self.event(record)
        parts = [f"{when} {record.levelname:<7} {event}"]
        for key, value in fields.items():
            shown = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else value
            if isinstance(value, str) and value and " " not in value and '"' not in value:
                shown = value
            parts.append(f"{key}={shown}")
        return " ".join(parts)


class _JSONFormatter(_EventFormatter):
    def format(self, record: logging.LogRecord) -> str:
        when = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
        event, fields = self.event(record)
        obj: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": event,
        }
        for key, value in fields.items():
            obj.setdefault(key, value)
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(
    log_format: str = "human",
    *,
    stream: TextIO | None = None,
    level: int = logging.INFO,
    secrets: Iterable[str | bytes] = (),
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in one format, secrets removed.

    The ``prxmail`` logger's records at ``level`` and above, and every other logger's
    at :data:`THIRD_PARTY_LEVEL` and above (through the root logger), go through the
    same formatter; nothing reaches Python's unformatted last-resort handler any more.
    Calling it again replaces the handlers and the secrets it installed before (tests
    run several services in one process).

    Args:
        log_format: ``"human"`` or ``"json"``.
        stream: Where lines go; ``sys.stderr`` by default.
        level: The lowest level shown for prxmail's own records.
        secrets: Passwords and tokens cut out of every line (see
            :func:`prxmail._redact.config_secrets`).

    Returns:
        The handler installed on the ``prxmail`` logger.

    Raises:
        ValueError: an unknown format.
    """
    if log_format not in ("human", "json"):
        raise ValueError(f"unknown log format {log_format!r}")
    _SECRETS.set(_SETUP_SLOT, secrets)
    target = stream if stream is not None else sys.stderr
    formatter: logging.Formatter = _JSONFormatter() if log_format == "json" else _HumanFormatter()
    logger = get_logger()
    root = logging.getLogger()
    for owner in (logger, root):
        for old in list(owner.handlers):
            if getattr(old, _HANDLER_MARK, False):
                owner.removeHandler(old)
    handler = logging.StreamHandler(target)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    foreign = logging.StreamHandler(target)
    foreign.setFormatter(formatter)
    foreign.setLevel(THIRD_PARTY_LEVEL)
    setattr(foreign, _HANDLER_MARK, True)
    root.addHandler(foreign)
    # Python's warnings would otherwise be printed raw (several lines each) on stderr.
    logging.captureWarnings(True)
    mailparser = logging.getLogger(_MAILPARSER_LOGGER)
    if mailparser.level == logging.NOTSET:  # the application did not choose one
        mailparser.setLevel(_MAILPARSER_LEVEL)
    return handler
