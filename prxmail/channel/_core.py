"""The state every part of a channel shares, and the hand-offs between the parts.

Theory of operation: a :class:`~prxmail.channel.MailChannel` is built from three
parts that run as tasks in one nursery -- the watcher (:mod:`._watcher`), which
drives the fetch pipeline (:mod:`._fetch`), and the sender (:mod:`._sender`) -- plus
the consumer API (:mod:`._api`). They share only what :class:`_ChannelCore` holds:
the state store, the bounded hand-offs (accepted messages to you, finished UIDs back
to be flagged ``\\Seen``, an outbox generation counter the sender waits on), the
counters and the status. Each part is a mixin over this core, so every shared field
is declared in one place.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Final

import attrs
import trio
import trio_util  # type: ignore[import-untyped]

from prxmail._log import log_event, redact
from prxmail._login import AccountLogin
from prxmail._tls import shared_ssl_context
from prxmail.config import Config
from prxmail.errors import StateError
from prxmail.imap import IMAPConnection
from prxmail.message import Message
from prxmail.policy import SenderPolicy
from prxmail.state import AsyncStateStore, MessageKey, account_key

# Accepted messages waiting between the watcher and you. Zero: the watcher hands a
# message over only when you ask for the next one, so a slow consumer holds back the
# IMAP side instead of piling parsed messages (up to max_message_bytes each) in memory.
MESSAGE_BUFFER: Final = 0

# UIDs waiting to be flagged \Seen. One entry is a few bytes; a thousand covers any
# burst of finished messages between two IDLE cycles. Overflow drops the (cosmetic) flag.
SEEN_BUFFER: Final = 1000

_SEEN: Final = "\\Seen"

# The running channel writes its heartbeat (StateStore.write_heartbeat) at every status
# change and at least this often, so `prxmail status` in another process sees it
# alive; HEARTBEAT_STALE_FACTOR intervals without one mean it is not running. 10 s
# keeps that verdict within half a minute at one tiny write per account per 10 s.
HEARTBEAT_SECONDS: Final = 10.0

# How often the running channel looks for an operator's request (`prxmail outbox
# retry`, `messages retry`, `messages release`). SQLite cannot notify another process;
# a one-row primary-key read per second costs microseconds, and "retry now" is then
# acted on within about a second instead of at the next backoff step or IDLE renewal.
# A status change is written at the same pace, so `status` shows auth-failed at once.
OPERATOR_POLL_SECONDS: Final = 1.0

# At shutdown the last heartbeat ("stopped") may wait this long for the store: it is
# courtesy to `prxmail status`, and must not hold up a stop.
HEARTBEAT_STOP_SECONDS: Final = 2.0


class _PollTicker:
    """The one timer every channel's heartbeat loop of a trio run waits on.

    A timer of its own per channel costs trio a deadline expiry (a cancellation) each
    :data:`OPERATOR_POLL_SECONDS`: with 1,000 accounts most of an idle process's CPU.
    Here the first waiter sleeps until the next tick of a grid shared by all and wakes
    the others, parked meanwhile; the next waiter after it takes its place. With many
    accounts their polls then also queue together and share one store hop (the store's
    worker batches what is queued). A cancelled sleeper wakes the others early: they
    poll once more, which is harmless.
    """

    def __init__(self) -> None:
        self._parked = trio.lowlevel.ParkingLot()
        self._sleeping = False

    async def wait(self) -> None:
        if self._sleeping:
            await self._parked.park()
            return
        self._sleeping = True
        try:
            tick = math.floor(trio.current_time() / OPERATOR_POLL_SECONDS) + 1
            await trio.sleep_until(tick * OPERATOR_POLL_SECONDS)
        finally:
            self._sleeping = False
            self._parked.unpark_all()


_POLL_TICKER: trio.lowlevel.RunVar[_PollTicker] = trio.lowlevel.RunVar("prxmail_poll_ticker")


async def _poll_tick() -> None:
    """Wait for the next operator poll (at most :data:`OPERATOR_POLL_SECONDS`)."""
    try:
        ticker = _POLL_TICKER.get()
    except LookupError:
        ticker = _PollTicker()
        _POLL_TICKER.set(ticker)
    await ticker.wait()


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


def _describe(exc: BaseException) -> str:
    # Status texts and stored failure reasons outlive the log line: a server echoing
    # the password into an error must not put it there either.
    return redact(f"{type(exc).__name__}: {exc}")


# The setting a command timeout comes from, named in timeout errors.
_COMMAND_TIMEOUT: Final = "command_timeout_secs"


@contextlib.contextmanager
def _time_limit(seconds: float, what: str, setting: str) -> Iterator[None]:
    """``trio.fail_after`` whose TooSlowError says what timed out and which limit.

    A bare ``TooSlowError`` has no text, so the log said only "TooSlowError: ". Only
    this scope's own deadline is reworded; a nested limit's error passes unchanged.
    """
    scope = trio.CancelScope(deadline=trio.current_time() + seconds)
    with scope:
        yield
    if scope.cancelled_caught:
        raise trio.TooSlowError(f"{what} timed out after {seconds:g} s ({setting})")


def _message_fields(message: Message) -> dict[str, object]:
    return {
        "uid": message.uid,
        "message_id": message.message_id,
        "from": message.from_.addr,
        "subject": message.subject,
    }


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


class _ChannelCore:
    """What the watcher, the fetch pipeline, the sender and the consumer API share."""

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
        self._message_send, self._message_receive = trio.open_memory_channel[Message](
            MESSAGE_BUFFER
        )
        self._seen_send, self._seen_receive = trio.open_memory_channel[MessageKey](SEEN_BUFFER)
        self._seen_retry: list[MessageKey] = []
        self._in_flight: dict[MessageKey, Message] = {}
        # The hand-over (see _api): messages given to the channel whose begin_handling
        # the consumer's side commits -- together with the previous message's outcome
        # when it can (StateStore.finish_and_begin), else on receiving it. Messages taken
        # early from the channel wait in _ahead for receive() (one, or one more given
        # back by a receive() cancelled while it began one).
        self._unbegun: set[MessageKey] = set()
        self._ahead: collections.deque[Message] = collections.deque()
        self._handover_busy = False
        self._handover_changed = trio.Event()
        self._ssl_context = shared_ssl_context(config.tls_ca_file)
        # The account's one login (and, with OAuth 2, its one token source), shared by
        # the watcher and the sender.
        self._login = AccountLogin(config, self._ssl_context)
        #: Health of the channel; ``await channel.status.wait_value(pred)`` to watch it.
        self.status: trio_util.AsyncValue[ChannelStatus] = trio_util.AsyncValue(ChannelStatus())
        self._outbox_generation = trio_util.AsyncValue(0)
        self._counts = dict.fromkeys(
            (
                "delivered",
                "rejected",
                "duplicates",
                "replies_queued",
                "replies_sent",
                "deferred",
                "held",
                "replied",
                "handled",
                "failed",
                "released",
            ),
            0,
        )
        # When the IDLE push (EXISTS) that the next hand-over answers arrived, and who
        # is told how long that took (the service's metrics; see MailChannel).
        self._pushed_at: float | None = None
        self.push_latency_hook: Callable[[float], None] | None = None
        # The watcher's current wait (IDLE or poll interval), cancelled to wake it early.
        self._wake_scope: trio.CancelScope | None = None
        # The folder's high-water mark as stored (the watcher is its only writer), so
        # looking for new mail needs no state-store round trip.
        self._high_water = 0
        # Whether claimed-but-unfinished messages may exist that are not in flight: after
        # a start, a release, or an interrupted hand-over. Saves reading pending() after
        # every IDLE wake-up when nothing can be pending.
        self._pending_dirty = True
        # Whether the current IMAP session made progress (selected the folder, handed a
        # message on, finished an IDLE cycle): a healthy session resets the backoff.
        self._progressed = False
        # What the fetch command running now asks for, so a failure it ends in can be
        # pinned on its messages (see _FetchPipeline._fetch_failed).
        self._fetching: tuple[MessageKey, ...] = ()
        # Per message: the last failure its fetch ended in and how often in a row.
        self._strikes: dict[MessageKey, tuple[str, int]] = {}
        # Messages of a group whose fetch failed: fetched one by one until the culprit
        # is known, so one message's strikes never count against its neighbours.
        self._isolate: set[MessageKey] = set()
        # Messages recorded failed because their fetch kept failing: never fetched again
        # in this run.
        self._given_up: set[MessageKey] = set()
        # Messages whose body the server sent longer than their RFC822.SIZE: cut to that
        # size, and marked truncated when they are admitted.
        self._cut: set[MessageKey] = set()

    async def _write_heartbeat(self, pid: int, started: float, *, stopped: bool = False) -> None:
        status = self.status.value
        await self._store.write_heartbeat(
            self.account,
            pid=pid,
            started_at=started,
            imap=status.imap,
            imap_error=status.imap_error,
            smtp_error=status.smtp_error,
            reconnects=status.reconnects,
            stopped=stopped,
        )

    async def _run_heartbeat(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the heartbeat row current and act on operators' requests (see
        :data:`HEARTBEAT_SECONDS`, :data:`OPERATOR_POLL_SECONDS`)."""
        pid, started = os.getpid(), time.time()
        generation = await self._store.operator_generation(self.account)
        written: ChannelStatus | None = None
        next_beat = -math.inf
        task_status.started()
        try:
            while True:
                if self.status.value != written or trio.current_time() >= next_beat:
                    written = self.status.value
                    next_beat = trio.current_time() + HEARTBEAT_SECONDS
                    await self._write_heartbeat(pid, started)
                current = await self._store.operator_generation(self.account)
                if current != generation:
                    generation = current
                    self._operator_request()
                await _poll_tick()
        finally:
            with trio.move_on_after(HEARTBEAT_STOP_SECONDS) as scope:
                scope.shield = True
                with contextlib.suppress(StateError):
                    await self._write_heartbeat(pid, started, stopped=True)

    def _operator_request(self) -> None:
        """An operator changed messages or the outbox: look at both again now."""
        log_event(logging.INFO, "operator request noticed: re-reading pending mail and outbox")
        self._pending_dirty = True
        # A message whose fetch kept failing may be among those retried; the others
        # are still failed in the store, so no pending round can pick them up again.
        self._given_up.clear()
        self._outbox_generation.value += 1
        if self._wake_scope is not None:
            self._wake_scope.cancel()

    def _set_status(self, **changes: object) -> None:
        self.status.value = attrs.evolve(self.status.value, **changes)

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
            with _time_limit(
                self.config.command_timeout_secs, "IMAP UID STORE", "command_timeout_secs"
            ):
                await conn.uid_store(uids, "+FLAGS", [_SEEN])
        except BaseException:
            self._seen_retry = keys[:SEEN_BUFFER]
            raise
