"""Logging for ``prxmail serve``: stderr, one line per event, human or JSON.

Theory of operation: everything logs through the ``prxmail`` logger with structured
fields passed in ``extra={"fields": {...}}``. :func:`setup_logging` installs one stderr
handler with either formatter. The human format is ``TIME LEVEL message key=value ...``;
the JSON format is one object per line with ``time``, ``level``, ``event`` and the fields,
for log shippers. Field values are never secrets: callers pass addresses, UIDs, reasons
and durations only, and every value is cut to :data:`MAX_FIELD_CHARS` and stripped of
line breaks so one hostile subject line cannot forge or flood log lines.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from collections.abc import Mapping
from typing import Final, TextIO

__all__ = ["LOGGER_NAME", "MAX_FIELD_CHARS", "get_logger", "log_event", "setup_logging"]

LOGGER_NAME: Final = "prxmail"

# Field values (subjects, error texts, handler stderr tails) are cut here: enough to
# recognise the message or the error, small enough that a log line stays one line a
# person can read and a hostile message cannot make our logs large.
MAX_FIELD_CHARS: Final = 300

_HANDLER_MARK: Final = "_prxmail_handler"


def get_logger() -> logging.Logger:
    """Returns: the ``prxmail`` logger everything in the service logs through."""
    return logging.getLogger(LOGGER_NAME)


def _clean(value: object) -> object:
    if isinstance(value, bool | int | float) or value is None:
        return value
    text = str(value)
    text = text.replace("\r", " ").replace("\n", " ").replace("\0", " ")
    if len(text) > MAX_FIELD_CHARS:
        text = text[: MAX_FIELD_CHARS - 3] + "..."
    return text


def log_event(level: int, event: str, /, **fields: object) -> None:
    """Log one event with structured fields.

    Args:
        level: A ``logging`` level.
        event: A short description, e.g. ``"message replied"``.
        fields: Values shown as ``key=value`` (human) or JSON members; ``None`` values
            are left out.
    """
    cleaned = {k: _clean(v) for k, v in fields.items() if v is not None}
    get_logger().log(level, event, extra={"fields": cleaned})


def _fields(record: logging.LogRecord) -> Mapping[str, object]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, Mapping) else {}


class _HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = _dt.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        parts = [f"{when} {record.levelname:<7} {_clean(record.getMessage())}"]
        for key, value in _fields(record).items():
            shown = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else value
            if isinstance(value, str) and value and " " not in value and '"' not in value:
                shown = value
            parts.append(f"{key}={shown}")
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            parts.append(f"error={_clean(f'{type(exc).__name__}: {exc}')!s}")
        return " ".join(parts)


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
        obj: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": _clean(record.getMessage()),
        }
        for key, value in _fields(record).items():
            obj.setdefault(key, value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            obj["error"] = _clean(f"{type(exc).__name__}: {exc}")
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(
    log_format: str = "human", *, stream: TextIO | None = None, level: int = logging.INFO
) -> logging.Handler:
    """Send the ``prxmail`` logger's records to ``stream`` (stderr) in one format.

    Calling it again replaces the handler it installed before (tests run several
    services in one process).

    Args:
        log_format: ``"human"`` or ``"json"``.
        stream: Where lines go; ``sys.stderr`` by default.
        level: The lowest level shown.

    Returns:
        The installed handler.

    Raises:
        ValueError: an unknown format.
    """
    if log_format not in ("human", "json"):
        raise ValueError(f"unknown log format {log_format!r}")
    logger = get_logger()
    for old in list(logger.handlers):
        if getattr(old, _HANDLER_MARK, False):
            logger.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_JSONFormatter() if log_format == "json" else _HumanFormatter())
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
