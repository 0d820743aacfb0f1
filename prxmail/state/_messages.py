"""A received message's life: claim, verdicts, handling, outcome, recovery.

Theory of operation: every status change goes through :meth:`MessageMixin._transition`,
which checks :data:`~prxmail.state.TRANSITIONS` first. Claiming records a message
before anything is done with it and raises the folder's high-water mark in the same
transaction, so a message is always either above the mark or has a row. These steps
commit with ``synchronous=NORMAL``: losing a suffix of them to power loss only hands a
message out again (see "Durability settings" in :mod:`prxmail.state`).
"""

# The SQL below is built with f-strings only to splice in the package's own column-list
# constants; every value is passed as a "?" parameter.
# ruff: noqa: S608

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence

import attrs

from prxmail.errors import LocalProtocolError
from prxmail.state._housekeeping import _ID_LOOKUP_CHUNK, OwnIdMixin
from prxmail.state._mailboxes import MailboxMixin
from prxmail.state._model import (
    TRANSITIONS,
    ClaimBatch,
    ClaimOutcome,
    ClaimResult,
    MessageKey,
    MessageRecord,
    MessageStatus,
    RecoveryReport,
    _clip,
    normalize_message_id,
)
from prxmail.state._schema import (
    _MESSAGE_COLUMNS,
    _message_from_row,
)


