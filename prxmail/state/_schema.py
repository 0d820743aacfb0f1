"""The database schema, its migrations, and rows turned into values.

Theory of operation: each migration is a list of statements run in one transaction
together with the version bump (:meth:`~prxmail.state._db.Database._migrate`); never
edit a released one, append. Rows are read by column name (the connection's
``row_factory`` is :class:`sqlite3.Row`), so a column added to a SELECT list cannot
shift what another column means.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Final

from prxmail.state._model import (
    MailboxState,
    MessageKey,
    MessageRecord,
    MessageStatus,
    OutboxItem,
    OutboxStatus,
)

_MIGRATIONS: Final[Sequence[Sequence[str]]] = (
    # version 1
    (
        """
        CREATE TABLE mailbox (
            account TEXT NOT NULL,
            folder TEXT NOT NULL,
            uidvalidity INTEGER NOT NULL,
            last_uid INTEGER NOT NULL DEFAULT 0 CHECK (last_uid >= 0),
            initialized INTEGER NOT NULL DEFAULT 0 CHECK (initialized IN (0, 1)),
            first_seen_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (account, folder)
        )
        """,
        """
        CREATE TABLE message (
            account TEXT NOT NULL,
            folder TEXT NOT NULL,
            uidvalidity INTEGER NOT NULL,
            uid INTEGER NOT NULL CHECK (uid > 0),
            message_id TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('claimed', 'handling', 'handled', 'replied', 'rejected', 'failed')),
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            claimed_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (account, folder, uidvalidity, uid)
        )
        """,
        "CREATE INDEX message_by_message_id ON message (account, message_id)",
        "CREATE INDEX message_by_status ON message (status, account, folder)",
        """
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id TEXT NOT NULL UNIQUE,
            account TEXT NOT NULL,
            parent_folder TEXT,
            parent_uidvalidity INTEGER,
            parent_uid INTEGER,
            parent_message_id TEXT,
            envelope_from TEXT NOT NULL,
            envelope_to TEXT NOT NULL,
            raw BLOB NOT NULL,
            raw_size INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'sent', 'failed_permanent')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            sent_at REAL
        )
        """,
        # The storage-level backstop for "a reply is never composed twice".
        """
        CREATE UNIQUE INDEX outbox_one_reply_per_parent
            ON outbox (account, parent_folder, parent_uidvalidity, parent_uid)
            WHERE parent_uid IS NOT NULL
        """,
        "CREATE INDEX outbox_due ON outbox (status, next_attempt_at)",
        """
        CREATE TABLE own_message_id (
            message_id TEXT PRIMARY KEY,
            account TEXT NOT NULL,
            created_at REAL NOT NULL
        )
        """,
        "CREATE INDEX own_message_id_age ON own_message_id (created_at)",
    ),
    # version 2: conversations (issue 12). The message table is rebuilt because its
    # status CHECK gains 'deferred' and 'held' (SQLite cannot alter a CHECK); due_at
    # is when a deferred message is handed on again.
    (
        """
        CREATE TABLE message_v2 (
            account TEXT NOT NULL,
            folder TEXT NOT NULL,
            uidvalidity INTEGER NOT NULL,
            uid INTEGER NOT NULL CHECK (uid > 0),
            message_id TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('claimed', 'handling', 'handled', 'replied', 'rejected', 'failed',
                 'deferred', 'held')),
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
            claimed_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            due_at REAL,
            PRIMARY KEY (account, folder, uidvalidity, uid)
        )
        """,
        "INSERT INTO message_v2 (account, folder, uidvalidity, uid, message_id, status,"
        " reason, attempts, claimed_at, updated_at) SELECT account, folder, uidvalidity,"
        " uid, message_id, status, reason, attempts, claimed_at, updated_at FROM message",
        "DROP TABLE message",
        "ALTER TABLE message_v2 RENAME TO message",
        "CREATE INDEX message_by_message_id ON message (account, message_id)",
        "CREATE INDEX message_by_status ON message (status, account, folder)",
        # Every message of a conversation seen or sent, for thread_id lookups and the
        # handler's history.
        """
        CREATE TABLE thread_message (
            account TEXT NOT NULL,
            message_id TEXT NOT NULL,
            thread_id TEXT NOT NULL,
            direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            date TEXT,
            sender TEXT NOT NULL,
            subject TEXT NOT NULL,
            text TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (account, message_id)
        )
        """,
        "CREATE INDEX thread_message_by_thread ON thread_message (account, thread_id, created_at)",
        "CREATE INDEX thread_message_age ON thread_message (created_at)",
        # The loop guard's evidence per thread (ThreadActivity.to_state as JSON).
        """
        CREATE TABLE thread_activity (
            account TEXT NOT NULL,
            thread_id TEXT NOT NULL,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (account, thread_id)
        )
        """,
        # The per-sender rate limiter's buckets (SenderRateLimiter.to_state as JSON).
        """
        CREATE TABLE rate_limiter (
            account TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
    ),
    # version 3: operating a running service from another process (issue 14). The
    # service writes its heartbeat; operator commands bump operator_request so the
    # service notices "retry now" within seconds; operator_log keeps what they did.
    (
        """
        CREATE TABLE heartbeat (
            account TEXT PRIMARY KEY,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            imap TEXT NOT NULL,
            imap_error TEXT,
            imap_error_at REAL,
            smtp_error TEXT,
            smtp_error_at REAL,
            last_connected_at REAL,
            reconnects INTEGER NOT NULL DEFAULT 0,
            stopped_at REAL
        )
        """,
        """
        CREATE TABLE operator_request (
            account TEXT PRIMARY KEY,
            generation INTEGER NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE operator_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            account TEXT NOT NULL,
            at REAL NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            reason TEXT
        )
        """,
    ),
)

