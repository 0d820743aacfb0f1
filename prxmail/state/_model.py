"""The state store's values: keys, records, the two state tables, the retry policy.

Theory of operation: everything here is a frozen value or a pure function; nothing
touches SQLite. The message and outbox state tables (:data:`TRANSITIONS`,
:data:`OUTBOX_TRANSITIONS`) are the only place that says which status may follow
which; the store's transition methods consult them before every status change, so an
illegal move is a :class:`~prxmail.errors.LocalProtocolError` (a caller's bug) instead of
a silently inconsistent row.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Collection, Mapping
from typing import Final

import attrs

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

# Text of one thread entry kept in the database (our reply, or received mail when
# thread_keep_incoming_text is on): 16k characters is several pages, more than any
# agent needs as context for one earlier message, and bounds the table per row.
MAX_THREAD_TEXT_CHARS: Final = 16_000

# Earlier messages of a thread given to a handler (the newest ones, oldest first):
# 50 covers issue 12's 25-round conversation in full (two entries a round) and keeps
# the handler's JSON input bounded (at most 50 x MAX_THREAD_TEXT_CHARS of text).
MAX_THREAD_HISTORY: Final = 50


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
    #: Kept (unseen) until ``due_at``: a volume or loop limit said "not yet".
    DEFERRED = "deferred"
    #: Kept (unseen) until an operator releases its thread: a loop is suspected.
    HELD = "held"

    @property
    def terminal(self) -> bool:
        """True when the service will never look at the message again on its own (an
        operator may still hand a failed one on: :data:`OPERATOR_MOVES`)."""
        return not TRANSITIONS[self] - OPERATOR_MOVES.get(self, frozenset())


#: The message state table: every allowed move, in one place. Anything else is a
#: :class:`~prxmail.errors.LocalProtocolError` (a bug in the caller).
TRANSITIONS: Final[Mapping[MessageStatus, frozenset[MessageStatus]]] = {
    MessageStatus.CLAIMED: frozenset(
        {
            MessageStatus.HANDLING,
            MessageStatus.REJECTED,
            MessageStatus.FAILED,
            # Volume and loop limits never finish a message: they park it.
            MessageStatus.DEFERRED,
            MessageStatus.HELD,
        }
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
    # Back to claimed when due (wake_deferred), then admitted afresh; failed only
    # when its UID is lost (UIDVALIDITY change).
    MessageStatus.DEFERRED: frozenset({MessageStatus.CLAIMED, MessageStatus.FAILED}),
    # Back to claimed only by an operator's release of the thread (release_thread).
    MessageStatus.HELD: frozenset({MessageStatus.CLAIMED, MessageStatus.FAILED}),
    MessageStatus.HANDLED: frozenset(),
    MessageStatus.REPLIED: frozenset(),
    MessageStatus.REJECTED: frozenset(),
    # Back to claimed only by an operator's retry (StateStore.retry_message,
    # ``prxmail messages retry``): the handler gets it again.
    MessageStatus.FAILED: frozenset({MessageStatus.CLAIMED}),
}

#: Moves in :data:`TRANSITIONS` that only an operator makes, never the service: a
#: status whose only moves are these is still :attr:`MessageStatus.terminal`.
OPERATOR_MOVES: Final[Mapping[MessageStatus, frozenset[MessageStatus]]] = {
    MessageStatus.FAILED: frozenset({MessageStatus.CLAIMED}),
}


class OutboxStatus(enum.Enum):
    """Where a queued outgoing message is (see :data:`OUTBOX_TRANSITIONS`)."""

    QUEUED = "queued"
    SENT = "sent"
    FAILED_PERMANENT = "failed_permanent"


#: The outbox state table: every allowed move of an outbox row, in one place. Anything
#: else is a :class:`~prxmail.errors.LocalProtocolError` (a bug in the caller).
OUTBOX_TRANSITIONS: Final[Mapping[OutboxStatus, frozenset[OutboxStatus]]] = {
    OutboxStatus.QUEUED: frozenset(
        {
            OutboxStatus.SENT,
            # A transient failure: stays queued, due later, one attempt more. Also an
            # operator's retry (StateStore.retry_outbox): stays queued, due now.
            OutboxStatus.QUEUED,
            OutboxStatus.FAILED_PERMANENT,
        }
    ),
    # Sent is final: its bytes are gone, only the row is kept for a while.
    OutboxStatus.SENT: frozenset(),
    # Back to the queue only by an operator's requeue / retry.
    OutboxStatus.FAILED_PERMANENT: frozenset({OutboxStatus.QUEUED}),
}


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


class Direction(enum.Enum):
    """Whether a thread entry was received (``"in"``) or sent by us (``"out"``)."""

    IN = "in"
    OUT = "out"


@attrs.frozen
class ThreadEntry:
    """One message of a conversation as the state store remembers it.

    Attributes:
        message_id: Its normalised Message-ID.
        thread_id: The conversation it belongs to.
        direction: Received or sent.
        date: Its Date (ISO 8601, UTC) or None.
        sender: The From address.
        subject: The subject.
        text: The text: always for our replies, for received mail only when
            ``thread_keep_incoming_text`` is on; cut to :data:`MAX_THREAD_TEXT_CHARS`.
        created_at: When it was recorded (store clock).
    """

    message_id: str = attrs.field(converter=normalize_message_id)
    thread_id: str
    direction: Direction
    date: str | None
    sender: str
    subject: str
    text: str | None = None
    created_at: float = 0.0


@attrs.frozen
class ParkedMessage:
    """A ``deferred`` or ``held`` message (see :meth:`StateStore.parked_messages`).

    Attributes:
        due_at: For a deferred one, when it is handed on again (store clock).
        thread_id: Its conversation, when known.
    """

    key: MessageKey
    message_id: str
    status: MessageStatus
    reason: str | None
    due_at: float | None
    thread_id: str | None


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


@attrs.frozen
class AccountHeartbeat:
    """The running service's last word about one account (see ``_operator``).

    Attributes:
        imap: ``ChannelStatus.imap`` when written (``"idle"``, ``"auth-failed"``, ...).
        imap_error / smtp_error: The last error seen (kept after it passed; ``imap``
            says whether it still holds), with the time it first appeared.
        last_connected_at: When an IMAP session last became ready.
        updated_at: When the service wrote this (store clock).
        stopped_at: Set when the service shut down cleanly.
    """

    account: str
    pid: int
    started_at: float
    updated_at: float
    imap: str
    imap_error: str | None
    imap_error_at: float | None
    smtp_error: str | None
    smtp_error_at: float | None
    last_connected_at: float | None
    reconnects: int
    stopped_at: float | None


@attrs.frozen
class AccountSummary:
    """Counts of one account for ``prxmail status``.

    Attributes:
        messages_by_status: Every status with its count (0 included).
        last_handled_message_id / last_handled_at: The message finished last
            (handled or replied), if any.
    """

    messages_by_status: Mapping[MessageStatus, int]
    outbox_queued: int
    outbox_failed: int
    last_handled_message_id: str | None
    last_handled_at: float | None


@attrs.frozen
class OperatorMessage:
    """A message as ``prxmail messages list`` shows it.

    Attributes:
        id: The id the operator commands take (the row's id in the store).
        due_at: For a deferred one, when it is handed on again.
        thread_id / sender / subject: From its thread entry, when known.
    """

    id: int
    folder: str
    uid: int
    message_id: str
    status: MessageStatus
    reason: str | None
    attempts: int
    updated_at: float
    due_at: float | None
    thread_id: str | None
    sender: str | None
    subject: str | None
