"""Conversations in the store: parked messages, thread history, limiter state.

Theory of operation: the volume and loop limits (issue 12) never finish a message;
they *park* it. A ``deferred`` message has a ``due_at`` and goes back to
``claimed`` when :meth:`ConversationMixin.wake_deferred` finds it due, so the
channel's ordinary pending path fetches and admits it afresh. A ``held`` one stays
until :meth:`ConversationMixin.release_thread` (an operator's call) puts every held
message of its thread back to ``claimed`` and forgets the thread's loop evidence.
Neither is flagged ``\\Seen`` (only finished messages are), both survive restarts.

Next to them: ``thread_message`` maps every Message-ID we saw or sent to its
``thread_id`` (the lookup :func:`prxmail.conversation.message_thread_id` needs,
one query per group) and holds the history handed to handlers; ``thread_activity``
and ``rate_limiter`` hold the loop guard's and the rate limiter's plain-data state
as JSON. This module does not interpret those: the channel owns the rules, the
store only keeps the data with the status changes it belongs to, in one
transaction (:meth:`ConversationMixin.record_admission`,
:meth:`ConversationMixin.record_reply_in_thread`).
"""

# The SQL below is built with f-strings only to splice in "?" placeholders; every
# value is passed as a parameter.
# ruff: noqa: S608

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any, Final

from prxmail.state._model import (
    MAX_THREAD_HISTORY,
    MAX_THREAD_TEXT_CHARS,
    MESSAGE_RETENTION_SECONDS,
    Direction,
    MessageKey,
    MessageRecord,
    MessageStatus,
    OutboxDraft,
    OutboxItem,
    ParkedMessage,
    ThreadEntry,
    normalize_message_id,
)
from prxmail.state._outbox import OutboxMixin

# Ids per IN (...) lookup: far below SQLite's 32766 bound parameters, and a group's
# lookups (MAX_THREAD_LOOKUPS per message) come in a few such chunks at most.
_LOOKUP_CHUNK: Final = 500


