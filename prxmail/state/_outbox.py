"""The outbox: replies and other mail stored before they are sent.

Theory of operation: a reply is inserted in the same FULL transaction that marks its
parent ``replied`` and records its Message-ID as ours, so it is composed at most once.
Every status change of a row goes through :meth:`OutboxMixin._outbox_transition`,
which checks :data:`~prxmail.state.OUTBOX_TRANSITIONS`; rows are read by column name.
"""

# The SQL below is built with f-strings only to splice in the package's own column-list
# constants; every value is passed as a "?" parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any, Final

import attrs

from prxmail.errors import LocalProtocolError
from prxmail.state._messages import MessageMixin
from prxmail.state._model import (
    OUTBOX_TRANSITIONS,
    MessageKey,
    MessageRecord,
    MessageStatus,
    OutboxDraft,
    OutboxItem,
    OutboxStatus,
    RetryPolicy,
    _clip,
)
from prxmail.state._schema import (
    _OUTBOX_COLUMNS,
    _outbox_from_row,
)

# The outbox columns a status change may write besides the status (OutboxItem field
# names); _outbox_transition splices them into its UPDATE, so they are fixed here.
_OUTBOX_MUTABLE: Final = frozenset(
    {"raw", "attempts", "next_attempt_at", "last_error", "updated_at", "sent_at"}
)


