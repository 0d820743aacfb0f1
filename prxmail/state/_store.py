"""Durable state: what was seen, claimed, handled and answered, and the outbox.

Theory of operation
-------------------
Everything prxmail must not forget lives in one SQLite database, ``state.sqlite3``,
inside ``state_dir``. The guarantee it exists for is *nothing lost, nothing answered
twice*, across a SIGKILL at any instant. Three mechanisms give it:

1. **Every change is one transaction.** A crash either happened before ``COMMIT``
   (the change never existed) or after (it is on disk). Changes that must go together
   are made in the same transaction; the important one is :meth:`StateStore.record_reply`,
   which inserts the reply into the outbox, remembers its Message-ID as ours and moves
   the parent message to ``replied`` at once. There is therefore no instant at which
   a reply exists without its parent being marked, or the other way round.

2. **Messages move through a state table** (:data:`TRANSITIONS`)::

       (new) --claim--> claimed --begin_handling--> handling --> handled
                           |                           |     \\-> replied (+ outbox row)
                           |                           |      \\-> failed(reason)
                           \\--> rejected(reason)       \\--(crash; recover_interrupted)
                                                              --> claimed, or failed
                                                                  after max_attempts

   A message is *claimed* (recorded, with its Message-ID) before anything is done with
   it, and claiming also advances the folder's high-water mark (the last UID that will
   never be fetched again) in the same transaction: a message is either above the mark
   (it will be fetched again) or has a row (it will be found by :meth:`pending`), never
   neither. ``begin_handling`` counts an attempt *before* the handler runs, so a message
   whose handler crashes the whole process on every try ends up ``failed`` after
   ``max_attempts`` restarts instead of looping forever. The flip side: a crash after
   the handler finished but before its outcome was committed runs the handler again
   -- handlers are executed *at least once*, their replies are recorded at most once.

3. **The outbox is the only way out.** A reply is stored before it is sent and marked
   sent after the server accepted it. A crash between the server's acceptance and our
   ``COMMIT`` makes the same bytes -- with the same Message-ID -- go out once more on
   restart: SMTP offers no idempotent submission, so that window cannot be closed, but
   the reply is never *composed* twice and receivers' clients collapse the copy by its
   Message-ID.

Durability settings: ``journal_mode=WAL``, and the commit mode chosen per transaction.
WAL lets the read-mostly statistics not block the writer and makes each commit one
append to the WAL file. A commit that returned is in that file in the OS page cache, so
it survives a *process* crash (SIGKILL) in either mode. What differs is *power loss or a
kernel crash*:

* ``synchronous=FULL`` (an fsync per commit) for every change whose loss could answer
  twice or lose mail: the outbox (``record_reply``, ``enqueue``, ``mark_sent``, retries),
  our own Message-IDs, the mailbox's UIDVALIDITY and first-start marker.
* ``synchronous=NORMAL`` (no fsync) for the steps of a message's life before its
  outcome -- ``claim``, ``begin_handling``, ``mark_handled``, ``mark_rejected``,
  ``mark_failed``, ``release``, crash recovery, the high-water mark. WAL frames are
  appended in order and a FULL commit syncs every frame before it, so power loss can
  only roll back a *suffix* of such steps after the last durable change. Each of them
  rolled back leaves the message above the high-water mark or unfinished, so it is
  fetched or handed out again: at least once, which is the contract. None can make a
  reply go out twice, because a reply exists only through a FULL commit
  (``record_reply``) that also makes everything before it durable.

Measured on an ext4 VM disk: FULL manages about 800-1000 commits/s, NORMAL about 4000;
a message's way to its handler used to cost three fsyncs, it now costs none.

Threads: a :class:`StateStore` and its connection belong to the thread that created it
(``check_same_thread=True`` by default, so misuse fails loudly instead of corrupting).
:func:`open_state_store` gives trio code an :class:`AsyncStateStore` with *one dedicated
worker thread* which opens and closes the connection and runs every call that may take
long: each FULL commit (an fsync, 1-2 ms) and each read that can return much data. The
short calls -- the NORMAL commits and small reads of one message, about 80 us each --
run on the trio thread itself when the worker is idle: handing them to a thread and
back cost twice as much as the call (two wake-ups, 100-180 us on the measured VM). A
whole group's claim stays on the worker: it is longer, and while a parse runs in
another thread each of its statements may wait for the GIL. The facade alone decides
who touches the connection and never lets both do so at once (it is opened with
``check_same_thread=False`` for that reason), and calls stay serialised in the order
they were made.

Only one process may use a state directory at a time: the store takes an exclusive
``flock`` on ``state_dir/lock`` and raises :class:`~prxmail.errors.StateError` when
another process holds it (two instances would both answer every message). The kernel
drops the lock when the process dies, even by SIGKILL. ``read_only=True`` opens the
database for inspection without the lock (``prxmail doctor`` next to a running
``serve``); WAL gives such a reader a consistent snapshot.

UIDVALIDITY policy
------------------
When the server reports a different UIDVALIDITY for a folder, every UID we stored for it
is meaningless. :meth:`StateStore.sync_mailbox` then records the new value, resets the
high-water mark to 0 and clears the ``initialized`` marker, so the service treats the
folder as new and applies its first-start policy again. The old per-message records are
*kept*: claiming a message whose Message-ID already has a record in the same account
yields :attr:`ClaimOutcome.DUPLICATE` (the new row is stored as ``rejected`` with reason
``duplicate-message-id``), which is what prevents re-answering the whole mailbox.
"""

