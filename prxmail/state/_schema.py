"""The database schema, its migrations, and rows turned into values.

Theory of operation: each migration is a list of statements run in one transaction
together with the version bump (:meth:`~prxmail.state._db.Database._migrate`); never
edit a released one, append. Rows are read by column name (the connection's
``row_factory`` is :class:`sqlite3.Row`), so a column added to a SELECT list cannot
shift what another column means.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

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


def _message_from_row(row: Sequence[Any]) -> MessageRecord:
    return MessageRecord(
        key=MessageKey(row[0], row[1], row[2], row[3]),
        message_id=row[4],
        status=MessageStatus(row[5]),
        reason=row[6],
        attempts=row[7],
        claimed_at=row[8],
        updated_at=row[9],
    )


def _outbox_from_row(row: Sequence[Any]) -> OutboxItem:
    parent = None if row[5] is None else MessageKey(row[2], row[3], row[4], row[5])
    return OutboxItem(
        id=row[0],
        message_id=row[1],
        account=row[2],
        parent=parent,
        parent_message_id=row[6],
        envelope_from=row[7],
        envelope_to=tuple(json.loads(row[8])),
        raw=bytes(row[9]),
        status=OutboxStatus(row[10]),
        attempts=row[11],
        next_attempt_at=row[12],
        last_error=row[13],
        created_at=row[14],
        updated_at=row[15],
        sent_at=row[16],
    )


def _mailbox_from_row(row: Sequence[Any], previous: int | None = None) -> MailboxState:
    return MailboxState(
        account=row[0],
        folder=row[1],
        uidvalidity=row[2],
        last_uid=row[3],
        initialized=bool(row[4]),
        first_seen_at=row[5],
        updated_at=row[6],
        previous_uidvalidity=previous,
    )
