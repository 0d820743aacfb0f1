"""What operators see and ask for: the service's heartbeat, outbox and message actions.

Theory of operation: ``prxmail status`` / ``outbox`` / ``messages`` run in another
process than ``prxmail serve``, so everything between them goes through the database
(opened ``shared``: no directory lock, short transactions; SQLite's WAL and busy
timeout keep them apart from the service's). The running service writes one
``heartbeat`` row per account (:meth:`OperatorMixin.write_heartbeat`) when its status
changes and at least every ``HEARTBEAT_SECONDS``; a row older than
:data:`HEARTBEAT_STALE_FACTOR` heartbeats means the service is not running.

An operator's action (retry, release, drop) changes the rows and bumps the account's
``operator_request`` generation in the same transaction. SQLite cannot notify another
process, so the service reads that one-row generation every couple of seconds (a
primary-key lookup, no write) and, when it changed, re-reads its pending messages and
its outbox at once instead of at its next backoff step. Every action is recorded in
``operator_log`` with its reason.
"""

# The SQL below is built with f-strings only to splice in the package's own column-list
# constants and "?" marks; every value is passed as a "?" parameter.
# ruff: noqa: S608

from __future__ import annotations

import sqlite3
from typing import Final

from prxmail.errors import LocalProtocolError
from prxmail.state._conversations import ConversationMixin
from prxmail.state._model import (
    AccountHeartbeat,
    AccountSummary,
    MessageKey,
    MessageStatus,
    OperatorMessage,
    OutboxItem,
    OutboxStatus,
    _clip,
)
from prxmail.state._schema import _OUTBOX_COLUMNS, _outbox_from_row

#: A heartbeat older than this many heartbeat intervals means the service stopped (or
#: hangs): one missed write is a busy moment, three in a row is not.
HEARTBEAT_STALE_FACTOR: Final = 3

# Rows one listing returns at most: an operator reads a table, and a store that grew
# to a million failed messages must not be read whole into memory for it.
MAX_LISTED: Final = 1000

# Operator actions are kept this long: enough to answer "who retried that, and why?"
# for any incident review; rare rows, but --all writes one per item, so they age out.
OPERATOR_LOG_RETENTION_SECONDS: Final = 365 * 86400.0

# Message statuses a person asks about with `prxmail messages list`.
_LISTABLE: Final = frozenset(
    {MessageStatus.FAILED, MessageStatus.HELD, MessageStatus.DEFERRED, MessageStatus.REJECTED}
)

_FINISHED: Final = (MessageStatus.HANDLED.value, MessageStatus.REPLIED.value)

# ChannelStatus.imap values of a working session.
_CONNECTED: Final = frozenset({"idle", "polling", "fetching"})


# A message as an operator sees it: its row id (what the commands take) and, from its
# thread entry when there is one, sender and subject.
_OPERATOR_MESSAGE_SELECT: Final = (
    "SELECT m.rowid AS id, m.folder, m.uid, m.message_id, m.status, m.reason,"
    " m.attempts, m.updated_at, m.due_at, t.thread_id, t.sender, t.subject"
    " FROM message m LEFT JOIN thread_message t"
    " ON t.account = m.account AND t.message_id = m.message_id"
)


def _operator_message_from_row(row: sqlite3.Row) -> OperatorMessage:
    return OperatorMessage(
        id=row["id"],
        folder=row["folder"],
        uid=row["uid"],
        message_id=row["message_id"],
        status=MessageStatus(row["status"]),
        reason=row["reason"],
        attempts=row["attempts"],
        updated_at=row["updated_at"],
        due_at=row["due_at"],
        thread_id=row["thread_id"],
        sender=row["sender"],
        subject=row["subject"],
    )