# The SQL below is built with f-strings only to splice in the module's own column-list
# constants; every value is passed as a "?" parameter.
# ruff: noqa: S608

from __future__ import annotations

import contextlib
import enum
import json
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import trio

from prxmail.errors import LocalProtocolError, StateError

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DB_FILENAME",
    "SCHEMA_VERSION",
    "TRANSITIONS",
    "AsyncStateStore",
    "ClaimBatch",
    "ClaimOutcome",
    "ClaimResult",
    "MailboxState",
    "MessageKey",
    "MessageRecord",
    "MessageStatus",
    "OutboxDraft",
    "OutboxItem",
    "OutboxStatus",
    "PruneReport",
    "RecoveryReport",
    "RetryPolicy",
    "StateStatistics",
    "StateStore",
    "account_key",
    "normalize_message_id",
    "open_state_store",
    "own_id_predicate",
]

T = TypeVar("T")

DB_FILENAME: Final = "state.sqlite3"
LOCK_FILENAME: Final = "lock"

# How long a statement waits for a lock held by another connection before failing. The
# directory lock keeps other prxmail processes out, so this only covers an operator's
# sqlite3 shell reading the file; a few seconds is plenty and still fails visibly.
BUSY_TIMEOUT_SECONDS: Final = 5.0

# Our own Message-IDs are remembered to recognise replies to them (mail loops). A loop
# closes within minutes to days; 180 days covers a human answering a months-old
# thread. The count cap bounds the table even for a very busy bot (200k ids ~ 20 MB).
OWN_ID_MAX_AGE_SECONDS: Final = 180 * 86400.0
OWN_ID_MAX_COUNT: Final = 200_000

# Sent outbox rows (raw bytes already dropped) are kept this long so an operator can
# see what went out when; after that only the Message-ID (above) is needed.
SENT_RETENTION_SECONDS: Final = 30 * 86400.0

# Finished per-message records are what stops re-answering after a UIDVALIDITY change
# (matched by Message-ID). A folder is rarely re-created with year-old unseen mail in
# it; a year bounds the table while covering any realistic case.
MESSAGE_RETENTION_SECONDS: Final = 365 * 86400.0

# Free-form text we store (failure reasons, SMTP errors) is cut to this many characters:
# enough for a full SMTP reply or a traceback's last line, and no remote party can grow
# the database through an error message.
MAX_REASON_CHARS: Final = 2000


def account_key(username: str, host: str, port: int) -> str:
    """Build the key that separates the state of different accounts.

    Args:
        username: The IMAP login name.
        host: The IMAP server host name (compared case-insensitively).
        port: The IMAP server port.

    Returns:
        ``"user@imap.host:port"``; the same account always gives the same key.
    """
    return f"{username}@{host.strip().lower().rstrip('.')}:{port}"


def normalize_message_id(message_id: str) -> str:
    """Put a Message-ID in the one form we store and compare: ``<left@right>``.

    Surrounding white space and angle brackets are removed and one pair is put back.
    The id is otherwise compared exactly (RFC 5322 gives no case rules for it).

    Args:
        message_id: A Message-ID with or without angle brackets.

    Returns:
        The normalised id.

    Raises:
        ValueError: the id is empty.
    """
    core = message_id.strip().removeprefix("<").removesuffix(">").strip()
    if not core:
        raise ValueError("empty Message-ID")
    return f"<{core}>"


# Ids per IN (...) lookup: SQLite allows 32766 bound parameters; References headers
# are bounded by the message model to far fewer, 500 keeps every statement small.
_ID_LOOKUP_CHUNK: Final = 500


def own_id_predicate(ours: Collection[str]) -> Callable[[str], bool]:
    """Turn :meth:`StateStore.our_message_ids_among` output into a predicate.

    Args:
        ours: Normalised Message-IDs known to be ours.

    Returns:
        A function telling whether a Message-ID (any bracket form) is among them;
        empty or blank ids are not ours.
    """

    def is_ours(message_id: str) -> bool:
        try:
            return normalize_message_id(message_id) in ours
        except ValueError:
            return False

    return is_ours


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


class MessageStatus(enum.Enum):
    """Where a received message is in its life (see :data:`TRANSITIONS`)."""

    CLAIMED = "claimed"
    HANDLING = "handling"
    HANDLED = "handled"
    REPLIED = "replied"
    REJECTED = "rejected"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """True when the message will never be looked at again."""
        return not TRANSITIONS[self]


#: The message state table: every allowed move, in one place. Anything else is a
#: :class:`~prxmail.errors.LocalProtocolError` (a bug in the caller).
TRANSITIONS: Final[Mapping[MessageStatus, frozenset[MessageStatus]]] = {
    MessageStatus.CLAIMED: frozenset(
        {MessageStatus.HANDLING, MessageStatus.REJECTED, MessageStatus.FAILED}
    ),
    MessageStatus.HANDLING: frozenset(
        {
            MessageStatus.HANDLED,
            MessageStatus.REPLIED,
            MessageStatus.FAILED,
            # Back to claimed only through recover_interrupted / release: the attempt
            # counter keeps the number of such round trips bounded.
            MessageStatus.CLAIMED,
        }
    ),
    MessageStatus.HANDLED: frozenset(),
    MessageStatus.REPLIED: frozenset(),
    MessageStatus.REJECTED: frozenset(),
    MessageStatus.FAILED: frozenset(),
}


class OutboxStatus(enum.Enum):
    """Where a queued outgoing message is."""

    QUEUED = "queued"
    SENT = "sent"
    FAILED_PERMANENT = "failed_permanent"