def _clip_text(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_THREAD_TEXT_CHARS:
        return text
    return text[: MAX_THREAD_TEXT_CHARS - 3] + "..."


def _entry_from_row(row: sqlite3.Row) -> ThreadEntry:
    return ThreadEntry(
        message_id=row["message_id"],
        thread_id=row["thread_id"],
        direction=Direction(row["direction"]),
        date=row["date"],
        sender=row["sender"],
        subject=row["subject"],
        text=row["text"],
        created_at=row["created_at"],
    )


class ConversationMixin(OutboxMixin):
    """Parked messages, thread history and the limits' state (see the module comment)."""

    # -- threads -------------------------------------------------------------------

    def thread_ids_among(self, account: str, message_ids: Iterable[str]) -> dict[str, str]:
        """The ``thread_id`` of each of these Message-IDs that we saw or sent.

        Args:
            account: From :func:`account_key`.
            message_ids: Message-IDs in any bracket form (empty ones are skipped).

        Returns:
            Normalised Message-ID -> ``thread_id``, only for the known ones.
        """
        ids: list[str] = []
        for raw in message_ids:
            try:
                ids.append(normalize_message_id(raw))
            except ValueError:
                continue
        unique = list(dict.fromkeys(ids))
        found: dict[str, str] = {}
        with self._transaction() as conn:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[start : start + _LOOKUP_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT message_id, thread_id FROM thread_message WHERE account = ?"
                    f" AND message_id IN ({marks})",
                    (account, *chunk),
                ).fetchall()
                found.update((row["message_id"], row["thread_id"]) for row in rows)
        return found

    def _insert_entry(self, conn: sqlite3.Connection, account: str, entry: ThreadEntry) -> None:
        # OR IGNORE: a message handed on again (after a deferral or a restart) keeps
        # its first entry and place in the history.
        conn.execute(
            "INSERT OR IGNORE INTO thread_message (account, message_id, thread_id, direction,"
            " date, sender, subject, text, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                account,
                entry.message_id,
                entry.thread_id,
                entry.direction.value,
                entry.date,
                entry.sender,
                entry.subject,
                _clip_text(entry.text),
                self._clock(),
            ),
        )

    def _save_activity(
        self, conn: sqlite3.Connection, account: str, threads: Mapping[str, Mapping[str, Any]]
    ) -> None:
        now = self._clock()
        for thread_id, state in threads.items():
            conn.execute(
                "INSERT INTO thread_activity (account, thread_id, state, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (account, thread_id)"
                " DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                (account, thread_id, json.dumps(dict(state)), now),
            )

    def thread_history(
        self,
        account: str,
        thread_id: str,
        *,
        exclude: str | None = None,
        limit: int = MAX_THREAD_HISTORY,
    ) -> list[ThreadEntry]:
        """The messages of a thread we saw or sent, oldest first.

        Args:
            account: From :func:`account_key`.
            thread_id: The thread.
            exclude: A Message-ID to leave out (the message being handled), and with
                it everything recorded after it: the history is what came *before*.
            limit: At most this many, the newest ones.

        Returns:
            The entries, oldest first.
        """
        with self._transaction() as conn:
            params: list[object] = [account, thread_id]
            sql = "SELECT * FROM thread_message WHERE account = ? AND thread_id = ?"
            if exclude is not None:
                mid = normalize_message_id(exclude)
                row = conn.execute(
                    "SELECT created_at FROM thread_message WHERE account = ? AND message_id = ?",
                    (account, mid),
                ).fetchone()
                sql += " AND message_id != ?"
                params.append(mid)
                if row is not None:
                    sql += " AND created_at <= ?"
                    params.append(row["created_at"])
            params.append(limit)
            rows = conn.execute(
                sql + " ORDER BY created_at DESC, rowid DESC LIMIT ?", params
            ).fetchall()
        return [_entry_from_row(row) for row in reversed(rows)]

    def thread_activity(self, account: str, thread_id: str) -> dict[str, Any] | None:
        """The loop guard's stored state of a thread (JSON plain data), or None."""
        return self.thread_activities(account, [thread_id]).get(thread_id)

    def thread_activities(
        self, account: str, thread_ids: Iterable[str]
    ) -> dict[str, dict[str, Any]]:
        """The loop guard's stored states of several threads, in one query per chunk.

        Args:
            account: From :func:`account_key`.
            thread_ids: The threads.

        Returns:
            ``thread_id`` -> state (JSON plain data), only for threads that have one.
        """
        unique = list(dict.fromkeys(thread_ids))
        found: dict[str, dict[str, Any]] = {}
        with self._transaction() as conn:
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[start : start + _LOOKUP_CHUNK]
                marks = ", ".join("?" * len(chunk))
                rows = conn.execute(
                    "SELECT thread_id, state FROM thread_activity WHERE account = ?"
                    f" AND thread_id IN ({marks})",
                    (account, *chunk),
                ).fetchall()
                for row in rows:
                    found[row["thread_id"]] = dict(json.loads(row["state"]))
        return found

    def rate_limiter_state(self, account: str) -> dict[str, Any] | None:
        """The rate limiter's stored buckets (JSON plain data), or None."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT state FROM rate_limiter WHERE account = ?", (account,)
            ).fetchone()
        return None if row is None else dict(json.loads(row["state"]))

    # -- admission -----------------------------------------------------------------

    def record_admission(
        self,
        account: str,
        *,
        rejected: Iterable[tuple[MessageKey, str]] = (),
        deferred: Iterable[tuple[MessageKey, float, str]] = (),
        held: Iterable[tuple[MessageKey, str]] = (),
        accepted: MessageKey | None = None,
        entries: Iterable[ThreadEntry] = (),
        threads: Mapping[str, Mapping[str, Any]] | None = None,
        limiter_state: Mapping[str, Any] | None = None,
    ) -> MessageRecord | None:
        """The admission of a claimed group, in one transaction.

        :meth:`record_verdicts` for the rejected and the first accepted message,
        plus: deferred messages parked until their due time, held ones parked until
        released, the group's thread entries, the loop guard's thread states and the
        rate limiter's buckets.

        Args:
            account: From :func:`account_key`.
            rejected: ``(key, reason)`` of refused messages.
            deferred: ``(key, due_at, reason)``; ``due_at`` on the store's clock.
            held: ``(key, reason)``.
            accepted: The message handed on next, or None.
            entries: Thread entries of the group's messages.
            threads: ``thread_id`` -> loop guard state to store.
            limiter_state: The rate limiter's buckets to store, or None.

        Returns:
            ``accepted``'s updated record, or None.

        Raises:
            LocalProtocolError: a message is not ``claimed`` (nothing is changed).
        """
        now = self._clock()
        with self._transaction(durable=False) as conn:
            for key, due_at, reason in deferred:
                self._transition(conn, key, MessageStatus.DEFERRED, reason=reason)
                self._set_due(conn, key, due_at)
            for key, reason in held:
                self._transition(conn, key, MessageStatus.HELD, reason=reason)
            for entry in entries:
                self._insert_entry(conn, account, entry)
            self._save_activity(conn, account, threads or {})
            if limiter_state is not None:
                conn.execute(
                    "INSERT INTO rate_limiter (account, state, updated_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (account) DO UPDATE SET state = excluded.state,"
                    " updated_at = excluded.updated_at",
                    (account, json.dumps(dict(limiter_state)), now),
                )
            return self.record_verdicts(rejected, accepted)

    def _set_due(self, conn: sqlite3.Connection, key: MessageKey, due_at: float | None) -> None:
        conn.execute(
            "UPDATE message SET due_at = ? WHERE account = ? AND folder = ?"
            " AND uidvalidity = ? AND uid = ?",
            (due_at, key.account, key.folder, key.uidvalidity, key.uid),
        )

    def wake_deferred(
        self, account: str, folder: str, *, now: float | None = None
    ) -> tuple[int, float | None]:
        """Put deferred messages that are due back to ``claimed`` (to be admitted again).

        Args:
            account: From :func:`account_key`.
            folder: The folder.
            now: The time to compare with; default the store's clock.

        Returns:
            How many were woken, and when the next deferred one is due (or None).
        """
        when = self._clock() if now is None else now
        with self._transaction(durable=False) as conn:
            rows = conn.execute(
                "SELECT account, folder, uidvalidity, uid FROM message WHERE status = ?"
                " AND account = ? AND folder = ? AND due_at <= ? ORDER BY uid",
                (MessageStatus.DEFERRED.value, account, folder, when),
            ).fetchall()
            for row in rows:
                key = MessageKey(row["account"], row["folder"], row["uidvalidity"], row["uid"])
                reason = self._get_message(conn, key)
                self._transition(
                    conn,
                    key,
                    MessageStatus.CLAIMED,
                    reason=None if reason is None else reason.reason,
                )
                self._set_due(conn, key, None)
            return len(rows), self._next_deferred(conn, account, folder)

    def _next_deferred(self, conn: sqlite3.Connection, account: str, folder: str) -> float | None:
        row = conn.execute(
            "SELECT MIN(due_at) FROM message WHERE status = ? AND account = ? AND folder = ?",
            (MessageStatus.DEFERRED.value, account, folder),
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def next_deferred_at(self, account: str, folder: str) -> float | None:
        """Returns: when the next deferred message of a folder is due, or None."""
        with self._transaction() as conn:
            return self._next_deferred(conn, account, folder)

    def parked_messages(
        self, account: str, status: MessageStatus | None = None, *, limit: int = 100
    ) -> list[ParkedMessage]:
        """Deferred and held messages (for operators and doctor), oldest claim first.

        Args:
            account: From :func:`account_key`.
            status: ``DEFERRED`` or ``HELD`` only; None for both.
            limit: At most this many.

        Returns:
            The parked messages with their thread, when known.
        """
        statuses = (
            (MessageStatus.DEFERRED.value, MessageStatus.HELD.value)
            if status is None
            else (status.value,)
        )
        marks = ", ".join("?" * len(statuses))
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT m.account, m.folder, m.uidvalidity, m.uid, m.message_id, m.status,"
                " m.reason, m.due_at, t.thread_id FROM message m LEFT JOIN thread_message t"
                " ON t.account = m.account AND t.message_id = m.message_id"
                f" WHERE m.account = ? AND m.status IN ({marks})"
                " ORDER BY m.claimed_at, m.uid LIMIT ?",
                (account, *statuses, limit),
            ).fetchall()
        return [
            ParkedMessage(
                key=MessageKey(row["account"], row["folder"], row["uidvalidity"], row["uid"]),
                message_id=row["message_id"],
                status=MessageStatus(row["status"]),
                reason=row["reason"],
                due_at=row["due_at"],
                thread_id=row["thread_id"],
            )
            for row in rows
        ]

    def release_thread(self, account: str, thread_id: str) -> int:
        """An operator's release of a held thread: its held messages are handed on again.

        Every ``held`` message of the thread goes back to ``claimed`` (the running
        channel admits it at its next pending round, a stopped one at its next start)
        and the thread's loop evidence is forgotten, so it starts afresh; a loop that
        resumes is caught again by the same rule.

        Args:
            account: From :func:`account_key`.
            thread_id: The thread (as logged in the hold WARNING).

        Returns:
            How many messages were released.
        """
        with self._transaction(durable=False) as conn:
            rows = conn.execute(
                "SELECT m.account, m.folder, m.uidvalidity, m.uid FROM message m"
                " JOIN thread_message t ON t.account = m.account AND t.message_id = m.message_id"
                " WHERE m.account = ? AND m.status = ? AND t.thread_id = ? ORDER BY m.uid",
                (account, MessageStatus.HELD.value, thread_id),
            ).fetchall()
            for row in rows:
                key = MessageKey(row["account"], row["folder"], row["uidvalidity"], row["uid"])
                self._transition(conn, key, MessageStatus.CLAIMED, reason="released")
            conn.execute(
                "DELETE FROM thread_activity WHERE account = ? AND thread_id = ?",
                (account, thread_id),
            )
            return len(rows)

    def thread_of(self, account: str, message_id: str) -> str | None:
        """Returns: the ``thread_id`` recorded for a Message-ID, or None."""
        return self.thread_ids_among(account, [message_id]).get(normalize_message_id(message_id))

    # -- our side --------------------------------------------------------------------

    def record_reply_in_thread(
        self,
        key: MessageKey,
        draft: OutboxDraft,
        *,
        entry: ThreadEntry,
        activity: Mapping[str, Any] | None = None,
    ) -> OutboxItem:
        """:meth:`record_reply` plus the reply's thread entry and the thread's new loop
        guard state, in the same transaction.

        Args:
            key: The message being answered; must be ``handling``.
            draft: The composed reply.
            entry: The reply's thread entry (direction ``out``, with its text).
            activity: The thread's loop guard state after noting this reply.

        Returns:
            The queued outbox item.

        Raises:
            LocalProtocolError: as :meth:`record_reply`.
        """
        with self._transaction() as conn:
            item = self.record_reply(key, draft)
            self._insert_entry(conn, key.account, entry)
            if activity is not None:
                self._save_activity(conn, key.account, {entry.thread_id: activity})
            return item

    def enqueue_in_thread(
        self, account: str, draft: OutboxDraft, *, entry: ThreadEntry
    ) -> OutboxItem:
        """:meth:`enqueue` plus the message's thread entry (it starts a thread).

        Args:
            account: The account whose SMTP settings send it.
            draft: The composed message.
            entry: Its thread entry.

        Returns:
            The queued outbox item.

        Raises:
            LocalProtocolError: the Message-ID was used before.
        """
        with self._transaction() as conn:
            item = self.enqueue(account, draft)
            self._insert_entry(conn, account, entry)
            return item

    def prune_conversations(self, *, now: float | None = None) -> int:
        """Forget thread entries and loop evidence older than the message retention.

        Args:
            now: The time to compare with; default the store's clock.

        Returns:
            How many rows were removed.
        """
        cutoff = (self._clock() if now is None else now) - MESSAGE_RETENTION_SECONDS
        with self._transaction() as conn:
            removed = conn.execute(
                "DELETE FROM thread_message WHERE created_at < ?", (cutoff,)
            ).rowcount
            removed += conn.execute(
                "DELETE FROM thread_activity WHERE updated_at < ?", (cutoff,)
            ).rowcount
        return int(removed)
