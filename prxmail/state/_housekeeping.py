"""Our own Message-IDs (the loop guard), pruning and the statistics summary.

Theory of operation: the ids of everything we queued are remembered so that mail
answering it can be recognised as a loop; they, sent outbox rows and finished message
records are pruned by age and count so the database stays bounded without anybody
looking after it. Ids of items still queued are never pruned.
"""

# The SQL below is built with f-strings only to splice in the package's own column-list
# constants; every value is passed as a "?" parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Final

from prxmail.state._db import Database
from prxmail.state._model import (
    MESSAGE_RETENTION_SECONDS,
    OWN_ID_MAX_AGE_SECONDS,
    OWN_ID_MAX_COUNT,
    SENT_RETENTION_SECONDS,
    MessageStatus,
    OutboxStatus,
    PruneReport,
    StateStatistics,
    normalize_message_id,
)
from prxmail.state._schema import (
    _MAILBOX_COLUMNS,
    _mailbox_from_row,
)

# are bounded by the message model to far fewer, 500 keeps every statement small.
_ID_LOOKUP_CHUNK: Final = 500


class OwnIdMixin(Database):
    """Our own Message-IDs (the mail-loop guard)."""

    def is_our_message_id(self, message_id: str) -> bool:
        """True when we sent (or queued) mail with this Message-ID: a reply loop.

        Args:
            message_id: With or without angle brackets; empty gives False.

        Returns:
            Whether it is one of ours (within the retention window).
        """
        try:
            mid = normalize_message_id(message_id)
        except ValueError:
            return False
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT 1 FROM own_message_id WHERE message_id = ?", (mid,)
            ).fetchone()
        return row is not None

    def our_message_ids_among(self, message_ids: Iterable[str]) -> frozenset[str]:
        """Which of these Message-IDs are ours, in one query (for the loop guard).

        The policy module wants a synchronous ``is_our_message_id`` predicate; the
        service looks up a message's own id, In-Reply-To and References at once and
        passes :func:`own_id_predicate` of the result.

        Args:
            message_ids: Ids with or without angle brackets; empty ones are ignored.

        Returns:
            The normalised ids (``<...>``) among them that are ours.
        """
        wanted: set[str] = set()
        for mid in message_ids:
            with contextlib.suppress(ValueError):
                wanted.add(normalize_message_id(mid))
        found: set[str] = set()
        ordered = sorted(wanted)
        with self._transaction() as conn:
            # Chunks keep each statement far below SQLite's bound-parameter limit.
            for start in range(0, len(ordered), _ID_LOOKUP_CHUNK):
                chunk = ordered[start : start + _ID_LOOKUP_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT message_id FROM own_message_id WHERE message_id IN ({marks})",
                    chunk,
                ).fetchall()
                found.update(r[0] for r in rows)
        return frozenset(found)

    def remember_message_id(self, account: str, message_id: str) -> None:
        """Record a Message-ID as ours without queueing mail (sent by other means).

        Args:
            account: From :func:`account_key`.
            message_id: The id.
        """
        mid = normalize_message_id(message_id)
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO own_message_id (message_id, account, created_at)"
                " VALUES (?, ?, ?)",
                (mid, account, self._clock()),
            )


class HousekeepingMixin(Database):
    """Pruning and the statistics summary."""

    # -- housekeeping ----------------------------------------------------------------

    def prune(
        self,
        *,
        own_id_max_age: float = OWN_ID_MAX_AGE_SECONDS,
        own_id_max_count: int = OWN_ID_MAX_COUNT,
        sent_retention: float = SENT_RETENTION_SECONDS,
        message_retention: float = MESSAGE_RETENTION_SECONDS,
    ) -> PruneReport:
        """Drop what is old enough to be useless, keeping the database bounded.

        Removes: our Message-IDs older than ``own_id_max_age`` and, beyond the newest
        ``own_id_max_count``, the oldest (ids of queued items are always kept); sent
        outbox rows older than ``sent_retention``; finished message records (not
        ``replied`` with a reply still queued) older than ``message_retention``.
        Permanently failed outbox rows are kept for inspection.

        Returns:
            How many rows of each kind were removed.
        """
        now = self._clock()
        finished = [status.value for status in MessageStatus if status.terminal]
        finished_marks = ", ".join("?" * len(finished))
        queued, sent_status = OutboxStatus.QUEUED.value, OutboxStatus.SENT.value
        keep_queued = "message_id NOT IN (SELECT message_id FROM outbox WHERE status = ?)"
        with self._transaction() as conn:
            own = conn.execute(
                f"DELETE FROM own_message_id WHERE created_at < ? AND {keep_queued}",
                (now - own_id_max_age, queued),
            ).rowcount
            own += conn.execute(
                "DELETE FROM own_message_id WHERE message_id IN ("
                " SELECT message_id FROM own_message_id ORDER BY created_at DESC"
                f" LIMIT -1 OFFSET ?) AND {keep_queued}",
                (own_id_max_count, queued),
            ).rowcount
            sent = conn.execute(
                "DELETE FROM outbox WHERE status = ? AND sent_at < ?",
                (sent_status, now - sent_retention),
            ).rowcount
            messages = conn.execute(
                f"DELETE FROM message WHERE status IN ({finished_marks})"
                " AND updated_at < ? AND NOT EXISTS (SELECT 1 FROM outbox o"
                " WHERE o.account = message.account AND o.parent_folder = message.folder"
                " AND o.parent_uidvalidity = message.uidvalidity"
                " AND o.parent_uid = message.uid AND o.status != ?)",
                (*finished, now - message_retention, sent_status),
            ).rowcount
        return PruneReport(own_message_ids=own, sent_outbox=sent, messages=messages)

    def statistics(self) -> StateStatistics:
        """A consistent snapshot summary for ``doctor`` and logs.

        Returns:
            Outbox counts, message counts by status, and every folder's state.
        """
        with self._transaction() as conn:
            version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            counts = dict(
                conn.execute("SELECT status, COUNT(*) FROM outbox GROUP BY status").fetchall()
            )
            next_at = conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE status = ?",
                (OutboxStatus.QUEUED.value,),
            ).fetchone()[0]
            by_status = {
                MessageStatus(status): n
                for status, n in conn.execute(
                    "SELECT status, COUNT(*) FROM message GROUP BY status"
                ).fetchall()
            }
            mailboxes = conn.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailbox ORDER BY account, folder"
            ).fetchall()
        return StateStatistics(
            schema_version=int(version),
            outbox_queued=int(counts.get(OutboxStatus.QUEUED.value, 0)),
            outbox_failed=int(counts.get(OutboxStatus.FAILED_PERMANENT.value, 0)),
            outbox_next_attempt_at=None if next_at is None else float(next_at),
            messages_by_status={s: by_status.get(s, 0) for s in MessageStatus},
            mailboxes=tuple(_mailbox_from_row(r) for r in mailboxes),
        )