class ClaimOutcome(enum.Enum):
    """What :meth:`StateStore.claim` found."""

    #: New message, now ``claimed``: hand it on.
    CLAIMED = "claimed"
    #: This (account, folder, uidvalidity, uid) already has a record: look at its status.
    ALREADY_KNOWN = "already-known"
    #: Another record in the account has the same Message-ID; this one was recorded as
    #: ``rejected`` (``duplicate-message-id``) and must not be handed on.
    DUPLICATE = "duplicate"


@attrs.frozen
class MessageKey:
    """Identifies one message: account, folder, UIDVALIDITY and UID."""

    account: str
    folder: str
    uidvalidity: int
    uid: int = attrs.field()

    @uid.validator
    def _check_uid(self, _attribute: object, value: int) -> None:
        if value <= 0:
            raise ValueError(f"UIDs are positive, got {value}")


@attrs.frozen
class MessageRecord:
    """The stored state of one received message."""

    key: MessageKey
    message_id: str
    status: MessageStatus
    reason: str | None
    attempts: int
    claimed_at: float
    updated_at: float


@attrs.frozen
class ClaimResult:
    """Result of :meth:`StateStore.claim`: the outcome and the record as stored now."""

    outcome: ClaimOutcome
    record: MessageRecord


@attrs.frozen
class ClaimBatch:
    """Result of :meth:`StateStore.claim_batch`."""

    #: One result per claimed item, in order.
    results: tuple[ClaimResult, ...]
    #: Which of the Message-IDs asked about are ours (normalised, ``"<...>"``).
    ours: frozenset[str]


@attrs.frozen
class MailboxState:
    """Stored state of one folder of one account.

    Attributes:
        last_uid: The high-water mark: messages with this UID or lower are never
            fetched again (they are either recorded or were skipped on purpose).
        initialized: False until the service has applied its first-start policy
            (:meth:`StateStore.mark_initialized`); False again after a UIDVALIDITY
            change.
        previous_uidvalidity: Set only on the :meth:`StateStore.sync_mailbox` result
            that detected a UIDVALIDITY change: the value it replaced.
    """

    account: str
    folder: str
    uidvalidity: int
    last_uid: int
    initialized: bool
    first_seen_at: float
    updated_at: float
    previous_uidvalidity: int | None = None


