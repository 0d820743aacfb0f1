"""The email channel for trio programs: accepted mail in, threaded replies out.

::

    async with open_mail_channel(config) as channel:
        async for message in channel:
            await channel.reply(message, f"Hello {message.from_.name or message.from_.addr}!")

Theory of operation
-------------------
:func:`open_mail_channel` opens the durable state store and starts two tasks in one
nursery: the *watcher* (IMAP) and the *sender* (SMTP outbox). They share nothing but the
state store and three bounded hand-offs:

* watcher -> you: a trio memory channel of capacity :data:`MESSAGE_BUFFER` (0). A message
  is only taken off the server when you are ready for it; until then it waits durably on
  the server, not in our memory.
* you -> sender: the outbox table. :meth:`MailChannel.reply` composes the reply once,
  stores it and marks the parent ``replied`` in one transaction, then bumps an
  ``AsyncValue`` the sender waits on.
* you -> watcher: UIDs to flag ``\\Seen``, a memory channel of capacity
  :data:`SEEN_BUFFER`. The flag is cosmetic (state decides what is new), so when the
  buffer is full a flag is dropped rather than blocking you.

The watcher's loop, per connection: LOGIN, SELECT, record UIDVALIDITY, re-fetch messages
a previous run claimed but never finished, apply the first-start policy once per folder
(and again after a UIDVALIDITY change), then repeat: ``UID SEARCH UID last+1:*``, fetch
in bounded groups (sizes first, then bodies, at most ``max_message_bytes`` per command;
a single new message comes with its size in one round trip; oversized messages are
described from BODYSTRUCTURE with only their text parts fetched), parse each group (on
the loop when small, else in one worker-thread call that runs while the next group is
fetched and the previous one handed on), *claim* the group in the state
store in one transaction (which advances the high-water mark), run the sender policy,
and hand accepted messages on one by one. A group costs two state-store round trips
(claim; verdicts + the first hand-over), each further message of it one, and none of
them an fsync (see :mod:`prxmail.state`, "Durability settings").
Between searches it IDLEs: an EXISTS push ends the wait at once; IDLE is re-issued at
least every ``min(idle_timeout_secs, keepalive_secs)`` and the whole cycle has a hard
deadline, so a connection that died silently is detected and replaced. After a window
in which nothing happened the folder is SELECTed again: that is how a UIDVALIDITY change
under a live session is noticed (the watch then starts over with the new value).
Servers without IDLE are polled every ``poll_interval_secs``. Every command runs under
``command_timeout_secs``. Connection failures reconnect with exponential backoff and
jitter (reset after a healthy session); refused credentials are logged as errors and
retried only every :data:`AUTH_RETRY_SECONDS`.

Guarantees (see :mod:`prxmail.state`): a message is handed to you at least once and
answered at most once. If the process dies while you hold a message, the next start
hands it to you again (up to ``handler_max_attempts`` times in total); when the channel
closes normally, messages you did not finish are released the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import trio
import trio_util  # type: ignore[import-untyped]

from prxmail._log import log_event
from prxmail._tls import shared_ssl_context
from prxmail.channel._oversize import (
    OVERSIZE_DEFECT,
    build_substitute,
    describe_attachments,
    text_sections,
)
from prxmail.compose import OutgoingMessage, compose_message, compose_reply
from prxmail.config import Config, FirstStart
from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    LocalProtocolError,
    PrxmailError,
    RemoteProtocolError,
    SMTPPermanentError,
    StateError,
    TLSError,
)
from prxmail.imap import (
    BodyStructure,
    Exists,
    IMAPConnection,
    MailboxState,
    Raw,
    SequenceSet,
    StatusResponse,
    open_imap_connection,
)
from prxmail.message import Address, Message, missing_message_id, parse_message
from prxmail.policy import (
    ReplyRateLimiter,
    SenderPolicy,
    choose_reply_recipient,
    evaluate,
)
from prxmail.smtp import MailTransaction, SendResult, SMTPSender, open_smtp_sender
from prxmail.state import (
    AsyncStateStore,
    ClaimOutcome,
    MessageKey,
    MessageStatus,
    OutboxDraft,
    OutboxItem,
    RetryPolicy,
    account_key,
    open_state_store,
    own_id_predicate,
)

if TYPE_CHECKING:
    import outcome

__all__ = [
    "AUTH_RETRY_SECONDS",
    "FIRST_FETCH_BYTES",
    "GROUP_BYTES",
    "INLINE_PARSE_BYTES",
    "MESSAGE_BUFFER",
    "SEEN_BUFFER",
    "ChannelStatistics",
    "ChannelStatus",
    "MailChannel",
    "collapse_exception_group",
    "open_mail_channel",
]

# Accepted messages waiting between the watcher and you. Zero: the watcher hands a
# message over only when you ask for the next one, so a slow consumer holds back the
# IMAP side instead of piling parsed messages (up to max_message_bytes each) in memory.
MESSAGE_BUFFER: Final = 0

# UIDs waiting to be flagged \Seen. One entry is a few bytes; a thousand covers any
# burst of finished messages between two IDLE cycles. Overflow drops the (cosmetic) flag.
SEEN_BUFFER: Final = 1000

# Outbox items sent per state-store query; each holds its raw message in memory.
OUTBOX_BATCH: Final = 20

# Reconnect backoff: the first retry after a failure comes after about this long, each
# further failure doubles it up to the maximum; jitter takes up to half off so many
# instances do not reconnect in lock-step. A session that stayed up this long is
# "healthy" and resets the backoff.
RECONNECT_INITIAL_SECONDS: Final = 1.0
RECONNECT_MAX_SECONDS: Final = 300.0
HEALTHY_SESSION_SECONDS: Final = 60.0

# Refused credentials do not fix themselves: retry rarely (the operator may be rotating
# a password) instead of hammering the server, which may lock the account.
AUTH_RETRY_SECONDS: Final = 600.0

# The sender re-reads the outbox at least this often even without a wake-up, so items
# whose retry time arrives are picked up and a lost wake-up costs at most this delay.
OUTBOX_RECHECK_SECONDS: Final = 60.0

# A catch-up fetches messages in groups of at most this many bytes (a larger message is a
# group of its own, up to max_message_bytes). While one group is parsed the next is
# fetched and the previous one handed on, so about three groups are in memory at once:
# 2 MiB keeps that near 6 MiB of raw mail while each FETCH is still large enough that
# the round trips do not show (measured: 1 MiB was slower, 4 MiB no faster and bigger).
GROUP_BYTES: Final = 2 * 1024 * 1024

# A single new message is fetched together with its size, up to this many bytes: all of
# most mail in one round trip. A larger one costs a second fetch (of the whole message,
# or of its text parts when over max_message_bytes); the bound keeps what a guess can
# waste on an oversized message small.
FIRST_FETCH_BYTES: Final = 1024 * 1024

# A fetched group this small is parsed on the event loop instead of in a worker thread:
# that takes well under a millisecond for typical mail (a few KB; the hand-off to a
# thread and back costs about as much as the parse), and the parse is bounded by these
# bytes, so the loop is never held for long. Larger groups go to a thread.
INLINE_PARSE_BYTES: Final = 32 * 1024

_SEEN: Final = "\\Seen"


@attrs.frozen
class ChannelStatistics:
    """Counters since the channel opened (see :meth:`MailChannel.statistics`).

    Attributes:
        delivered: Messages handed to you.
        rejected: Messages the sender policy or loop guards refused.
        duplicates: Messages skipped because their Message-ID was already processed.
        replies_queued: Replies and messages put in the outbox.
        replies_sent: Outbox items the SMTP server accepted.
        in_flight: Messages handed to you and not finished yet.
    """

    delivered: int
    rejected: int
    duplicates: int
    replies_queued: int
    replies_sent: int
    in_flight: int


@attrs.frozen
class ChannelStatus:
    """What the channel is doing, for health checks (``channel.status.value``).

    Attributes:
        imap: ``"connecting"``, ``"idle"``, ``"polling"``, ``"fetching"``,
            ``"reconnecting"`` or ``"auth-failed"``.
        imap_error: The last IMAP problem, or ``None`` while healthy.
        smtp_error: The last SMTP problem, or ``None`` after a successful send.
        reconnects: IMAP sessions that ended in a failure so far.
    """

    imap: str = "connecting"
    imap_error: str | None = None
    smtp_error: str | None = None
    reconnects: int = 0


def _draft(outgoing: OutgoingMessage) -> OutboxDraft:
    recipients: list[str] = list(outgoing.envelope_recipients)
    return OutboxDraft(
        message_id=outgoing.message_id,
        envelope_from=outgoing.envelope_sender,
        # The attrs plugin types a ``converter=tuple`` field as an unbound Iterable.
        envelope_to=recipients,  # type: ignore[arg-type]
        raw=outgoing.raw,
    )


def _outbox_fields(item: OutboxItem) -> dict[str, object]:
    return {"outbox_id": item.id, "message_id": item.message_id, "to": ",".join(item.envelope_to)}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def collapse_exception_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real exception inside a nursery's group (Cancelled aside), or the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    real = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return group


class _Backoff:
    """Exponential backoff with jitter for reconnecting."""

    def __init__(self, rng: random.Random) -> None:
        self.failures = 0
        self._rng = rng

    def next_delay(self) -> float:
        base = min(RECONNECT_MAX_SECONDS, RECONNECT_INITIAL_SECONDS * 2.0 ** min(self.failures, 30))
        self.failures += 1
        return base * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self.failures = 0


class MailChannel:
    """An open email channel; see :func:`open_mail_channel`.

    Iterate it (``async for message in channel``) to receive accepted messages, each a
    :class:`~prxmail.message.Message`. Finish every message with exactly one of
    :meth:`reply`, :meth:`mark_handled`, :meth:`mark_failed` or :meth:`release`.
    """

    def __init__(self, config: Config, store: AsyncStateStore, *, rng: random.Random) -> None:
        self.config = config
        self.account = account_key(config.username, config.imap_host, config.imap_port)
        self.folder = config.imap_folder
        self._store = store
        self._rng = rng
        self._policy = SenderPolicy(
            allowed_senders=config.allowed_senders,
            own_addresses=(config.from_address, config.username),
            authserv_id=config.authserv_id,
        )
        self._rate_limiter = ReplyRateLimiter(
            config.reply_rate_limit, config.reply_rate_window_secs, clock=trio.current_time
        )
        self._message_send, self._message_receive = trio.open_memory_channel[Message](
            MESSAGE_BUFFER
        )
        self._seen_send, self._seen_receive = trio.open_memory_channel[MessageKey](SEEN_BUFFER)
        self._seen_retry: list[MessageKey] = []
        self._in_flight: dict[MessageKey, Message] = {}
        self._ssl_context = shared_ssl_context(config.tls_ca_file)
        #: Health of the channel; ``await channel.status.wait_value(pred)`` to watch it.
        self.status: trio_util.AsyncValue[ChannelStatus] = trio_util.AsyncValue(ChannelStatus())
        self._outbox_generation = trio_util.AsyncValue(0)
        self._counts = dict.fromkeys(
            ("delivered", "rejected", "duplicates", "replies_queued", "replies_sent"), 0
        )
        # The watcher's current wait (IDLE or poll interval), cancelled to wake it early.
        self._wake_scope: trio.CancelScope | None = None
        # The folder's high-water mark as stored (the watcher is its only writer), so
        # looking for new mail needs no state-store round trip.
        self._high_water = 0
        # Whether claimed-but-unfinished messages may exist that are not in flight: after
        # a start, a release, or an interrupted hand-over. Saves reading pending() after
        # every IDLE wake-up when nothing can be pending.
        self._pending_dirty = True

    def statistics(self) -> ChannelStatistics:
        """Returns: counters of what the channel did since it opened."""
        return ChannelStatistics(
            delivered=self._counts["delivered"],
            rejected=self._counts["rejected"],
            duplicates=self._counts["duplicates"],
            replies_queued=self._counts["replies_queued"],
            replies_sent=self._counts["replies_sent"],
            in_flight=len(self._in_flight),
        )

    def __repr__(self) -> str:
        return f"<MailChannel {self.account} folder={self.folder!r}>"

    def _set_status(self, **changes: object) -> None:
        self.status.value = attrs.evolve(self.status.value, **changes)

    # -- the consumer's side ------------------------------------------------------------

    def __aiter__(self) -> MailChannel:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def receive(self) -> Message:
        """Wait for the next accepted message.

        Returns:
            The message; it is now ``handling`` in the state store.

        Raises:
            trio.EndOfChannel: the channel is closing.
        """
        message = await self._message_receive.receive()
        self._counts["delivered"] += 1
        return message

    def _key(self, message: Message) -> MessageKey:
        return MessageKey(self.account, self.folder, message.uidvalidity, message.uid)

    def _finished(self, key: MessageKey, *, seen: bool) -> None:
        self._in_flight.pop(key, None)
        if seen and self.config.mark_seen:
            try:
                self._seen_send.send_nowait(key)
            except trio.WouldBlock:
                log_event(logging.DEBUG, "seen flag dropped (buffer full)", uid=key.uid)
            else:
                if self._wake_scope is not None:
                    self._wake_scope.cancel()

    async def reply(self, message: Message, body: str) -> str:
        """Answer a message: compose the threaded reply once, store it, send it.

        The reply is stored durably (and the message marked ``replied``) before this
        returns; the sender task delivers it, retrying transient SMTP failures.

        Args:
            message: A message received from this channel and not finished yet.
            body: The reply text; it can never add headers.

        Returns:
            The reply's Message-ID.

        Raises:
            LocalProtocolError: the message was already finished (a reply is never
                composed twice) or an address cannot be written safely.
        """
        key = self._key(message)
        to = choose_reply_recipient(message, self._policy)
        outgoing = compose_reply(
            message,
            body,
            from_address=self.config.from_address,
            to=to,
            default_subject=self.config.default_subject,
        )
        draft = _draft(outgoing)
        await self._store.record_reply(key, draft)
        self._finished(key, seen=True)
        self._counts["replies_queued"] += 1
        self._outbox_generation.value += 1
        return outgoing.message_id

    async def send(self, to: str, subject: str, body: str) -> str:
        """Send a new message (not a reply) through the durable outbox.

        Args:
            to: The recipient address.
            subject: The subject (``default_subject`` when empty).
            body: The text.

        Returns:
            The message's Message-ID.

        Raises:
            LocalProtocolError: the address cannot be written safely.
        """
        outgoing = compose_message(
            from_address=self.config.from_address,
            to=Address(to),
            subject=subject,
            body=body,
            default_subject=self.config.default_subject,
        )
        draft = _draft(outgoing)
        await self._store.enqueue(self.account, draft)
        self._counts["replies_queued"] += 1
        self._outbox_generation.value += 1
        return outgoing.message_id

    async def mark_handled(self, message: Message) -> None:
        """Finish a message without answering it.

        Raises:
            LocalProtocolError: the message was already finished.
        """
        key = self._key(message)
        await self._store.mark_handled(key)
        self._finished(key, seen=True)

    async def mark_failed(self, message: Message, reason: str) -> None:
        """Record that a message could not be handled; it is never retried.

        Failed messages are left unseen on the server for a person to look at.

        Raises:
            LocalProtocolError: the message was already finished.
        """
        key = self._key(message)
        await self._store.mark_failed(key, reason)
        self._finished(key, seen=False)

    async def release(self, message: Message, reason: str) -> bool:
        """Give a message back to be handed on again later (after the next IDLE cycle or
        restart), e.g. when the handler could not be started at all.

        Returns:
            True when it will be retried, False when it used up ``handler_max_attempts``
            and is now failed.

        Raises:
            LocalProtocolError: the message was already finished.
        """
        key = self._key(message)
        record = await self._store.release(
            key, reason, max_attempts=self.config.handler_max_attempts
        )
        self._pending_dirty = True
        self._finished(key, seen=False)
        return record.status is MessageStatus.CLAIMED

    async def _release_in_flight(self) -> None:
        for key in list(self._in_flight):
            with contextlib.suppress(LocalProtocolError):
                record = await self._store.release(
                    key, "shutdown", max_attempts=self.config.handler_max_attempts
                )
                log_event(
                    logging.INFO,
                    "message released at shutdown",
                    uid=key.uid,
                    status=record.status.value,
                )
        self._in_flight.clear()

    # -- the sender -----------------------------------------------------------------------

    async def _run_sender(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        config = self.config
        async with open_smtp_sender(
            config.smtp_host,
            config.smtp_port,
            username=config.smtp_username,
            password=config.smtp_password.reveal(),
            security=config.smtp_security,
            ssl_context=self._ssl_context,
        ) as smtp:
            task_status.started()
            while True:
                generation = self._outbox_generation.value
                items = await self._store.due_outbox(limit=OUTBOX_BATCH)
                if len(items) == 1:
                    await self._send_one(smtp, items[0])
                elif items:
                    await self._send_batch(smtp, items)
                if len(items) == OUTBOX_BATCH:
                    continue
                next_at = await self._store.next_due_at()
                delay = math.inf if next_at is None else max(0.0, next_at - time.time())
                with trio.move_on_after(min(delay, OUTBOX_RECHECK_SECONDS)):
                    await self._outbox_generation.wait_value(lambda v, g=generation: v != g)

    async def _send_one(self, smtp: SMTPSender, item: OutboxItem) -> None:
        try:
            with trio.fail_after(self.config.command_timeout_secs):
                result = await smtp.send_message(item.envelope_from, item.envelope_to, item.raw)
        except (PrxmailError, OSError, trio.TooSlowError) as exc:
            await self._record_send_failure(item, exc)
            return
        await self._record_sent(item, result)

    async def _send_batch(self, smtp: SMTPSender, items: Sequence[OutboxItem]) -> None:
        """Send several due replies pipelined in one exchange (the server's per-message
        work overlaps with the transfer of the next), then record each outcome."""
        messages = [
            MailTransaction(item.envelope_from, item.envelope_to, item.raw) for item in items
        ]
        try:
            # One command timeout per message: the batch is one long exchange.
            with trio.fail_after(self.config.command_timeout_secs * len(items)):
                outcomes = await smtp.send_messages(messages)
        except LocalProtocolError:
            # One of them cannot go on the wire: send them one by one so that only
            # that one is refused.
            for item in items:
                await self._send_one(smtp, item)
            return
        except (PrxmailError, OSError, trio.TooSlowError) as exc:
            for item in items:
                await self._record_send_failure(item, exc)
            return
        sent = [
            (item, reported.result)
            for item, reported in zip(items, outcomes, strict=True)
            if reported.result is not None
        ]
        # One durable commit for everything the server accepted in this exchange.
        await self._store.mark_sent_many(item.id for item, _ in sent)
        for item, result in sent:
            self._log_sent(item, result)
        for item, reported in zip(items, outcomes, strict=True):
            if reported.result is None:
                error = reported.error or ConnectionBrokenError("no outcome for this message")
                await self._record_send_failure(item, error)

    async def _record_sent(self, item: OutboxItem, result: SendResult) -> None:
        await self._store.mark_sent(item.id)
        self._log_sent(item, result)

    def _log_sent(self, item: OutboxItem, result: SendResult) -> None:
        self._counts["replies_sent"] += 1
        self._set_status(smtp_error=None)
        refused = ", ".join(f"{r.address} ({r.reply.code})" for r in result.refused) or None
        log_event(logging.INFO, "reply sent", **_outbox_fields(item), refused=refused)

    async def _record_send_failure(self, item: OutboxItem, exc: BaseException) -> None:
        fields = _outbox_fields(item)
        if isinstance(exc, SMTPPermanentError | LocalProtocolError):
            await self._store.mark_permanent_failure(item.id, _describe(exc))
            self._set_status(smtp_error=_describe(exc))
            log_event(
                logging.ERROR,
                "reply refused permanently, kept in outbox",
                **fields,
                error=_describe(exc),
            )
            return
        updated = await self._store.mark_transient_failure(item.id, _describe(exc))
        self._set_status(smtp_error=_describe(exc))
        level = logging.ERROR if isinstance(exc, AuthenticationError) else logging.WARNING
        if updated.status is not updated.status.QUEUED:
            log_event(logging.ERROR, "reply given up after retries", **fields, error=_describe(exc))
        else:
            log_event(
                level,
                "reply not sent yet, will retry",
                **fields,
                attempts=updated.attempts,
                retry_in=round(max(0.0, updated.next_attempt_at - time.time()), 1),
                error=_describe(exc),
            )

    # -- the watcher ----------------------------------------------------------------------

    async def _run_watcher(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        recovered = await self._store.recover_interrupted(
            max_attempts=self.config.handler_max_attempts, account=self.account
        )
        for key in recovered.failed:
            log_event(logging.ERROR, "message failed: interrupted too often", uid=key.uid)
        if recovered.retried:
            log_event(
                logging.INFO,
                "messages interrupted by a crash will be handled again",
                count=len(recovered.retried),
            )
        task_status.started()
        backoff = _Backoff(self._rng)
        try:
            while True:
                started = trio.current_time()
                delay: float
                try:
                    await self._session()
                except StateError:
                    raise  # durable state unusable: running on would break the guarantees
                except AuthenticationError as exc:
                    delay = AUTH_RETRY_SECONDS
                    self._set_status(
                        imap="auth-failed",
                        imap_error=_describe(exc),
                        reconnects=self.status.value.reconnects + 1,
                    )
                    log_event(
                        logging.ERROR,
                        "IMAP login refused: check username and password",
                        retry_in=delay,
                        error=str(exc),
                    )
                except (PrxmailError, OSError, trio.TooSlowError) as exc:
                    if trio.current_time() - started >= HEALTHY_SESSION_SECONDS:
                        backoff.reset()
                    delay = backoff.next_delay()
                    self._set_status(
                        imap="reconnecting",
                        imap_error=_describe(exc),
                        reconnects=self.status.value.reconnects + 1,
                    )
                    log_event(
                        logging.ERROR if isinstance(exc, TLSError) else logging.WARNING,
                        "IMAP connection lost, reconnecting",
                        retry_in=round(delay, 1),
                        error=_describe(exc),
                    )
                await trio.sleep(delay)
        finally:
            self._message_send.close()

    async def _session(self) -> None:
        config = self.config
        timeout = config.command_timeout_secs
        self._set_status(imap="connecting")
        # Connecting and leaving (LOGOUT) are bounded by this scope's deadline; while
        # the session runs the deadline is lifted (each command has its own).
        scope = trio.CancelScope(deadline=trio.current_time() + timeout)
        with scope:
            async with open_imap_connection(
                config.imap_host,
                config.imap_port,
                security=config.imap_security,
                ssl_context=self._ssl_context,
            ) as conn:
                scope.deadline = math.inf
                try:
                    with trio.fail_after(timeout):
                        await conn.login(config.username, config.password.reveal())
                        box = await conn.select(self.folder)
                    while True:  # again after each UIDVALIDITY change seen in session
                        box = await self._watch(conn, box)
                finally:
                    scope.deadline = trio.current_time() + timeout
        if scope.cancelled_caught:
            raise trio.TooSlowError("IMAP connect or logout timed out")

    async def _watch(self, conn: IMAPConnection, box: MailboxState) -> MailboxState:
        """Watch the selected folder; return the new state when its UIDVALIDITY changed."""
        config = self.config
        timeout = config.command_timeout_secs
        if box.uidvalidity is None:
            raise RemoteProtocolError("the server reported no UIDVALIDITY")
        uidvalidity, uidnext = box.uidvalidity, box.uidnext
        mailbox = await self._store.sync_mailbox(self.account, self.folder, uidvalidity)
        self._high_water = mailbox.last_uid
        self._pending_dirty = True
        changed = mailbox.previous_uidvalidity is not None
        if changed:
            log_event(
                logging.WARNING,
                "UIDVALIDITY changed: the folder was re-created; unseen mail in it is"
                " processed again, mail already handled is recognised by Message-ID",
                folder=self.folder,
                old=mailbox.previous_uidvalidity,
                new=uidvalidity,
            )
        await self._process_pending(conn, uidvalidity)
        if not mailbox.initialized:
            unseen = config.first_start is FirstStart.UNSEEN or changed
            if unseen:
                with trio.fail_after(timeout):
                    uids = await conn.uid_search(Raw("UNSEEN"))
                await self._process_uids(conn, uidvalidity, uids)
            if uidnext is not None:
                mark = uidnext - 1
            else:
                with trio.fail_after(timeout):
                    everything = await conn.uid_search()
                mark = max(everything, default=0)
            initialized = await self._store.mark_initialized(
                self.account, self.folder, uidvalidity, mark
            )
            self._high_water = initialized.last_uid
            log_event(
                logging.INFO,
                "folder initialised",
                folder=self.folder,
                policy="unseen" if unseen else "new",
                last_uid=mark,
            )
        idle = "IDLE" in conn.capabilities
        if not idle:
            log_event(
                logging.WARNING, "server has no IDLE; polling", every=config.poll_interval_secs
            )
        self._set_status(imap_error=None)
        while True:
            await self._flag_seen(conn, uidvalidity)
            await self._catch_up(conn, uidvalidity)
            self._set_status(imap="idle" if idle else "polling")
            quiet = await (self._idle_once(conn) if idle else self._poll_once(conn))
            self._set_status(imap="fetching")
            if quiet:
                # Nothing happened for a whole window: SELECT again. Servers do not all
                # tell a selected session that its folder was re-created (Dovecot keeps
                # serving the old view), and a new UIDVALIDITY must not go unnoticed.
                with trio.fail_after(timeout):
                    fresh = await conn.select(self.folder)
                if fresh.uidvalidity != uidvalidity:
                    return fresh
            await self._process_pending(conn, uidvalidity)

    async def _catch_up(self, conn: IMAPConnection, uidvalidity: int) -> None:
        while True:
            last = self._high_water
            with trio.fail_after(self.config.command_timeout_secs):
                found = await conn.uid_search("UID", SequenceSet(((last + 1, None),)))
            # "UID n:*" always matches the highest UID, even when it is below n.
            new = [uid for uid in found if uid > last]
            if not new:
                return
            await self._process_uids(conn, uidvalidity, new)
            if self._high_water <= last:
                # The server listed UIDs it then would not deliver: try again after the
                # next wait instead of spinning on them.
                log_event(
                    logging.WARNING,
                    "server listed messages it did not return; retrying later",
                    uids=",".join(map(str, new[:20])),
                )
                return

    def _wait_window(self) -> float:
        return float(min(self.config.idle_timeout_secs, self.config.keepalive_secs))

    async def _idle_once(self, conn: IMAPConnection) -> bool:
        """IDLE until a push, a wake-up or the end of the window.

        Returns:
            True when the window ended with nothing happening.
        """
        timeout = self.config.command_timeout_secs
        window = self._wait_window()
        # The whole cycle has a hard deadline: if DONE is not answered in time the
        # connection is dead (a NAT box forgot it) and the TooSlowError reconnects.
        with trio.fail_after(window + 2 * timeout):
            async with conn.idle() as session:
                with trio.move_on_after(window) as wait:
                    # Finished messages cancel this scope so their \Seen flags go out.
                    self._wake_scope = wait
                    if self._seen_pending():
                        wait.cancel()
                    try:
                        async for push in session:
                            if isinstance(push, Exists):
                                break
                            if isinstance(push, StatusResponse) and push.status == "BYE":
                                raise ConnectionBrokenError(f"server said BYE: {push.text}")
                    finally:
                        self._wake_scope = None
        return wait.cancelled_caught and trio.current_time() >= wait.deadline

    async def _poll_once(self, conn: IMAPConnection) -> bool:
        """Wait one poll interval (or until woken); returns True when not woken."""
        with trio.move_on_after(self.config.poll_interval_secs) as wait:
            self._wake_scope = wait
            if self._seen_pending():
                wait.cancel()
            try:
                await trio.sleep_forever()
            finally:
                self._wake_scope = None
        return trio.current_time() >= wait.deadline

    def _seen_pending(self) -> bool:
        return bool(self._seen_retry) or self._seen_receive.statistics().current_buffer_used > 0

    async def _flag_seen(self, conn: IMAPConnection, uidvalidity: int) -> None:
        keys = self._seen_retry
        self._seen_retry = []
        while True:
            try:
                keys.append(self._seen_receive.receive_nowait())
            except trio.WouldBlock:
                break
        uids = sorted(
            {k.uid for k in keys if k.uidvalidity == uidvalidity and k.folder == self.folder}
        )
        if not uids:
            return
        try:
            with trio.fail_after(self.config.command_timeout_secs):
                await conn.uid_store(uids, "+FLAGS", [_SEEN])
        except BaseException:
            self._seen_retry = keys[:SEEN_BUFFER]
            raise

    async def _process_pending(self, conn: IMAPConnection, uidvalidity: int) -> None:
        if not self._pending_dirty:
            return
        self._pending_dirty = False
        pending = await self._store.pending(self.account, self.folder)
        current: list[int] = []
        for record in pending:
            if record.key in self._in_flight:
                continue
            if record.key.uidvalidity != uidvalidity:
                await self._store.mark_failed(
                    record.key, "uidvalidity changed before it was handled"
                )
                log_event(
                    logging.ERROR,
                    "message lost its UID (UIDVALIDITY changed) before it"
                    " was handled; recorded as failed",
                    uid=record.key.uid,
                    message_id=record.message_id,
                )
                continue
            current.append(record.key.uid)
        if current:
            await self._process_uids(conn, uidvalidity, current)

    async def _process_uids(
        self, conn: IMAPConnection, uidvalidity: int, uids: Sequence[int]
    ) -> None:
        config = self.config
        timeout = config.command_timeout_secs
        ordered = sorted(set(uids))
        if len(ordered) == 1:
            await self._process_one(conn, uidvalidity, ordered[0])
            return
        # The group fetched last is parsed in a worker thread while the next one is
        # fetched and the one before is handed on: at most three groups are in memory
        # at once. Groups are still claimed strictly in UID order: a claim raises the
        # high-water mark.
        group_limit = min(config.max_message_bytes, GROUP_BYTES)
        parsing: _ParseJob | None = None

        async def admit_parsed() -> None:
            nonlocal parsing
            if parsing is not None:
                job, parsing = parsing, None
                await self._admit(uidvalidity, await job.result())

        async def fetch_group(uids: list[int]) -> None:
            nonlocal parsing
            if not uids:
                return
            job = self._start_parse(uidvalidity, await self._fetch_bodies(conn, uids))
            await admit_parsed()
            parsing = job

        for start in range(0, len(ordered), config.fetch_batch_size):
            batch = ordered[start : start + config.fetch_batch_size]
            sizes: dict[int, int] = {}
            with trio.fail_after(timeout):
                async for data in conn.uid_fetch(batch, ["RFC822.SIZE"]):
                    if data.uid is not None:
                        sizes[data.uid] = data.rfc822_size or 0
            group: list[int] = []
            group_bytes = 0
            for uid in batch:
                if uid not in sizes:
                    continue  # expunged meanwhile
                size = sizes[uid]
                if size > config.max_message_bytes:
                    await fetch_group(group)
                    group, group_bytes = [], 0
                    await admit_parsed()
                    await self._process_oversized(conn, uidvalidity, uid, size)
                    continue
                if group and group_bytes + size > group_limit:
                    await fetch_group(group)
                    group, group_bytes = [], 0
                group.append(uid)
                group_bytes += size
            await fetch_group(group)
            missing = [uid for uid in batch if uid not in sizes]
            if missing:
                await admit_parsed()  # the mark must not pass an unclaimed message
                await self._advance_past(uidvalidity, max(missing))
            # A long catch-up finishes messages faster than the end of the catch-up
            # comes: flag them as it goes, so SEEN_BUFFER never overflows.
            await self._flag_seen(conn, uidvalidity)
        await admit_parsed()

    async def _advance_past(self, uidvalidity: int, uid: int) -> None:
        """Move the high-water mark past UIDs the server listed but no longer has."""
        self._high_water = await self._store.advance_high_water_mark(
            self.account, self.folder, uidvalidity, uid
        )

    async def _process_one(self, conn: IMAPConnection, uidvalidity: int, uid: int) -> None:
        """The usual push: one new message. Its size and its first
        :data:`FIRST_FETCH_BYTES` come in one round trip, which is all of most mail;
        a larger message is then fetched whole, or as text parts when oversized."""
        limit = self.config.max_message_bytes
        first = min(limit, FIRST_FETCH_BYTES)
        size: int | None = None
        body: bytes | None = None
        with trio.fail_after(self.config.command_timeout_secs):
            async for data in conn.uid_fetch([uid], ["RFC822.SIZE", f"BODY.PEEK[]<0.{first}>"]):
                if data.uid == uid:
                    size = data.rfc822_size
                    value = data.sections.get("<0>")
                    body = None if value is None else bytes(value)
        if size is None:
            await self._advance_past(uidvalidity, uid)  # expunged meanwhile
            return
        if body is None:
            raise RemoteProtocolError(f"the server did not return message UID {uid}")
        # A server whose RFC822.SIZE is off could make a cut-off message look whole: a
        # body that fills the partial fetch completely is only trusted with a matching size.
        if size > first or (len(body) >= first and len(body) != size):
            del body
            if size > limit:
                await self._process_oversized(conn, uidvalidity, uid, size)
            else:
                await self._parse_and_admit(uidvalidity, await self._fetch_bodies(conn, [uid]))
            return
        await self._parse_and_admit(uidvalidity, [(uid, body)])

    async def _parse_and_admit(self, uidvalidity: int, raws: list[tuple[int, bytes]]) -> None:
        await self._admit(uidvalidity, await self._start_parse(uidvalidity, raws).result())

    async def _fetch_bodies(self, conn: IMAPConnection, uids: list[int]) -> list[tuple[int, bytes]]:
        bodies: dict[int, bytes] = {}
        with trio.fail_after(self.config.command_timeout_secs):
            async for data in conn.uid_fetch(uids, ["BODY.PEEK[]"]):
                if data.uid is not None and data.body is not None:
                    bodies[data.uid] = bytes(data.body)
        raws: list[tuple[int, bytes]] = []
        for uid in uids:
            raw = bodies.pop(uid, None)
            if raw is None:
                # Expunged since the size probe, or a server fault. Going on would claim
                # a higher UID and move the high-water mark past this one, losing it:
                # reconnect instead (a vanished message is not listed next time).
                raise RemoteProtocolError(f"the server did not return message UID {uid}")
            raws.append((uid, raw))
        return raws

    async def _process_oversized(
        self, conn: IMAPConnection, uidvalidity: int, uid: int, size: int
    ) -> None:
        limit = self.config.max_message_bytes
        timeout = self.config.command_timeout_secs
        structure: BodyStructure | None = None
        with trio.fail_after(timeout):
            async for data in conn.uid_fetch([uid], ["BODYSTRUCTURE"]):
                if data.uid == uid:
                    structure = data.bodystructure
        sections = text_sections(structure) if structure is not None else []
        items = ["BODY.PEEK[HEADER]"] + [f"BODY.PEEK[{s.section}]<0.{limit}>" for s in sections]
        header = b""
        found: dict[str, bytes] = {}
        with trio.fail_after(timeout):
            async for data in conn.uid_fetch([uid], items):
                for name, value in data.sections.items():
                    if value is None:
                        continue
                    if name.upper() == "HEADER":
                        header = bytes(value)
                    else:
                        found[name.split("<", 1)[0]] = bytes(value)
        if not header:
            raise RemoteProtocolError(f"the server did not return the header of UID {uid}")
        parts = [(s, found.get(s.section, b"")) for s in sections]
        raw = build_substitute(header, parts)
        [(_, parsed)] = await self._start_parse(uidvalidity, [(uid, raw)]).result()
        if isinstance(parsed, Message):
            parsed = attrs.evolve(
                parsed,
                attachments=describe_attachments(structure) if structure is not None else (),
                size=size,
                defects=tuple(sorted({*parsed.defects, OVERSIZE_DEFECT})),
            )
            log_event(
                logging.INFO,
                "message over max_message_bytes: text parts only",
                uid=uid,
                size=size,
                limit=limit,
            )
        await self._admit(uidvalidity, [(uid, parsed)])

    def _start_parse(self, uidvalidity: int, raws: list[tuple[int, bytes]]) -> _ParseJob:
        """Start parsing a fetched group: in one worker-thread call (one hop, not one per
        message), or right here for a group of at most :data:`INLINE_PARSE_BYTES`.

        A message that cannot be parsed comes back as its exception: it is recorded as
        failed when the group is claimed, because one poison message must not stall the
        folder (it would be fetched and fail again on every reconnect).
        """
        max_attachment_bytes = self.config.max_attachment_bytes

        def parse_all() -> list[tuple[int, Message | Exception]]:
            parsed: list[tuple[int, Message | Exception]] = []
            raws.reverse()
            while raws:
                uid, raw = raws.pop()  # each raw message is freed once it is parsed
                try:
                    item: Message | Exception = parse_message(
                        raw,
                        uid=uid,
                        uidvalidity=uidvalidity,
                        max_attachment_bytes=max_attachment_bytes,
                    )
                except Exception as exc:
                    item = exc
                del raw
                parsed.append((uid, item))
            return parsed

        if sum(len(raw) for _, raw in raws) <= INLINE_PARSE_BYTES:
            return _ParseJob.done(parse_all())
        return _ParseJob.in_thread(parse_all)

    async def _admit(
        self, uidvalidity: int, parsed: Sequence[tuple[int, Message | Exception]]
    ) -> None:
        """Claim a fetched group in one transaction, apply the sender policy to it, and
        hand the accepted messages on in UID order."""
        if not parsed:
            return
        pairs: list[tuple[MessageKey, str]] = []
        failed: dict[MessageKey, str] = {}
        for uid, item in parsed:
            key = MessageKey(self.account, self.folder, uidvalidity, uid)
            if isinstance(item, Message):
                pairs.append((key, item.message_id))
            else:
                pairs.append((key, missing_message_id(uid, uidvalidity)))
                failed[key] = f"cannot parse: {_describe(item)}"
        batch = await self._store.claim_batch(
            pairs,
            failed=failed,
            message_ids=(
                ident
                for _, item in parsed
                if isinstance(item, Message)
                for ident in (
                    item.message_id,
                    *([item.in_reply_to] if item.in_reply_to else []),
                    *item.references,
                )
            ),
        )
        self._high_water = max(self._high_water, *(uid for uid, _ in parsed))
        candidates: list[tuple[MessageKey, Message]] = []
        for (uid, item), (key, _), result in zip(parsed, pairs, batch.results, strict=True):
            if not isinstance(item, Message):
                log_event(
                    logging.ERROR, "message failed: cannot parse", uid=uid, error=_describe(item)
                )
                continue
            if result.outcome is ClaimOutcome.DUPLICATE:
                log_event(
                    logging.INFO,
                    "message skipped: already processed (same Message-ID)",
                    **_message_fields(item),
                )
                self._counts["duplicates"] += 1
                continue
            if result.record.status is MessageStatus.CLAIMED and key not in self._in_flight:
                candidates.append((key, item))
        if not candidates:
            return
        is_ours = own_id_predicate(batch.ours)
        accepted: list[tuple[MessageKey, Message]] = []
        rejected: list[tuple[MessageKey, str]] = []
        for key, message in candidates:
            verdict = evaluate(
                message, self._policy, is_our_message_id=is_ours, rate_limiter=self._rate_limiter
            )
            if verdict.accepted:
                accepted.append((key, message))
                continue
            rejected.append((key, verdict.reason))
            log_event(
                logging.INFO,
                "message rejected",
                **_message_fields(message),
                reason=verdict.reason,
                detail=verdict.detail or None,
            )
        try:
            await self._store.record_verdicts(rejected, accepted[0][0] if accepted else None)
            self._counts["rejected"] += len(rejected)
            for index, (key, message) in enumerate(accepted):
                self._in_flight[key] = message
                if index:
                    await self._store.begin_handling(key)
                await self._message_send.send(message)
        except BaseException:
            # Interrupted half-way: the rest of the group stays claimed, for the next
            # round's pending() to find.
            self._pending_dirty = True
            raise


class _ParseJob:
    """A group's parse, running in a worker thread or already done.

    The watcher starts one and goes on fetching; :meth:`result` waits for it. A channel
    has at most one in flight, so parse threads are bounded by the channels. A job
    whose watcher gave up (cancelled, or the connection broke) is simply dropped: the
    thread finishes its bounded work and the result is freed; nothing was claimed, so
    the messages are fetched again.
    """

    def __init__(self) -> None:
        self._finished = trio.Event()
        self._parsed: list[tuple[int, Message | Exception]] = []
        self._error: BaseException | None = None

    @classmethod
    def done(cls, parsed: list[tuple[int, Message | Exception]]) -> _ParseJob:
        job = cls()
        job._parsed = parsed
        job._finished.set()
        return job

    @classmethod
    def in_thread(cls, fn: Callable[[], list[tuple[int, Message | Exception]]]) -> _ParseJob:
        job = cls()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[list[tuple[int, Message | Exception]]]) -> None:
            try:
                job._parsed = result.unwrap()
            except BaseException as exc:  # handed to whoever waits for the result
                job._error = exc
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(job._finished.set)

        trio.lowlevel.start_thread_soon(fn, deliver, name="prxmail-parse")
        return job

    async def result(self) -> list[tuple[int, Message | Exception]]:
        """Wait for the parse; every message comes back parsed or as its exception."""
        await self._finished.wait()
        if self._error is not None:
            raise self._error
        return self._parsed


def _message_fields(message: Message) -> dict[str, object]:
    return {
        "uid": message.uid,
        "message_id": message.message_id,
        "from": message.from_.addr,
        "subject": message.subject,
    }


@contextlib.asynccontextmanager
async def open_mail_channel(
    config: Config, *, rng: random.Random | None = None
) -> AsyncIterator[MailChannel]:
    """Open the email channel: watch the mailbox, deliver accepted mail, send replies.

    Args:
        config: The validated configuration (see :func:`prxmail.config.load_config`).
        rng: Random source for backoff jitter (tests pass a seeded one).

    Yields:
        The :class:`MailChannel`. Leaving the block stops both tasks; messages you
        received but did not finish are released to be handed on again next time.

    Raises:
        StateError: the state directory is in use by another process or unusable.
        Any exception from the block itself, unwrapped (never an ExceptionGroup).
    """
    source = rng or random.Random()  # noqa: S311 - jitter only
    retry = RetryPolicy(
        initial_delay=float(config.smtp_retry_initial_secs),
        max_delay=float(config.smtp_retry_max_secs),
    )
    collapsed: BaseException
    try:
        async with open_state_store(config.state_dir, retry_policy=retry, rng=source) as store:
            channel = MailChannel(config, store, rng=source)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(channel._run_sender)
                    await nursery.start(channel._run_watcher)
                    try:
                        yield channel
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await channel._release_in_flight()
    except BaseExceptionGroup as group:
        collapsed = collapse_exception_group(group)
    else:
        return
    # Raised outside the except block so the group does not become its __context__.
    raise collapsed
