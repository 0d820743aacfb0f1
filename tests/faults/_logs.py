"""Records of the prxmail logger, for fault tests that assert on logged figures."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from prxmail._log import get_logger


class LogRecords(logging.Handler):
    """Every record the prxmail logger emits, with its structured fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def fields(self, text: str) -> list[dict[str, object]]:
        """The fields of every record whose message contains ``text``, in order."""
        return [dict(getattr(r, "fields", {})) for r in self.records if text in r.getMessage()]


@contextlib.contextmanager
def captured_logs(level: int = logging.INFO) -> Iterator[LogRecords]:
    """Attach a :class:`LogRecords` to the prxmail logger (``level`` and up) for the block."""
    handler = LogRecords()
    logger = get_logger()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