#: The schema version this code writes.
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_MESSAGE_COLUMNS: Final = (
    "account, folder, uidvalidity, uid, message_id, status, reason, attempts,"
    " claimed_at, updated_at"
)
_OUTBOX_COLUMNS: Final = (
    "id, message_id, account, parent_folder, parent_uidvalidity, parent_uid,"
    " parent_message_id, envelope_from, envelope_to, raw, status, attempts,"
    " next_attempt_at, last_error, created_at, updated_at, sent_at"
)
_MAILBOX_COLUMNS: Final = (
    "account, folder, uidvalidity, last_uid, initialized, first_seen_at, updated_at"
)


def _message_from_row(row: sqlite3.Row) -> MessageRecord:
    return MessageRecord(
        key=MessageKey(row["account"], row["folder"], row["uidvalidity"], row["uid"]),
        message_id=row["message_id"],
        status=MessageStatus(row["status"]),
        reason=row["reason"],
        attempts=row["attempts"],
        claimed_at=row["claimed_at"],
        updated_at=row["updated_at"],
    )


def _outbox_from_row(row: sqlite3.Row) -> OutboxItem:
    parent = (
        None
        if row["parent_uid"] is None
        else MessageKey(
            row["account"], row["parent_folder"], row["parent_uidvalidity"], row["parent_uid"]
        )
    )
    return OutboxItem(
        id=row["id"],
        message_id=row["message_id"],
        account=row["account"],
        parent=parent,
        parent_message_id=row["parent_message_id"],
        envelope_from=row["envelope_from"],
        envelope_to=tuple(json.loads(row["envelope_to"])),
        raw=bytes(row["raw"]),
        status=OutboxStatus(row["status"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        sent_at=row["sent_at"],
    )


def _mailbox_from_row(row: sqlite3.Row, previous: int | None = None) -> MailboxState:
    return MailboxState(
        account=row["account"],
        folder=row["folder"],
        uidvalidity=row["uidvalidity"],
        last_uid=row["last_uid"],
        initialized=bool(row["initialized"]),
        first_seen_at=row["first_seen_at"],
        updated_at=row["updated_at"],
        previous_uidvalidity=previous,
    )