class MessageMixin(OwnIdMixin, MailboxMixin):
    """A received message's life through the state table."""

    def _get_message(self, conn: sqlite3.Connection, key: MessageKey) -> MessageRecord | None:
        row = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE account = ? AND folder = ?"
            " AND uidvalidity = ? AND uid = ?",
            (key.account, key.folder, key.uidvalidity, key.uid),
        ).fetchone()
        return None if row is None else _message_from_row(row)

    def get_message(self, key: MessageKey) -> MessageRecord | None:
        """Returns: the stored record of a message, or ``None``."""
        with self._transaction() as conn:
            return self._get_message(conn, key)

    def find_by_message_id(self, account: str, message_id: str) -> list[MessageRecord]:
        """Every record in an account with this Message-ID, oldest claim first.

        Args:
            account: From :func:`account_key`.
            message_id: With or without angle brackets.

        Returns:
            The records (usually zero or one).
        """
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE account = ?"
                " AND message_id = ? ORDER BY claimed_at, uid",
                (account, normalize_message_id(message_id)),
            ).fetchall()
        return [_message_from_row(r) for r in rows]

    def claim(self, key: MessageKey, message_id: str) -> ClaimResult:
        """Record a fetched message before doing anything with it.

        In the same transaction the folder's high-water mark is raised to ``key.uid``.
        Claim messages in ascending UID order (or all of a batch with
        :meth:`claim_many`): the mark says "everything up to here is recorded".

        Args:
            key: The message. Its folder must have been synced with this UIDVALIDITY.
            message_id: Its Message-ID (the message model's stable substitute when it
                has none).

        Returns:
            ``CLAIMED`` for a new message (hand it on); ``ALREADY_KNOWN`` with the
            existing record; ``DUPLICATE`` when the Message-ID is known under another
            key (stored as ``rejected``/``duplicate-message-id``; do not hand it on).

        Raises:
            LocalProtocolError: the folder was not synced with ``key.uidvalidity``.
            ValueError: ``message_id`` is empty.
        """
        return self.claim_many([(key, message_id)])[0]

    def claim_many(
        self,
        items: Iterable[tuple[MessageKey, str]],
        *,
        failed: Mapping[MessageKey, str] | None = None,
    ) -> list[ClaimResult]:
        """:meth:`claim` several messages in one transaction.

        Args:
            items: ``(key, message_id)`` pairs.
            failed: Messages among ``items`` that cannot be handled at all (e.g. they
                cannot be parsed), with the reason: each that ends up ``claimed`` is
                made ``failed`` in the same transaction, so the high-water mark never
                passes a message that is neither finished nor pending.

        Returns:
            One :class:`ClaimResult` per item, in order (a record made ``failed``
            through ``failed`` is returned as such).

        Raises:
            LocalProtocolError: a folder was not synced with the key's UIDVALIDITY.
            ValueError: a Message-ID is empty.
        """
        prepared = [(key, normalize_message_id(mid)) for key, mid in items]
        failures = failed or {}
        now = self._clock()
        results: list[ClaimResult] = []
        with self._transaction(durable=False) as conn:
            # A few statements per batch, not four per message (issue 16): the mailbox
            # checks, existing records and known Message-IDs are read up front, then
            # the new rows go in with one executemany. The batch is decided in order
            # exactly as one claim after another would decide it.
            marks = self._claim_marks(conn, prepared)
            known = self._known_records(conn, [key for key, _ in prepared])
            seen = self._known_message_ids(conn, prepared)
            rows: list[tuple[object, ...]] = []
            for key, mid in prepared:
                existing = known.get(key)
                if existing is not None:
                    results.append(ClaimResult(ClaimOutcome.ALREADY_KNOWN, existing))
                    continue
                if (key.account, mid) not in seen:
                    status, reason, outcome = MessageStatus.CLAIMED, None, ClaimOutcome.CLAIMED
                else:
                    status, reason, outcome = (
                        MessageStatus.REJECTED,
                        "duplicate-message-id",
                        ClaimOutcome.DUPLICATE,
                    )
                rows.append(
                    (
                        key.account,
                        key.folder,
                        key.uidvalidity,
                        key.uid,
                        mid,
                        status.value,
                        reason,
                        now,
                        now,
                    )
                )
                record = MessageRecord(key, mid, status, reason, 0, now, now)
                # Later items of the batch see this one as the database would.
                known[key] = record
                seen.add((key.account, mid))
                results.append(ClaimResult(outcome, record))
            conn.executemany(
                f"INSERT INTO message ({_MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                rows,
            )
            for index, result in enumerate(results):
                key = result.record.key
                if key in failures and result.record.status is MessageStatus.CLAIMED:
                    record = self._transition(conn, key, MessageStatus.FAILED, reason=failures[key])
                    results[index] = attrs.evolve(result, record=record)
            for (account, folder), mark in marks.items():
                conn.execute(
                    "UPDATE mailbox SET last_uid = MAX(last_uid, ?), updated_at = ?"
                    " WHERE account = ? AND folder = ?",
                    (mark, now, account, folder),
                )
        return results

    def _claim_marks(
        self, conn: sqlite3.Connection, prepared: Sequence[tuple[MessageKey, str]]
    ) -> dict[tuple[str, str], int]:
        """Check every key's mailbox and UIDVALIDITY; return each mailbox's new mark."""
        mailboxes: dict[tuple[str, str], sqlite3.Row] = {}
        marks: dict[tuple[str, str], int] = {}
        for key, _ in prepared:
            mailbox = (key.account, key.folder)
            row = mailboxes.get(mailbox)
            # Validated per key: a batch may not mix UIDVALIDITYs of one folder.
            if row is None or row["uidvalidity"] != key.uidvalidity:
                row = self._require_mailbox(conn, key.account, key.folder, key.uidvalidity)
                mailboxes[mailbox] = row
            marks[mailbox] = max(marks.get(mailbox, row["last_uid"]), key.uid)
        return marks

    def _known_records(
        self, conn: sqlite3.Connection, keys: Sequence[MessageKey]
    ) -> dict[MessageKey, MessageRecord]:
        """The stored records among ``keys``, a few ``IN`` queries per batch."""
        by_folder: dict[tuple[str, str, int], list[int]] = {}
        for key in keys:
            by_folder.setdefault((key.account, key.folder, key.uidvalidity), []).append(key.uid)
        found: dict[MessageKey, MessageRecord] = {}
        for (account, folder, uidvalidity), uids in by_folder.items():
            unique = sorted(set(uids))
            for start in range(0, len(unique), _ID_LOOKUP_CHUNK):
                chunk = unique[start : start + _ID_LOOKUP_CHUNK]
                rows = conn.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE account = ? AND folder = ?"
                    f" AND uidvalidity = ? AND uid IN ({', '.join('?' * len(chunk))})",
                    (account, folder, uidvalidity, *chunk),
                ).fetchall()
                for row in rows:
                    record = _message_from_row(row)
                    found[record.key] = record
        return found

    def _known_message_ids(
        self, conn: sqlite3.Connection, prepared: Sequence[tuple[MessageKey, str]]
    ) -> set[tuple[str, str]]:
        """``(account, message_id)`` of the batch's Message-IDs already stored."""
        by_account: dict[str, set[str]] = {}
        for key, mid in prepared:
            by_account.setdefault(key.account, set()).add(mid)
        found: set[tuple[str, str]] = set()
        for account, mids in by_account.items():
            ordered = sorted(mids)
            for start in range(0, len(ordered), _ID_LOOKUP_CHUNK):
                chunk = ordered[start : start + _ID_LOOKUP_CHUNK]
                rows = conn.execute(
                    "SELECT DISTINCT message_id FROM message WHERE account = ?"
                    f" AND message_id IN ({', '.join('?' * len(chunk))})",
                    (account, *chunk),
                ).fetchall()
                found.update((account, row[0]) for row in rows)
        return found

    def claim_batch(
        self,
        items: Iterable[tuple[MessageKey, str]],
        *,
        failed: Mapping[MessageKey, str] | None = None,
        message_ids: Iterable[str] = (),
    ) -> ClaimBatch:
        """:meth:`claim_many`, and :meth:`our_message_ids_among` for the Message-IDs the
        sender policy needs, in one call and one transaction (the watcher's one store
        round trip per fetched group).

        Args:
            items: As for :meth:`claim_many`.
            failed: As for :meth:`claim_many`.
            message_ids: Message-IDs (the group's own, In-Reply-To, References) to look
                up among the Message-IDs we sent.

        Returns:
            The claim results and which of ``message_ids`` are ours.

        Raises:
            As :meth:`claim_many`.
        """
        with self._transaction(durable=False):
            results = self.claim_many(items, failed=failed)
            ours = self.our_message_ids_among(message_ids)
        return ClaimBatch(tuple(results), ours)

    def record_verdicts(
        self,
        rejected: Iterable[tuple[MessageKey, str]],
        accepted: MessageKey | None = None,
    ) -> MessageRecord | None:
        """Store the sender policy's verdicts on a claimed group in one transaction.

        Rejected messages become ``rejected``; ``accepted`` (the first accepted message,
        about to be handed on) begins handling. Later accepted messages of the group
        begin one by one, as each is handed on, so a crash counts an attempt only
        against messages a handler actually got.

        Args:
            rejected: ``(key, reason)`` pairs.
            accepted: The message that is handed on next, or ``None``.

        Returns:
            ``accepted``'s updated record (see :meth:`begin_handling`), or ``None``.

        Raises:
            LocalProtocolError: a message is not ``claimed`` (nothing is changed).
        """
        with self._transaction(durable=False) as conn:
            for key, reason in rejected:
                self._transition(conn, key, MessageStatus.REJECTED, reason=reason)
            if accepted is None:
                return None
            return self._transition(conn, accepted, MessageStatus.HANDLING, count_attempt=True)

    def _transition(
        self,
        conn: sqlite3.Connection,
        key: MessageKey,
        to: MessageStatus,
        *,
        reason: str | None = None,
        count_attempt: bool = False,
    ) -> MessageRecord:
        record = self._get_message(conn, key)
        if record is None:
            raise LocalProtocolError(f"no record for {key}; claim it first")
        if to not in TRANSITIONS[record.status]:
            raise LocalProtocolError(
                f"message {key} is {record.status.value}; cannot become {to.value}"
            )
        now = self._clock()
        attempts = record.attempts + (1 if count_attempt else 0)
        stored_reason = None if reason is None else _clip(reason)
        conn.execute(
            "UPDATE message SET status = ?, reason = ?, attempts = ?, updated_at = ?"
            " WHERE account = ? AND folder = ? AND uidvalidity = ? AND uid = ?",
            (
                to.value,
                stored_reason,
                attempts,
                now,
                key.account,
                key.folder,
                key.uidvalidity,
                key.uid,
            ),
        )
        return attrs.evolve(
            record, status=to, reason=stored_reason, attempts=attempts, updated_at=now
        )

    def begin_handling(self, key: MessageKey) -> MessageRecord:
        """``claimed`` -> ``handling``, counting one attempt. Call right before the handler.

        Args:
            key: A claimed message.

        Returns:
            The updated record (``attempts`` includes this one).

        Raises:
            LocalProtocolError: the message is not ``claimed``.
        """
        with self._transaction(durable=False) as conn:
            return self._transition(conn, key, MessageStatus.HANDLING, count_attempt=True)

    def mark_handled(self, key: MessageKey) -> MessageRecord:
        """``handling`` -> ``handled``: the handler succeeded and there is nothing to send.

        Raises:
            LocalProtocolError: the message is not ``handling``.
        """
        with self._transaction(durable=False) as conn:
            return self._transition(conn, key, MessageStatus.HANDLED)

    def finish_and_begin(
        self,
        key: MessageKey,
        outcome: MessageStatus,
        next_key: MessageKey,
        *,
        reason: str | None = None,
    ) -> tuple[MessageRecord, MessageRecord | None]:
        """Finish one message and begin handling the next, in one transaction.

        The channel's hand-over in a catch-up: the consumer finishes message *k* while
        the watcher already holds *k+1*. Both changes commit together, so the outcome
        of *k* is committed no later than *k+1* is handed out (as with
        :meth:`mark_handled` followed by :meth:`begin_handling`), at the cost of one
        commit instead of two. A crash before the commit leaves *k* ``handling``
        (recovered and handed out again) and *k+1* ``claimed`` (pending, with no
        attempt counted); after it, *k* is finished and *k+1* is ``handling`` with
        its attempt counted, as if the two calls had run.

        Args:
            key: A ``handling`` message.
            outcome: ``HANDLED`` or ``FAILED``, with the checks of
                :meth:`mark_handled` or :meth:`mark_failed`.
            next_key: The message about to be handed out; it should be ``claimed``.
            reason: Kept on the record (a ``FAILED`` outcome's reason).

        Returns:
            ``key``'s updated record, and ``next_key``'s (see :meth:`begin_handling`),
            or ``None`` when ``next_key`` cannot begin (it is not ``claimed``): then
            only ``key`` is finished, and the error is the next message's own, for
            whoever begins it.

        Raises:
            LocalProtocolError: ``key`` cannot become ``outcome`` (nothing is changed).
            ValueError: ``outcome`` is not ``HANDLED`` or ``FAILED``.
        """
        if outcome not in (MessageStatus.HANDLED, MessageStatus.FAILED):
            raise ValueError(f"finish_and_begin cannot make a message {outcome.value}")
        with self._transaction(durable=False) as conn:
            # The same checks as mark_handled / mark_failed: the state table's.
            finished = self._transition(conn, key, outcome, reason=reason)
            try:
                begun: MessageRecord | None = self._transition(
                    conn, next_key, MessageStatus.HANDLING, count_attempt=True
                )
            except LocalProtocolError:
                # _transition checks before it writes: nothing of next_key changed.
                begun = None
        return finished, begun

    def mark_rejected(self, key: MessageKey, reason: str) -> MessageRecord:
        """``claimed`` -> ``rejected``: policy refused it (reason kept, e.g. ``"bounce"``).

        Raises:
            LocalProtocolError: the message is not ``claimed``.
        """
        with self._transaction(durable=False) as conn:
            return self._transition(conn, key, MessageStatus.REJECTED, reason=reason)

    def mark_failed(self, key: MessageKey, reason: str) -> MessageRecord:
        """``claimed``/``handling`` -> ``failed``, with the reason. Never retried.

        Raises:
            LocalProtocolError: the message is already finished.
        """
        with self._transaction(durable=False) as conn:
            return self._transition(conn, key, MessageStatus.FAILED, reason=reason)

    def release(self, key: MessageKey, reason: str, *, max_attempts: int) -> MessageRecord:
        """Give a ``handling`` message back for another try, or fail it for good.

        For a failure that was not the message's fault (the handler could not be
        started): back to ``claimed`` while ``attempts < max_attempts``, else ``failed``.

        Args:
            key: A message in ``handling``.
            reason: Why the attempt did not finish (kept on the record).
            max_attempts: Attempts allowed in total.

        Returns:
            The updated record.

        Raises:
            LocalProtocolError: the message is not ``handling``.
        """
        with self._transaction(durable=False) as conn:
            record = self._get_message(conn, key)
            if record is not None and record.attempts >= max_attempts:
                return self._transition(
                    conn, key, MessageStatus.FAILED, reason=f"gave up after retries: {reason}"
                )
            return self._transition(conn, key, MessageStatus.CLAIMED, reason=reason)

    def recover_interrupted(
        self, *, max_attempts: int, account: str | None = None
    ) -> RecoveryReport:
        """Deal with messages left ``handling`` by a crash. Call once at start-up.

        Each is put back to ``claimed`` (it will be handled again) unless it already
        had ``max_attempts`` attempts, in which case it becomes ``failed`` with reason
        ``interrupted-too-often`` -- a message that kills the process must not do so
        forever. Must not run while handlers of this store are active.

        Args:
            max_attempts: Attempts allowed in total (at least 1).
            account: Limit to one account; ``None`` for all.

        Returns:
            The keys retried and the keys failed.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        retried: list[MessageKey] = []
        failed: list[MessageKey] = []
        with self._transaction(durable=False) as conn:
            sql = f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE status = ?"
            params: tuple[str, ...] = (MessageStatus.HANDLING.value,)
            if account is not None:
                sql += " AND account = ?"
                params = (MessageStatus.HANDLING.value, account)
            for row in conn.execute(sql + " ORDER BY uid", params).fetchall():
                record = _message_from_row(row)
                if record.attempts >= max_attempts:
                    self._transition(
                        conn, record.key, MessageStatus.FAILED, reason="interrupted-too-often"
                    )
                    failed.append(record.key)
                else:
                    self._transition(conn, record.key, MessageStatus.CLAIMED, reason="interrupted")
                    retried.append(record.key)
        return RecoveryReport(tuple(retried), tuple(failed))

    def pending(self, account: str, folder: str | None = None) -> list[MessageRecord]:
        """Claimed messages not yet handled, in UID order: work left after a restart.

        Args:
            account: From :func:`account_key`.
            folder: Limit to one folder; ``None`` for all.

        Returns:
            The ``claimed`` records.
        """
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE status = ? AND account = ?"
        params: tuple[str, ...] = (MessageStatus.CLAIMED.value, account)
        if folder is not None:
            sql += " AND folder = ?"
            params = (MessageStatus.CLAIMED.value, account, folder)
        with self._transaction() as conn:
            rows = conn.execute(sql + " ORDER BY folder, uidvalidity, uid", params).fetchall()
        return [_message_from_row(r) for r in rows]

    def messages_with_status(
        self, status: MessageStatus, *, account: str | None = None, limit: int = 100
    ) -> list[MessageRecord]:
        """Records in one status, most recently updated first (for inspection).

        Args:
            status: E.g. ``FAILED`` to see what was given up on and why.
            account: Limit to one account; ``None`` for all.
            limit: At most this many records.

        Returns:
            The records.
        """
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE status = ?"
        params: list[object] = [status.value]
        if account is not None:
            sql += " AND account = ?"
            params.append(account)
        params.append(limit)
        with self._transaction() as conn:
            rows = conn.execute(sql + " ORDER BY updated_at DESC, uid DESC LIMIT ?", params)
            return [_message_from_row(r) for r in rows.fetchall()]