def _heartbeat_from_row(row: sqlite3.Row) -> AccountHeartbeat:
    return AccountHeartbeat(
        account=row["account"],
        pid=row["pid"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
        imap=row["imap"],
        imap_error=row["imap_error"],
        imap_error_at=row["imap_error_at"],
        smtp_error=row["smtp_error"],
        smtp_error_at=row["smtp_error_at"],
        last_connected_at=row["last_connected_at"],
        reconnects=row["reconnects"],
        stopped_at=row["stopped_at"],
    )


class OperatorMixin(ConversationMixin):
    """The heartbeat, account summaries and the operator's actions."""

    # -- the service's side ----------------------------------------------------------

    def write_heartbeat(
        self,
        account: str,
        *,
        pid: int,
        started_at: float,
        imap: str,
        imap_error: str | None,
        smtp_error: str | None,
        reconnects: int,
        stopped: bool = False,
    ) -> AccountHeartbeat:
        """Record the running service's status of one account (its heartbeat).

        The times of the last connection and of each error are kept by the store: an
        error's time is when that text first appeared, the last connection is when
        the IMAP state last became ``idle`` or ``polling``.

        Args:
            account: From :func:`account_key`.
            pid: The service's process id.
            started_at: When the service started (wall clock).
            imap: The channel's IMAP state (``ChannelStatus.imap``).
            imap_error: The last IMAP problem, or ``None``.
            smtp_error: The last SMTP problem, or ``None``.
            reconnects: IMAP sessions that ended in a failure so far.
            stopped: The service is shutting down (``status`` then says so at once).

        Returns:
            The row as stored.
        """
        now = self._clock()
        # Not durable: a heartbeat lost to a power failure is rewritten seconds later.
        with self._transaction(durable=False) as conn:
            row = conn.execute("SELECT * FROM heartbeat WHERE account = ?", (account,)).fetchone()
            # The last errors and connection survive a restart of the service: they are
            # what an operator looks for after it.
            old = None if row is None else _heartbeat_from_row(row)
            was_connected = old is not None and old.pid == pid and old.imap in _CONNECTED
            last_connected = None if old is None else old.last_connected_at
            if imap in _CONNECTED and not was_connected:
                last_connected = now
            imap_last, imap_at = _last_error(
                None if old is None else (old.imap_error, old.imap_error_at), imap_error, now
            )
            smtp_last, smtp_at = _last_error(
                None if old is None else (old.smtp_error, old.smtp_error_at), smtp_error, now
            )
            beat = AccountHeartbeat(
                account=account,
                pid=pid,
                started_at=started_at,
                updated_at=now,
                imap=imap,
                imap_error=imap_last,
                imap_error_at=imap_at,
                smtp_error=smtp_last,
                smtp_error_at=smtp_at,
                last_connected_at=last_connected,
                reconnects=reconnects,
                stopped_at=now if stopped else None,
            )
            conn.execute(
                "INSERT OR REPLACE INTO heartbeat (account, pid, started_at, updated_at, imap,"
                " imap_error, imap_error_at, smtp_error, smtp_error_at, last_connected_at,"
                " reconnects, stopped_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    beat.account,
                    beat.pid,
                    beat.started_at,
                    beat.updated_at,
                    beat.imap,
                    beat.imap_error,
                    beat.imap_error_at,
                    beat.smtp_error,
                    beat.smtp_error_at,
                    beat.last_connected_at,
                    beat.reconnects,
                    beat.stopped_at,
                ),
            )
        return beat

    def operator_generation(self, account: str) -> int:
        """Returns: the account's operator-request counter (0 before any request);
        it changes whenever an operator asked for something the service must notice."""
        with self._transaction(durable=False) as conn:
            row = conn.execute(
                "SELECT generation FROM operator_request WHERE account = ?", (account,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    # -- reading -----------------------------------------------------------------------

    def heartbeat(self, account: str) -> AccountHeartbeat | None:
        """Returns: the last heartbeat the service wrote for an account, or ``None``."""
        with self._transaction(durable=False) as conn:
            row = conn.execute("SELECT * FROM heartbeat WHERE account = ?", (account,)).fetchone()
        return None if row is None else _heartbeat_from_row(row)

    def account_summary(self, account: str) -> AccountSummary:
        """Counts and the last handled message of one account, for ``prxmail status``.

        Args:
            account: From :func:`account_key`.

        Returns:
            The summary (one consistent snapshot).
        """
        with self._transaction(durable=False) as conn:
            by_status = {
                MessageStatus(row[0]): int(row[1])
                for row in conn.execute(
                    "SELECT status, COUNT(*) FROM message WHERE account = ? GROUP BY status",
                    (account,),
                )
            }
            outbox = {
                OutboxStatus(row[0]): int(row[1])
                for row in conn.execute(
                    "SELECT status, COUNT(*) FROM outbox WHERE account = ? GROUP BY status",
                    (account,),
                )
            }
            last = conn.execute(
                "SELECT message_id, updated_at FROM message WHERE account = ? AND status IN"
                " (?, ?) ORDER BY updated_at DESC LIMIT 1",
                (account, *_FINISHED),
            ).fetchone()
        return AccountSummary(
            messages_by_status={s: by_status.get(s, 0) for s in MessageStatus},
            outbox_queued=outbox.get(OutboxStatus.QUEUED, 0),
            outbox_failed=outbox.get(OutboxStatus.FAILED_PERMANENT, 0),
            last_handled_message_id=None if last is None else last["message_id"],
            last_handled_at=None if last is None else last["updated_at"],
        )

    def operator_outbox(self, account: str, *, limit: int = MAX_LISTED) -> list[OutboxItem]:
        """Queued and permanently failed outbox items of an account, by id.

        Args:
            account: From :func:`account_key`.
            limit: At most this many.

        Returns:
            The items (with their bytes: the caller shows only the headers it needs).
        """
        with self._transaction(durable=False) as conn:
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE account = ? AND status IN (?, ?)"
                " ORDER BY id LIMIT ?",
                (account, OutboxStatus.QUEUED.value, OutboxStatus.FAILED_PERMANENT.value, limit),
            ).fetchall()
        return [_outbox_from_row(r) for r in rows]

    def operator_messages(
        self, account: str, status: MessageStatus | None = None, *, limit: int = MAX_LISTED
    ) -> list[OperatorMessage]:
        """Messages an operator may act on: failed, held, deferred, rejected; newest first.

        Args:
            account: From :func:`account_key`.
            status: One of those statuses; ``None`` for all four.
            limit: At most this many.

        Returns:
            The messages, each with the id the operator commands take.

        Raises:
            LocalProtocolError: ``status`` is not one of the four.
        """
        if status is not None and status not in _LISTABLE:
            raise LocalProtocolError(f"messages are not listed by status {status.value}")
        statuses = sorted(s.value for s in _LISTABLE) if status is None else [status.value]
        marks = ", ".join("?" * len(statuses))
        with self._transaction(durable=False) as conn:
            rows = conn.execute(
                f"{_OPERATOR_MESSAGE_SELECT} WHERE m.account = ? AND m.status IN ({marks})"
                " ORDER BY m.updated_at DESC, m.rowid DESC LIMIT ?",
                (account, *statuses, limit),
            ).fetchall()
        return [_operator_message_from_row(row) for row in rows]

    # -- acting ------------------------------------------------------------------------

    def _bump_request(self, conn: sqlite3.Connection, account: str, now: float) -> None:
        conn.execute(
            "INSERT INTO operator_request (account, generation, updated_at) VALUES (?, 1, ?)"
            " ON CONFLICT (account) DO UPDATE SET generation = generation + 1,"
            " updated_at = excluded.updated_at",
            (account, now),
        )

    def _log_action(
        self,
        conn: sqlite3.Connection,
        account: str,
        action: str,
        target: str,
        *,
        reason: str | None = None,
        now: float,
    ) -> None:
        conn.execute(
            "INSERT INTO operator_log (account, at, action, target, reason) VALUES (?, ?, ?, ?, ?)",
            (account, now, action, target, None if reason is None else _clip(reason)),
        )

    def retry_outbox(self, account: str, item_id: int | None = None) -> list[OutboxItem]:
        """Make outbox items due now: a queued one keeps its attempts, a permanently
        failed one goes back to the queue with its attempts reset.

        Args:
            account: From :func:`account_key`.
            item_id: One item; ``None`` for every queued and failed item of the account.

        Returns:
            The items as updated (empty when there was nothing to retry).

        Raises:
            LocalProtocolError: ``item_id`` is not a queued or failed item of the account.
        """
        now = self._clock()
        with self._transaction() as conn:
            if item_id is None:
                items = [
                    _outbox_from_row(r)
                    for r in conn.execute(
                        f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE account = ?"
                        " AND status IN (?, ?) ORDER BY id",
                        (account, OutboxStatus.QUEUED.value, OutboxStatus.FAILED_PERMANENT.value),
                    ).fetchall()
                ]
            else:
                items = [self._operator_outbox_row(conn, account, item_id)]
            updated = []
            for item in items:
                changes: dict[str, object] = {"next_attempt_at": now, "updated_at": now}
                if item.status is OutboxStatus.FAILED_PERMANENT:
                    changes["attempts"] = 0
                updated.append(
                    self._outbox_transition(
                        conn, item, OutboxStatus.QUEUED, expected=item.status, **changes
                    )
                )
                self._log_action(conn, account, "outbox-retry", str(item.id), now=now)
            if updated:
                self._bump_request(conn, account, now)
        return updated

    def drop_outbox(self, account: str, item_id: int, reason: str) -> OutboxItem:
        """Remove a queued or permanently failed item for good (it is never sent).

        Its Message-ID stays known as ours (a reply to it is still recognised), the
        parent message stays ``replied``, and the drop is kept in ``operator_log``
        with its reason.

        Args:
            account: From :func:`account_key`.
            item_id: The item.
            reason: Why (stored; no secrets, please).

        Returns:
            The item as it was before the drop.

        Raises:
            LocalProtocolError: ``item_id`` is not a queued or failed item of the account.
        """
        now = self._clock()
        with self._transaction() as conn:
            item = self._operator_outbox_row(conn, account, item_id)
            conn.execute("DELETE FROM outbox WHERE id = ?", (item.id,))
            self._log_action(conn, account, "outbox-drop", str(item.id), reason=reason, now=now)
            self._bump_request(conn, account, now)
        return item

    def _operator_outbox_row(
        self, conn: sqlite3.Connection, account: str, item_id: int
    ) -> OutboxItem:
        row = conn.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ? AND account = ?",
            (item_id, account),
        ).fetchone()
        item = None if row is None else _outbox_from_row(row)
        if item is None or item.status is OutboxStatus.SENT:
            raise LocalProtocolError(f"no queued or failed outbox item {item_id}")
        return item

    def retry_message(self, account: str, message_id: int) -> OperatorMessage:
        """Hand a failed message to the handler again: ``failed`` -> ``claimed``.

        Its attempts start from 0 again; the running service fetches it at its next
        pending round (woken through the operator request), a stopped one at start.

        Args:
            account: From :func:`account_key`.
            message_id: The id ``prxmail messages list`` shows.

        Returns:
            The message as it was before.

        Raises:
            LocalProtocolError: no such message of the account, or it is not failed.
        """
        now = self._clock()
        with self._transaction() as conn:
            message = self._message_by_rowid(conn, account, message_id)
            if message.status is not MessageStatus.FAILED:
                raise LocalProtocolError(
                    f"message {message_id} is {message.status.value}, not failed"
                )
            key = self._key_of_rowid(conn, message_id)
            self._transition(conn, key, MessageStatus.CLAIMED, reason="retried by operator")
            conn.execute("UPDATE message SET attempts = 0 WHERE rowid = ?", (message_id,))
            self._log_action(conn, account, "message-retry", str(message_id), now=now)
            self._bump_request(conn, account, now)
        return message

    def release_message(self, account: str, message_id: int) -> int:
        """Release the held thread of a message (:meth:`release_thread`).

        Args:
            account: From :func:`account_key`.
            message_id: The id of a ``held`` message (``prxmail messages list``).

        Returns:
            How many messages of its thread were released.

        Raises:
            LocalProtocolError: no such message, it is not held, or its thread is unknown.
        """
        now = self._clock()
        with self._transaction() as conn:
            message = self._message_by_rowid(conn, account, message_id)
            if message.status is not MessageStatus.HELD:
                raise LocalProtocolError(
                    f"message {message_id} is {message.status.value}, not held"
                )
            if message.thread_id is None:
                raise LocalProtocolError(f"message {message_id} has no known thread")
            released = self.release_thread(account, message.thread_id)
            self._log_action(conn, account, "thread-release", message.thread_id, now=now)
            self._bump_request(conn, account, now)
        return released

    def _message_by_rowid(
        self, conn: sqlite3.Connection, account: str, message_id: int
    ) -> OperatorMessage:
        row = conn.execute(
            f"{_OPERATOR_MESSAGE_SELECT} WHERE m.rowid = ? AND m.account = ?",
            (message_id, account),
        ).fetchone()
        if row is None:
            raise LocalProtocolError(f"no message {message_id} in account {account}")
        return _operator_message_from_row(row)

    def _key_of_rowid(self, conn: sqlite3.Connection, message_id: int) -> MessageKey:
        row = conn.execute(
            "SELECT account, folder, uidvalidity, uid FROM message WHERE rowid = ?",
            (message_id,),
        ).fetchone()
        return MessageKey(row["account"], row["folder"], row["uidvalidity"], row["uid"])

    def prune_operator_log(self, *, now: float | None = None) -> int:
        """Forget operator actions older than :data:`OPERATOR_LOG_RETENTION_SECONDS`.

        Args:
            now: Wall-clock time to compare with; default the store's clock.

        Returns:
            How many rows were removed.
        """
        when = self._clock() if now is None else now
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM operator_log WHERE at < ?", (when - OPERATOR_LOG_RETENTION_SECONDS,)
            )
        return cursor.rowcount

    def operator_log(self, account: str, *, limit: int = MAX_LISTED) -> list[dict[str, object]]:
        """Returns: the account's recorded operator actions, newest first (at most
        ``limit``), each with ``at``, ``action``, ``target`` and ``reason``."""
        with self._transaction(durable=False) as conn:
            rows = conn.execute(
                "SELECT at, action, target, reason FROM operator_log WHERE account = ?"
                " ORDER BY id DESC LIMIT ?",
                (account, limit),
            ).fetchall()
        return [dict(row) for row in rows]


def _last_error(
    old: tuple[str | None, float | None] | None, current: str | None, now: float
) -> tuple[str | None, float | None]:
    """The last error and since when: a new text is timed now, the same text keeps
    its time, and no error now keeps the last one (the IMAP state says it is over)."""
    old_text, old_at = old if old else (None, None)
    if current is None:
        return old_text, old_at
    clipped = _clip(current)
    if clipped == old_text and old_at is not None:
        return old_text, old_at
    return clipped, now