def _check_envelope_to(_instance: object, _attribute: object, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("an outgoing message needs at least one recipient")


@attrs.frozen
class OutboxDraft:
    """A composed message ready to be queued.

    Attributes:
        message_id: The Message-ID of this message (ours).
        envelope_from: SMTP ``MAIL FROM`` address.
        envelope_to: SMTP ``RCPT TO`` addresses (at least one).
        raw: The complete message bytes for ``DATA``.
    """

    message_id: str = attrs.field(converter=normalize_message_id)
    envelope_from: str
    envelope_to: tuple[str, ...] = attrs.field(converter=tuple, validator=_check_envelope_to)
    raw: bytes = attrs.field(repr=lambda raw: f"<{len(raw)} bytes>")


@attrs.frozen
class OutboxItem:
    """One row of the outbox.

    Attributes:
        parent: The message this replies to, or ``None`` for mail not sent as a reply.
        raw: The bytes to send; empty once sent (they are dropped then).
        next_attempt_at: Wall-clock time (``time.time()``) before which it is not due.
    """

    id: int
    message_id: str
    account: str
    parent: MessageKey | None
    parent_message_id: str | None
    envelope_from: str
    envelope_to: tuple[str, ...]
    raw: bytes = attrs.field(repr=lambda raw: f"<{len(raw)} bytes>")
    status: OutboxStatus
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    updated_at: float
    sent_at: float | None


@attrs.frozen
class RetryPolicy:
    """Backoff for transient send failures: exponential, jittered, capped.

    The n-th failure (n = 1, 2, ...) waits ``min(max_delay, initial_delay *
    multiplier ** (n - 1))`` seconds, minus up to ``jitter`` of that (so a crowd of
    queued replies does not hit a recovering server at the same instant). After
    ``max_attempts`` failed attempts the item becomes ``failed_permanent``.
    The defaults give up after about two days, like a patient MTA.
    """

    initial_delay: float = 30.0
    multiplier: float = 2.0
    max_delay: float = 3600.0
    jitter: float = attrs.field(default=0.25)
    max_attempts: int = 60

    @jitter.validator
    def _check_jitter(self, _attribute: object, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError("jitter is a fraction in [0, 1)")

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after the given number of failed attempts.

        Args:
            failures: Failed attempts so far, at least 1.
            rng: Source of the jitter.

        Returns:
            The delay, in ``[(1 - jitter) * base, base]`` where ``base`` is capped.
        """
        exponent = min(max(failures, 1) - 1, 64)  # 2**64 * anything >> any cap
        base = min(self.max_delay, self.initial_delay * self.multiplier**exponent)
        return base * (1.0 - self.jitter * rng.random())


@attrs.frozen
class RecoveryReport:
    """What :meth:`StateStore.recover_interrupted` did."""

    retried: tuple[MessageKey, ...]
    failed: tuple[MessageKey, ...]


@attrs.frozen
class PruneReport:
    """How many rows :meth:`StateStore.prune` removed."""

    own_message_ids: int
    sent_outbox: int
    messages: int


@attrs.frozen
class StateStatistics:
    """A summary for ``prxmail doctor`` and logs.

    Attributes:
        outbox_queued: Replies waiting to be sent.
        outbox_failed: Replies that failed permanently (kept for inspection).
        outbox_next_attempt_at: When the next queued item is due, or ``None``.
        messages_by_status: Count of message records per status.
        mailboxes: Every known folder with its UIDVALIDITY and last processed UID.
    """

    schema_version: int
    outbox_queued: int
    outbox_failed: int
    outbox_next_attempt_at: float | None
    messages_by_status: Mapping[MessageStatus, int]
    mailboxes: tuple[MailboxState, ...]


# ---------------------------------------------------------------------------------
# Schema and migrations. Each migration is a list of statements run in one
# transaction together with the version bump; never edit a released one, append.

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


def _create_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        # mkdir's mode is filtered by the umask; the state holds mail, so be explicit.
        path.chmod(0o700)
    elif not path.is_dir():
        raise StateError(f"state_dir {str(path)!r} exists and is not a directory")


def _create_private_file(path: Path) -> None:
    # SQLite creates the database (and gives its -wal/-shm files the same mode) with
    # the umask's permissions; create it first so it starts out owner-only.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class StateStore:
    """Synchronous access to the state database (one thread; see the module docstring).

    Use :func:`open_state_store` from trio code. This class is for tests, tools and
    the worker thread behind :class:`AsyncStateStore`.

    Args:
        state_dir: Directory holding the database; created with mode 0700 if missing.
        retry_policy: Backoff for :meth:`mark_transient_failure`.
        rng: Random source for the backoff jitter (inject a seeded one in tests).
        clock: Wall-clock time source (``time.time``); stored times use it.
        prune_on_open: Run :meth:`prune` once when opening, so the database stays
            bounded even if nobody calls it.
        read_only: Open for inspection only (``prxmail doctor`` while ``serve``
            runs): no directory lock, nothing created, migrated or pruned, every
            write fails with :class:`~prxmail.errors.StateError`. WAL lets this
            reader see a consistent snapshot while the service writes.
        check_same_thread: ``False`` lets threads other than the creating one use the
            store; the caller must then make sure no two use it at the same time
            (:class:`AsyncStateStore` does).

    Raises:
        StateError: another process uses ``state_dir`` (not for ``read_only``), the
            database comes from a newer prxmail (or, read-only, does not exist or
            needs a migration), or SQLite cannot open it.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        retry_policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        prune_on_open: bool = True,
        read_only: bool = False,
        check_same_thread: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._check_same_thread = check_same_thread
        self.read_only = read_only
        self.retry_policy = retry_policy or RetryPolicy()
        # Not cryptographic: only spreads retry times.
        self._rng = rng or random.Random()  # noqa: S311
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # The connection's current PRAGMA synchronous (FULL or NORMAL), so that
        # switching it costs a statement only when it changes.
        self._synchronous = "FULL"
        self._in_transaction = False
        db_path = self.state_dir / DB_FILENAME
        if read_only:
            self._open_read_only(db_path)
            return
        _create_private_dir(self.state_dir)
        self._acquire_dir_lock()
        try:
            _create_private_file(db_path)
            try:
                self._conn = sqlite3.connect(
                    db_path,
                    timeout=BUSY_TIMEOUT_SECONDS,
                    # We issue BEGIN/COMMIT ourselves: every write is explicit.
                    isolation_level=None,
                    check_same_thread=check_same_thread,
                )
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StateError(f"cannot switch {db_path} to WAL mode (got {mode!r})")
                self._conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise StateError(f"cannot open state database {db_path}: {exc}") from exc
            self._migrate()
            if prune_on_open:
                self.prune()
        except BaseException:
            self.close()
            raise

    def _open_read_only(self, db_path: Path) -> None:
        if not db_path.is_file():
            raise StateError(f"no state database at {db_path} (prxmail has not run there yet)")
        try:
            self._conn = sqlite3.connect(
                f"{db_path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=self._check_same_thread,
            )
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise StateError(f"cannot read state database {db_path}: {exc}") from exc
        version = row[0] or 0
        if version != SCHEMA_VERSION:
            self.close()
            raise StateError(
                f"the state database has schema version {version}, this prxmail reads"
                f" {SCHEMA_VERSION}; "
                + ("upgrade prxmail" if version > SCHEMA_VERSION else "run prxmail serve once")
            )

    # -- lifecycle -----------------------------------------------------------------

    def _acquire_dir_lock(self) -> None:
        if sys.platform == "win32":  # pragma: no cover - no flock; single instance unchecked
            return
        fd = os.open(self.state_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", errors="replace").strip()
            os.close(fd)
            shown = f" (pid {holder})" if holder.isdigit() else ""
            raise StateError(
                f"state_dir {str(self.state_dir)!r} is in use by another prxmail process{shown}"
            ) from exc
        # The holder's pid, for the error message above; informational only.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._lock_fd = fd

    def close(self) -> None:
        """Close the database and release the directory lock. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._conn is None

    @contextlib.contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; ``durable=False`` commits without an fsync (see the module
        docstring, "Durability settings": only for changes whose loss on power failure
        hands a message out again and can never answer twice)."""
        conn = self._conn
        if conn is None:
            raise LocalProtocolError("the state store is closed")
        level = "FULL" if durable else "NORMAL"
        if self._in_transaction:
            # Nested (a method composed of others): part of the enclosing transaction,
            # committed with it and in its mode.
            yield conn
            return
        if level != self._synchronous and not self.read_only:
            try:
                # Allowed between transactions only; it applies to the next COMMIT.
                conn.execute(f"PRAGMA synchronous={level}")
            except sqlite3.Error as exc:
                raise StateError(f"cannot set the commit mode: {exc}") from exc
            self._synchronous = level
        try:
            # IMMEDIATE takes the write lock up front, so a transaction never fails
            # half-way through for lack of it. A reader only needs a snapshot.
            conn.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StateError(f"cannot start a state transaction: {exc}") from exc
        self._in_transaction = True
        try:
            yield conn
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StateError(f"state database error: {exc}") from exc
            raise
        finally:
            self._in_transaction = False
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StateError(f"cannot commit state change: {exc}") from exc

    def _migrate(self) -> None:
        with self._transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER NOT NULL, migrated_at REAL NOT NULL)"
            )
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise StateError(
                    f"the state database has schema version {current}, this prxmail"
                    f" only knows up to {SCHEMA_VERSION}; upgrade prxmail"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version - 1]:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, migrated_at) VALUES (?, ?)",
                    (version, self._clock()),
                )

    def schema_version(self) -> int:
        """Returns: the schema version of the open database."""
        with self._transaction() as conn:
            return int(conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # -- mailboxes -------------------------------------------------------------------

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
            if row[2] == uidvalidity:
                return _mailbox_from_row(row)
            conn.execute(
                "UPDATE mailbox SET uidvalidity = ?, last_uid = 0, initialized = 0,"
                " updated_at = ? WHERE account = ? AND folder = ?",
                (uidvalidity, now, account, folder),
            )
            return MailboxState(
                account, folder, uidvalidity, 0, False, row[5], now, previous_uidvalidity=row[2]
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
    ) -> Sequence[Any]:
        row = conn.execute(
            f"SELECT {_MAILBOX_COLUMNS} FROM mailbox WHERE account = ? AND folder = ?",
            (account, folder),
        ).fetchone()
        if row is None:
            raise LocalProtocolError(f"folder {folder!r} of {account!r} was never synced")
        if row[2] != uidvalidity:
            raise LocalProtocolError(
                f"stale UIDVALIDITY {uidvalidity} for {folder!r} (stored: {row[2]})"
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
            new_last = max(row[3], last_uid)
            conn.execute(
                "UPDATE mailbox SET last_uid = ?, initialized = 1, updated_at = ?"
                " WHERE account = ? AND folder = ?",
                (new_last, now, account, folder),
            )
            return MailboxState(account, folder, uidvalidity, new_last, True, row[5], now)

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
            new_last = max(row[3], uid)
            if new_last != row[3]:
                conn.execute(
                    "UPDATE mailbox SET last_uid = ?, updated_at = ?"
                    " WHERE account = ? AND folder = ?",
                    (new_last, self._clock(), account, folder),
                )
            return int(new_last)

    # -- messages --------------------------------------------------------------------

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
            marks: dict[tuple[str, str], int] = {}
            for key, mid in prepared:
                mailbox = (key.account, key.folder)
                # Validated per key: a batch may not mix UIDVALIDITYs of one folder.
                row = self._require_mailbox(conn, key.account, key.folder, key.uidvalidity)
                marks[mailbox] = max(marks.get(mailbox, row[3]), key.uid)
                existing = self._get_message(conn, key)
                if existing is not None:
                    results.append(ClaimResult(ClaimOutcome.ALREADY_KNOWN, existing))
                    continue
                other = conn.execute(
                    "SELECT 1 FROM message WHERE account = ? AND message_id = ? LIMIT 1",
                    (key.account, mid),
                ).fetchone()
                if other is None:
                    status, reason, outcome = MessageStatus.CLAIMED, None, ClaimOutcome.CLAIMED
                else:
                    status, reason, outcome = (
                        MessageStatus.REJECTED,
                        "duplicate-message-id",
                        ClaimOutcome.DUPLICATE,
                    )
                conn.execute(
                    f"INSERT INTO message ({_MESSAGE_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
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
                    ),
                )
                record = MessageRecord(key, mid, status, reason, 0, now, now)
                results.append(ClaimResult(outcome, record))
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
            sql = f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE status = 'handling'"
            params: tuple[str, ...] = ()
            if account is not None:
                sql += " AND account = ?"
                params = (account,)
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
        sql = f"SELECT {_MESSAGE_COLUMNS} FROM message WHERE status = 'claimed' AND account = ?"
        params: tuple[str, ...] = (account,)
        if folder is not None:
            sql += " AND folder = ?"
            params = (account, folder)
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

    # -- outbox ----------------------------------------------------------------------

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
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?)",
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

    def due_outbox(self, *, limit: int = 100, now: float | None = None) -> list[OutboxItem]:
        """Queued items whose next attempt is due, oldest due first.

        Args:
            limit: At most this many (a batch bound: each holds its raw message).
            now: Wall-clock time to compare with; default the store's clock.

        Returns:
            The due items.
        """
        when = self._clock() if now is None else now
        with self._transaction() as conn:
            rows = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE status = 'queued'"
                " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                (when, limit),
            ).fetchall()
        return [_outbox_from_row(r) for r in rows]

    def next_due_at(self) -> float | None:
        """Returns: when the earliest queued item is due (wall clock), or ``None``."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'queued'"
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

    def _queued_item(self, conn: sqlite3.Connection, item_id: int) -> OutboxItem:
        row = conn.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (item_id,)
        ).fetchone()
        if row is None:
            raise LocalProtocolError(f"no outbox item {item_id}")
        item = _outbox_from_row(row)
        if item.status is not OutboxStatus.QUEUED:
            raise LocalProtocolError(f"outbox item {item_id} is {item.status.value}, not queued")
        return item

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
        now = self._clock()
        with self._transaction() as conn:
            item = self._queued_item(conn, item_id)
            conn.execute(
                "UPDATE outbox SET status = 'sent', raw = X'', attempts = attempts + 1,"
                " sent_at = ?, updated_at = ?, last_error = NULL WHERE id = ?",
                (now, now, item_id),
            )
        return attrs.evolve(
            item,
            status=OutboxStatus.SENT,
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
                row = conn.execute("SELECT status FROM outbox WHERE id = ?", (item_id,)).fetchone()
                if row is None:
                    raise LocalProtocolError(f"no outbox item {item_id}")
                if row[0] != OutboxStatus.QUEUED.value:
                    raise LocalProtocolError(f"outbox item {item_id} is {row[0]}, not queued")
                conn.execute(
                    "UPDATE outbox SET status = 'sent', raw = X'', attempts = attempts + 1,"
                    " sent_at = ?, updated_at = ?, last_error = NULL WHERE id = ?",
                    (now, now, item_id),
                )

    def mark_transient_failure(self, item_id: int, error: str) -> OutboxItem:
        """A sending attempt failed in a way that may pass: schedule the next one.

        The delay follows :attr:`retry_policy`; after its ``max_attempts`` the item
        becomes ``failed_permanent`` instead.

        Args:
            item_id: A queued item.
            error: What went wrong (kept as ``last_error``; no secrets, please).

        Returns:
            The updated item.

        Raises:
            LocalProtocolError: no such item, or it is not queued.
        """
        now = self._clock()
        with self._transaction() as conn:
            item = self._queued_item(conn, item_id)
            attempts = item.attempts + 1
            if attempts >= self.retry_policy.max_attempts:
                status = OutboxStatus.FAILED_PERMANENT
                last_error = _clip(f"gave up after {attempts} attempts: {error}")
                next_at = item.next_attempt_at
            else:
                status = OutboxStatus.QUEUED
                last_error = _clip(error)
                next_at = now + self.retry_policy.delay(attempts, self._rng)
            conn.execute(
                "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?,"
                " last_error = ?, updated_at = ? WHERE id = ?",
                (status.value, attempts, next_at, last_error, now, item_id),
            )
        return attrs.evolve(
            item,
            status=status,
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
            item = self._queued_item(conn, item_id)
            conn.execute(
                "UPDATE outbox SET status = 'failed_permanent', attempts = attempts + 1,"
                " last_error = ?, updated_at = ? WHERE id = ?",
                (last_error, now, item_id),
            )
        return attrs.evolve(
            item,
            status=OutboxStatus.FAILED_PERMANENT,
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
            row = conn.execute(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None or row[10] != OutboxStatus.FAILED_PERMANENT.value:
                raise LocalProtocolError(f"outbox item {item_id} is not failed_permanent")
            conn.execute(
                "UPDATE outbox SET status = 'queued', attempts = 0, next_attempt_at = ?,"
                " updated_at = ? WHERE id = ?",
                (now, now, item_id),
            )
        return attrs.evolve(
            _outbox_from_row(row),
            status=OutboxStatus.QUEUED,
            attempts=0,
            next_attempt_at=now,
            updated_at=now,
        )

    # -- our Message-IDs -------------------------------------------------------------

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
        keep_queued = "message_id NOT IN (SELECT message_id FROM outbox WHERE status = 'queued')"
        with self._transaction() as conn:
            own = conn.execute(
                f"DELETE FROM own_message_id WHERE created_at < ? AND {keep_queued}",
                (now - own_id_max_age,),
            ).rowcount
            own += conn.execute(
                "DELETE FROM own_message_id WHERE message_id IN ("
                " SELECT message_id FROM own_message_id ORDER BY created_at DESC"
                f" LIMIT -1 OFFSET ?) AND {keep_queued}",
                (own_id_max_count,),
            ).rowcount
            sent = conn.execute(
                "DELETE FROM outbox WHERE status = 'sent' AND sent_at < ?",
                (now - sent_retention,),
            ).rowcount
            messages = conn.execute(
                "DELETE FROM message WHERE status IN ('handled', 'replied', 'rejected',"
                " 'failed') AND updated_at < ? AND NOT EXISTS (SELECT 1 FROM outbox o"
                " WHERE o.account = message.account AND o.parent_folder = message.folder"
                " AND o.parent_uidvalidity = message.uidvalidity"
                " AND o.parent_uid = message.uid AND o.status != 'sent')",
                (now - message_retention,),
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
                "SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'queued'"
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
            outbox_queued=int(counts.get("queued", 0)),
            outbox_failed=int(counts.get("failed_permanent", 0)),
            outbox_next_attempt_at=None if next_at is None else float(next_at),
            messages_by_status={s: by_status.get(s, 0) for s in MessageStatus},
            mailboxes=tuple(_mailbox_from_row(r) for r in mailboxes),
        )


# ---------------------------------------------------------------------------------
# The trio facade.


class _DedicatedThread:
    """One thread that runs submitted callables in order; the SQLite connection lives
    and dies on it. Pending calls are bounded by the number of tasks awaiting them."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        # Calls submitted and not yet seen finished by trio. Zero means the thread is
        # waiting for work and touches nothing (its last job returned before the
        # wake-up that let trio see it finished).
        self.outstanding = 0

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, fn: Callable[[], T]) -> T:
        # A cancelled caller starts no new work ...
        await trio.lowlevel.checkpoint_if_cancelled()
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        results: list[T] = []
        errors: list[BaseException] = []

        def job() -> None:
            try:
                results.append(fn())
            except BaseException as exc:
                errors.append(exc)
            finally:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

        self._jobs.put(job)
        self.outstanding += 1
        # ... but once submitted, a call is waited for: a cancelled write must not leave
        # the caller guessing whether it committed. Calls are short (one transaction).
        try:
            with trio.CancelScope(shield=True):
                await done.wait()
        finally:
            self.outstanding -= 1
        if errors:
            raise errors[0]
        return results[0]

    async def stop(self) -> None:
        # The last job tells us the queue is drained; after it the thread only returns,
        # so the join below does not block the event loop for any real time.
        await self.run(lambda: None)
        self._jobs.put(None)
        self._thread.join()