class OutboxMixin(MessageMixin):
    """The outbox: replies and other mail stored before they are sent."""

    def _insert_outbox(
        self,
        conn: sqlite3.Connection,
        account: str,
        draft: OutboxDraft,
        parent: MessageRecord | None,
        now: float,
    ) -> OutboxItem:
        known = conn.execute(
            "SELECT 1 FROM own_message_id WHERE message_id = ?", (draft.message_id,)
        ).fetchone()
        if known is not None:
            raise LocalProtocolError(f"Message-ID {draft.message_id} was already used by us")
        pkey = parent.key if parent is not None else None
        cursor = conn.execute(
            "INSERT INTO outbox (message_id, account, parent_folder, parent_uidvalidity,"
            " parent_uid, parent_message_id, envelope_from, envelope_to, raw, raw_size,"
            " status, attempts, next_attempt_at, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
            (
                draft.message_id,
                account,
                None if pkey is None else pkey.folder,
                None if pkey is None else pkey.uidvalidity,
                None if pkey is None else pkey.uid,
                None if parent is None else parent.message_id,
                draft.envelope_from,
                json.dumps(list(draft.envelope_to)),
                draft.raw,
                len(draft.raw),
                OutboxStatus.QUEUED.value,
                now,
                now,
                now,
            ),
        )
        conn.execute(
            "INSERT INTO own_message_id (message_id, account, created_at) VALUES (?, ?, ?)",
            (draft.message_id, account, now),
        )
        assert cursor.lastrowid is not None
        return OutboxItem(
            id=cursor.lastrowid,
            message_id=draft.message_id,
            account=account,
            parent=pkey,
            parent_message_id=None if parent is None else parent.message_id,
            envelope_from=draft.envelope_from,
            envelope_to=draft.envelope_to,
            raw=draft.raw,
            status=OutboxStatus.QUEUED,
            attempts=0,
            next_attempt_at=now,
            last_error=None,
            created_at=now,
            updated_at=now,
            sent_at=None,
        )

    def record_reply(self, key: MessageKey, draft: OutboxDraft) -> OutboxItem:
        """Queue the reply to a message and mark the message ``replied``, atomically.

        One transaction: the outbox row, its Message-ID in the table of ours, and
        ``handling`` -> ``replied``. A second call for the same message fails, so a
        reply is never composed twice (a unique index on the parent backs this up).

        Args:
            key: The message being answered; must be ``handling``.
            draft: The composed reply.

        Returns:
            The queued outbox item (due now).

        Raises:
            LocalProtocolError: the message is not ``handling`` (e.g. already
                ``replied``), or the reply's Message-ID was used before.
        """
        now = self._clock()
        with self._transaction() as conn:
            record = self._transition(conn, key, MessageStatus.REPLIED)
            return self._insert_outbox(conn, key.account, draft, record, now)

    def enqueue(self, account: str, draft: OutboxDraft) -> OutboxItem:
        """Queue a message that is not a reply to a received one (library ``send``).

        Args:
            account: The account whose SMTP settings send it.
            draft: The composed message.

        Returns:
            The queued outbox item (due now).

        Raises:
            LocalProtocolError: the Message-ID was used before.
        """
        now = self._clock()
        with self._transaction() as conn:
            return self._insert_outbox(conn, account, draft, None, now)

    def due_outbox(
        self, *, limit: int = 100, now: float | None = None, account: str | None = None
    ) -> list[OutboxItem]:
        """Queued items whose next attempt is due, oldest due first.

        Args:
            limit: At most this many (a batch bound: each holds its raw message).
            now: Wall-clock time to compare with; default the store's clock.
            account: Only this account's items (:func:`account_key`): several
                accounts share one store, and each sends through its own SMTP login.
                ``None``: every account's.

        Returns:
            The due items.
        """
        when = self._clock() if now is None else now
        where, params = _account_filter(account)
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE status = ?{where}"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                (OutboxStatus.QUEUED.value, *params, when, limit),
            ).fetchall()
        return [_outbox_from_row(r) for r in rows]

    def next_due_at(self, *, account: str | None = None) -> float | None:
        """When the earliest queued item is due.

        Args:
            account: Only this account's items, as for :meth:`due_outbox`.

        Returns:
            Its next attempt time (wall clock), or ``None`` when nothing is queued.
        """
        where, params = _account_filter(account)
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT MIN(next_attempt_at) FROM outbox WHERE status = ?{where}",
                (OutboxStatus.QUEUED.value, *params),
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def get_outbox_item(self, item_id: int) -> OutboxItem | None:
        """Returns: one outbox item by id, or ``None``."""
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (item_id,)
            ).fetchone()
        return None if row is None else _outbox_from_row(row)

    def outbox_items(self, status: OutboxStatus | None = None) -> list[OutboxItem]:
        """Every outbox item, or those with one status (for inspection), by id.

        Args:
            status: Filter; ``None`` for all.

        Returns:
            The items.
        """
        sql = f"SELECT {_OUTBOX_COLUMNS} FROM outbox"
        params: tuple[str, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            params = (status.value,)
        with self._transaction() as conn:
            rows = conn.execute(sql + " ORDER BY id", params).fetchall()
        return [_outbox_from_row(r) for r in rows]

    def _outbox_row(self, conn: sqlite3.Connection, item_id: int) -> OutboxItem:
        row = conn.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (item_id,)
        ).fetchone()
        if row is None:
            raise LocalProtocolError(f"no outbox item {item_id}")
        return _outbox_from_row(row)

    def _outbox_transition(
        self,
        conn: sqlite3.Connection,
        item: OutboxItem,
        to: OutboxStatus,
        *,
        expected: OutboxStatus,
        **changes: Any,
    ) -> OutboxItem:
        """Move ``item`` (as read in this transaction) to ``to``, writing ``changes``
        (OutboxItem field = column name) with it; the one place an outbox status is
        written. ``expected`` is the status the operation starts from: one of the
        table's sources of ``to`` (a requeue and a retry both end ``queued`` but start
        from different statuses)."""
        if item.status is not expected or to not in OUTBOX_TRANSITIONS[item.status]:
            raise LocalProtocolError(
                f"outbox item {item.id} is {item.status.value}, not {expected.value};"
                f" it cannot become {to.value}"
            )
        unknown = set(changes) - _OUTBOX_MUTABLE
        if unknown:  # a bug here, never data: column names are spliced into the SQL
            raise LocalProtocolError(f"not an outbox column to change: {sorted(unknown)}")
        columns = {"status": to.value, **changes}
        conn.execute(
            f"UPDATE outbox SET {', '.join(f'{name} = ?' for name in columns)} WHERE id = ?",
            (*columns.values(), item.id),
        )
        return attrs.evolve(item, status=to, **changes)

    def mark_sent(self, item_id: int) -> OutboxItem:
        """The server accepted the item: mark it sent and drop its bytes.

        The row stays (without the message) for :data:`SENT_RETENTION_SECONDS` so an
        operator can see what went out; :meth:`prune` removes it later.

        Args:
            item_id: A queued item.

        Returns:
            The updated item.

        Raises:
            LocalProtocolError: no such item, or it is not queued.
        """
        with self._transaction() as conn:
            return self._mark_sent(conn, self._outbox_row(conn, item_id), self._clock())

    def _mark_sent(self, conn: sqlite3.Connection, item: OutboxItem, now: float) -> OutboxItem:
        return self._outbox_transition(
            conn,
            item,
            OutboxStatus.SENT,
            expected=OutboxStatus.QUEUED,
            raw=b"",
            attempts=item.attempts + 1,
            sent_at=now,
            updated_at=now,
            last_error=None,
        )

    def mark_sent_many(self, item_ids: Iterable[int]) -> None:
        """:meth:`mark_sent` several items in one transaction: one fsync for a batch the
        server accepted in one pipelined exchange.

        Args:
            item_ids: Queued items.

        Raises:
            LocalProtocolError: an item does not exist or is not queued (nothing is
                changed).
        """
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return
        now = self._clock()
        with self._transaction() as conn:
            for item_id in ids:
                self._mark_sent(conn, self._outbox_row(conn, item_id), now)

    def mark_transient_failure(
        self, item_id: int, error: str, *, policy: RetryPolicy | None = None
    ) -> OutboxItem:
        """A sending attempt failed in a way that may pass: schedule the next one.

        The delay follows ``policy`` (default :attr:`retry_policy`); after its
        ``max_attempts`` the item becomes ``failed_permanent`` instead.

        Args:
            item_id: A queued item.
            error: What went wrong (kept as ``last_error``; no secrets, please).
            policy: The item's account's backoff, when accounts sharing the store
                have their own.

        Returns:
            The updated item.

        Raises:
            LocalProtocolError: no such item, or it is not queued.
        """
        retry = self.retry_policy if policy is None else policy
        now = self._clock()
        with self._transaction() as conn:
            item = self._outbox_row(conn, item_id)
            attempts = item.attempts + 1
            if attempts >= retry.max_attempts:
                status = OutboxStatus.FAILED_PERMANENT
                last_error = _clip(f"gave up after {attempts} attempts: {error}")
                next_at = item.next_attempt_at
            else:
                status = OutboxStatus.QUEUED
                last_error = _clip(error)
                next_at = now + retry.delay(attempts, self._rng)
            return self._outbox_transition(
                conn,
                item,
                status,
                expected=OutboxStatus.QUEUED,
                attempts=attempts,
                next_attempt_at=next_at,
                last_error=last_error,
                updated_at=now,
            )

    def mark_permanent_failure(self, item_id: int, error: str) -> OutboxItem:
        """The item can never be sent as it is: keep it, marked, for inspection.

        Args:
            item_id: A queued item.
            error: The reason (e.g. the SMTP 5xx reply).

        Returns:
            The updated item (its bytes are kept).

        Raises:
            LocalProtocolError: no such item, or it is not queued.
        """
        now = self._clock()
        last_error = _clip(error)
        with self._transaction() as conn:
            item = self._outbox_row(conn, item_id)
            return self._outbox_transition(
                conn,
                item,
                OutboxStatus.FAILED_PERMANENT,
                expected=OutboxStatus.QUEUED,
                attempts=item.attempts + 1,
                last_error=last_error,
                updated_at=now,
            )

    def requeue(self, item_id: int) -> OutboxItem:
        """Put a ``failed_permanent`` item back in the queue, due now (operator action).

        Args:
            item_id: A permanently failed item.

        Returns:
            The updated item (attempts reset).

        Raises:
            LocalProtocolError: no such item, or it is not ``failed_permanent``.
        """
        now = self._clock()
        with self._transaction() as conn:
            return self._outbox_transition(
                conn,
                self._outbox_row(conn, item_id),
                OutboxStatus.QUEUED,
                expected=OutboxStatus.FAILED_PERMANENT,
                attempts=0,
                next_attempt_at=now,
                updated_at=now,
            )


def _account_filter(account: str | None) -> tuple[str, tuple[str, ...]]:
    return ("", ()) if account is None else (" AND account = ?", (account,))
