"""Folders: UIDVALIDITY, the first-start marker and the high-water mark.

Theory of operation: a folder's row holds the UIDVALIDITY it was last seen with and
its high-water mark, the last UID that will never be fetched again. The mark only
moves forward; a UIDVALIDITY change resets it to 0 and clears ``initialized`` (see
"UIDVALIDITY policy" in :mod:`prxmail.state`). Every write to a folder checks the
caller's UIDVALIDITY first, so a stale one is refused instead of moving the mark of
the wrong generation of UIDs.
"""

# The SQL below is built with f-strings only to splice in the package's own column-list
# constants; every value is passed as a "?" parameter.
# ruff: noqa: S608

from __future__ import annotations

import sqlite3

from prxmail.errors import LocalProtocolError
from prxmail.state._db import Database
from prxmail.state._model import (
    MailboxState,
)
from prxmail.state._schema import (
    _MAILBOX_COLUMNS,
    _mailbox_from_row,
)


class MailboxMixin(Database):
    """Folders: UIDVALIDITY, the first-start marker and the high-water mark."""

    def sync_mailbox(self, account: str, folder: str, uidvalidity: int) -> MailboxState:
        """Record the UIDVALIDITY the server reports for a folder (call after SELECT).

        First call for the folder: a row is created (``initialized`` False, mark 0).
        Same UIDVALIDITY: the stored state is returned unchanged. Different UIDVALIDITY:
        the new value is stored, the high-water mark reset to 0 and ``initialized``
        cleared, keeping every message record (see "UIDVALIDITY policy" in the module
        docstring); the result carries ``previous_uidvalidity``.

        Args:
            account: From :func:`account_key`.
            folder: The folder name as selected.
            uidvalidity: The server's UIDVALIDITY.

        Returns:
            The folder's state after the call.
        """
        now = self._clock()
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailbox WHERE account = ? AND folder = ?",
                (account, folder),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO mailbox (account, folder, uidvalidity, last_uid,"
                    " initialized, first_seen_at, updated_at) VALUES (?, ?, ?, 0, 0, ?, ?)",
                    (account, folder, uidvalidity, now, now),
                )
                return MailboxState(account, folder, uidvalidity, 0, False, now, now)
            if row["uidvalidity"] == uidvalidity:
                return _mailbox_from_row(row)
            conn.execute(
                "UPDATE mailbox SET uidvalidity = ?, last_uid = 0, initialized = 0,"
                " updated_at = ? WHERE account = ? AND folder = ?",
                (uidvalidity, now, account, folder),
            )
            return MailboxState(
                account,
                folder,
                uidvalidity,
                0,
                False,
                row["first_seen_at"],
                now,
                previous_uidvalidity=row["uidvalidity"],
            )

    def mailbox(self, account: str, folder: str) -> MailboxState | None:
        """Returns: the stored state of a folder, or ``None`` if never synced."""
        with self._transaction() as conn:
            row = conn.execute(
                f"SELECT {_MAILBOX_COLUMNS} FROM mailbox WHERE account = ? AND folder = ?",
                (account, folder),
            ).fetchone()
        return None if row is None else _mailbox_from_row(row)

    def _require_mailbox(
        self, conn: sqlite3.Connection, account: str, folder: str, uidvalidity: int
    ) -> sqlite3.Row:
        row = conn.execute(
            f"SELECT {_MAILBOX_COLUMNS} FROM mailbox WHERE account = ? AND folder = ?",
            (account, folder),
        ).fetchone()
        if row is None:
            raise LocalProtocolError(f"folder {folder!r} of {account!r} was never synced")
        if row["uidvalidity"] != uidvalidity:
            raise LocalProtocolError(
                f"stale UIDVALIDITY {uidvalidity} for {folder!r} (stored: {row['uidvalidity']})"
            )
        return row  # type: ignore[no-any-return]

    def mark_initialized(
        self, account: str, folder: str, uidvalidity: int, last_uid: int
    ) -> MailboxState:
        """Record that the first-start policy was applied, with its high-water mark.

        Typically ``last_uid`` is UIDNEXT - 1 when the policy is "only new mail", or
        the current mark when it is "unseen mail" (the unseen ones get claimed).
        The mark only moves forward.

        Args:
            account: From :func:`account_key`.
            folder: The folder.
            uidvalidity: The UIDVALIDITY the decision was made under.
            last_uid: Messages up to this UID need not be fetched.

        Returns:
            The folder's state after the call.

        Raises:
            LocalProtocolError: the folder was not synced, or ``uidvalidity`` is stale.
        """
        now = self._clock()
        with self._transaction() as conn:
            row = self._require_mailbox(conn, account, folder, uidvalidity)
            new_last = max(row["last_uid"], last_uid)
            conn.execute(
                "UPDATE mailbox SET last_uid = ?, initialized = 1, updated_at = ?"
                " WHERE account = ? AND folder = ?",
                (new_last, now, account, folder),
            )
            return MailboxState(
                account, folder, uidvalidity, new_last, True, row["first_seen_at"], now
            )

    def advance_high_water_mark(self, account: str, folder: str, uidvalidity: int, uid: int) -> int:
        """Move the high-water mark forward (never back) without claiming a message.

        For UIDs that were fetched and deliberately skipped (e.g. expunged meanwhile).

        Args:
            account: From :func:`account_key`.
            folder: The folder.
            uidvalidity: Must match the stored value.
            uid: The new mark if it is higher than the stored one.

        Returns:
            The mark after the call.

        Raises:
            LocalProtocolError: the folder was not synced, or ``uidvalidity`` is stale.
        """
        with self._transaction(durable=False) as conn:
            row = self._require_mailbox(conn, account, folder, uidvalidity)
            new_last = max(row["last_uid"], uid)
            if new_last != row["last_uid"]:
                conn.execute(
                    "UPDATE mailbox SET last_uid = ?, updated_at = ?"
                    " WHERE account = ? AND folder = ?",
                    (new_last, self._clock(), account, folder),
                )
            return int(new_last)