class AsyncStateStore:
    """Trio access to the state store; every method runs on the store's own thread.

    Obtain one with :func:`open_state_store`. Methods have the same meaning,
    arguments and errors as those of :class:`StateStore`; see there. A call that has
    started is completed even if the caller is cancelled meanwhile (the cancellation
    then arrives at the caller's next checkpoint), so the caller never has to guess
    whether a write happened.
    """

    def __init__(self, worker: _DedicatedThread, store: StateStore) -> None:
        self._worker = worker
        self._store = store

    @property
    def state_dir(self) -> Path:
        """The directory holding the database."""
        return self._store.state_dir

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._worker.run(lambda: fn(*args, **kwargs))

    async def _call_quick(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A short call (no fsync, little data): on the trio thread when the worker is
        idle, else queued behind the worker's calls (order is kept either way)."""
        if self._worker.outstanding:
            return await self._call(fn, *args, **kwargs)
        await trio.lowlevel.checkpoint_if_cancelled()
        result = fn(*args, **kwargs)
        # Like a worker call, a call that ran is reported even if cancelled meanwhile;
        # the cancellation arrives at the caller's next checkpoint.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    async def sync_mailbox(self, account: str, folder: str, uidvalidity: int) -> MailboxState:
        """See :meth:`StateStore.sync_mailbox`."""
        return await self._call(self._store.sync_mailbox, account, folder, uidvalidity)

    async def mailbox(self, account: str, folder: str) -> MailboxState | None:
        """See :meth:`StateStore.mailbox`."""
        return await self._call_quick(self._store.mailbox, account, folder)

    async def mark_initialized(
        self, account: str, folder: str, uidvalidity: int, last_uid: int
    ) -> MailboxState:
        """See :meth:`StateStore.mark_initialized`."""
        return await self._call(
            self._store.mark_initialized, account, folder, uidvalidity, last_uid
        )

    async def advance_high_water_mark(
        self, account: str, folder: str, uidvalidity: int, uid: int
    ) -> int:
        """See :meth:`StateStore.advance_high_water_mark`."""
        return await self._call_quick(
            self._store.advance_high_water_mark, account, folder, uidvalidity, uid
        )

    async def get_message(self, key: MessageKey) -> MessageRecord | None:
        """See :meth:`StateStore.get_message`."""
        return await self._call_quick(self._store.get_message, key)

    async def find_by_message_id(self, account: str, message_id: str) -> list[MessageRecord]:
        """See :meth:`StateStore.find_by_message_id`."""
        return await self._call_quick(self._store.find_by_message_id, account, message_id)

    async def claim(self, key: MessageKey, message_id: str) -> ClaimResult:
        """See :meth:`StateStore.claim`."""
        return await self._call_quick(self._store.claim, key, message_id)

    async def claim_many(
        self,
        items: Iterable[tuple[MessageKey, str]],
        *,
        failed: Mapping[MessageKey, str] | None = None,
    ) -> list[ClaimResult]:
        """See :meth:`StateStore.claim_many`."""
        return await self._call(self._store.claim_many, list(items), failed=failed)

    async def begin_handling(self, key: MessageKey) -> MessageRecord:
        """See :meth:`StateStore.begin_handling`."""
        return await self._call_quick(self._store.begin_handling, key)

    async def mark_handled(self, key: MessageKey) -> MessageRecord:
        """See :meth:`StateStore.mark_handled`."""
        return await self._call_quick(self._store.mark_handled, key)

    async def mark_rejected(self, key: MessageKey, reason: str) -> MessageRecord:
        """See :meth:`StateStore.mark_rejected`."""
        return await self._call_quick(self._store.mark_rejected, key, reason)

    async def claim_batch(
        self,
        items: Iterable[tuple[MessageKey, str]],
        *,
        failed: Mapping[MessageKey, str] | None = None,
        message_ids: Iterable[str] = (),
    ) -> ClaimBatch:
        """See :meth:`StateStore.claim_batch`."""
        return await self._call(
            self._store.claim_batch, list(items), failed=failed, message_ids=list(message_ids)
        )

    async def record_verdicts(
        self,
        rejected: Iterable[tuple[MessageKey, str]],
        accepted: MessageKey | None = None,
    ) -> MessageRecord | None:
        """See :meth:`StateStore.record_verdicts`."""
        return await self._call_quick(self._store.record_verdicts, list(rejected), accepted)

    async def mark_failed(self, key: MessageKey, reason: str) -> MessageRecord:
        """See :meth:`StateStore.mark_failed`."""
        return await self._call_quick(self._store.mark_failed, key, reason)

    async def release(self, key: MessageKey, reason: str, *, max_attempts: int) -> MessageRecord:
        """See :meth:`StateStore.release`."""
        return await self._call_quick(self._store.release, key, reason, max_attempts=max_attempts)

    async def recover_interrupted(
        self, *, max_attempts: int, account: str | None = None
    ) -> RecoveryReport:
        """See :meth:`StateStore.recover_interrupted`."""
        return await self._call(
            self._store.recover_interrupted, max_attempts=max_attempts, account=account
        )

    async def pending(self, account: str, folder: str | None = None) -> list[MessageRecord]:
        """See :meth:`StateStore.pending`."""
        return await self._call(self._store.pending, account, folder)

    async def messages_with_status(
        self, status: MessageStatus, *, account: str | None = None, limit: int = 100
    ) -> list[MessageRecord]:
        """See :meth:`StateStore.messages_with_status`."""
        return await self._call(
            self._store.messages_with_status, status, account=account, limit=limit
        )

    async def record_reply(self, key: MessageKey, draft: OutboxDraft) -> OutboxItem:
        """See :meth:`StateStore.record_reply`."""
        return await self._call(self._store.record_reply, key, draft)

    async def enqueue(self, account: str, draft: OutboxDraft) -> OutboxItem:
        """See :meth:`StateStore.enqueue`."""
        return await self._call(self._store.enqueue, account, draft)

    async def due_outbox(self, *, limit: int = 100, now: float | None = None) -> list[OutboxItem]:
        """See :meth:`StateStore.due_outbox`."""
        return await self._call(self._store.due_outbox, limit=limit, now=now)

    async def next_due_at(self) -> float | None:
        """See :meth:`StateStore.next_due_at`."""
        return await self._call_quick(self._store.next_due_at)

    async def get_outbox_item(self, item_id: int) -> OutboxItem | None:
        """See :meth:`StateStore.get_outbox_item`."""
        return await self._call(self._store.get_outbox_item, item_id)

    async def outbox_items(self, status: OutboxStatus | None = None) -> list[OutboxItem]:
        """See :meth:`StateStore.outbox_items`."""
        return await self._call(self._store.outbox_items, status)

    async def mark_sent(self, item_id: int) -> OutboxItem:
        """See :meth:`StateStore.mark_sent`."""
        return await self._call(self._store.mark_sent, item_id)

    async def mark_sent_many(self, item_ids: Iterable[int]) -> None:
        """See :meth:`StateStore.mark_sent_many`."""
        await self._call(self._store.mark_sent_many, list(item_ids))

    async def mark_transient_failure(self, item_id: int, error: str) -> OutboxItem:
        """See :meth:`StateStore.mark_transient_failure`."""
        return await self._call(self._store.mark_transient_failure, item_id, error)

    async def mark_permanent_failure(self, item_id: int, error: str) -> OutboxItem:
        """See :meth:`StateStore.mark_permanent_failure`."""
        return await self._call(self._store.mark_permanent_failure, item_id, error)

    async def requeue(self, item_id: int) -> OutboxItem:
        """See :meth:`StateStore.requeue`."""
        return await self._call(self._store.requeue, item_id)

    async def is_our_message_id(self, message_id: str) -> bool:
        """See :meth:`StateStore.is_our_message_id`."""
        return await self._call_quick(self._store.is_our_message_id, message_id)

    async def our_message_ids_among(self, message_ids: Iterable[str]) -> frozenset[str]:
        """See :meth:`StateStore.our_message_ids_among`."""
        return await self._call_quick(self._store.our_message_ids_among, list(message_ids))

    async def remember_message_id(self, account: str, message_id: str) -> None:
        """See :meth:`StateStore.remember_message_id`."""
        await self._call(self._store.remember_message_id, account, message_id)

    async def prune(self) -> PruneReport:
        """See :meth:`StateStore.prune` (with the default limits)."""
        return await self._call(self._store.prune)

    async def statistics(self) -> StateStatistics:
        """See :meth:`StateStore.statistics`."""
        return await self._call(self._store.statistics)


@contextlib.asynccontextmanager
async def open_state_store(
    state_dir: str | os.PathLike[str],
    *,
    retry_policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
    read_only: bool = False,
) -> AsyncIterator[AsyncStateStore]:
    """Open the state store for trio code; closed (and its thread ended) on exit.

    Args:
        state_dir: Directory holding the database; created with mode 0700 if missing.
        retry_policy: Backoff for outbox retries.
        rng: Random source for the backoff jitter.
        clock: Wall-clock time source.
        read_only: Open for inspection while another process may be using it (see
            :class:`StateStore`).

    Yields:
        An :class:`AsyncStateStore`.

    Raises:
        StateError: the directory is in use by another process, the database is from
            a newer prxmail, or it cannot be opened.
    """
    worker = _DedicatedThread(name="prxmail-state")
    try:
        store = await worker.run(
            lambda: StateStore(
                state_dir,
                retry_policy=retry_policy,
                rng=rng,
                clock=clock,
                read_only=read_only,
                # The facade's calls come from its worker or, for short ones when the
                # worker is idle, from the trio thread; never from both at once.
                check_same_thread=False,
            )
        )
        try:
            yield AsyncStateStore(worker, store)
        finally:
            with trio.CancelScope(shield=True):
                await worker.run(store.close)
    finally:
        # Even when the block was cancelled: an unstopped worker would be a thread left
        # waiting for work forever.
        with trio.CancelScope(shield=True):
            await worker.stop()
