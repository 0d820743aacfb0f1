"""The email channel for trio programs: accepted mail in, threaded replies out.

::

    async with open_mail_channel(config) as channel:
        async for message in channel:
            await channel.reply(message, f"Hello {message.from_.name or message.from_.addr}!")

Theory of operation
-------------------
(The parts named here live in ``_watcher``, ``_fetch`` and ``_sender`` of this
package; this module is the consumer's side.)

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
  :data:`SEEN_BUFFER`. The flag is cosmetic (state decides what is new), so it never
  blocks you: when the buffer is full the flag waits in a list beside it for the
  watcher's next flagging (one catch-up hands out a few groups between two); flags a
  refused or cut STORE leaves are retried once, up to SEEN_BUFFER of them.

The watcher's loop, per connection: LOGIN, SELECT, record UIDVALIDITY, re-fetch messages
a previous run claimed but never finished, apply the first-start policy once per folder
(and again after a UIDVALIDITY change), then repeat: ``UID SEARCH UID last+1:*``, fetch
in bounded groups (sizes first, then bodies, at most ``max_message_bytes`` per command;
a single new message comes with its size in one round trip; oversized messages are
described from BODYSTRUCTURE with only their text parts fetched), parse each group (on
the loop only when it is small and plain -- ``_fetch.parse_inline`` -- else in one
worker-thread call under the parse limiter), and -- in a second task, so that the next
group's round trips overlap your work on this one -- *claim* each group in the state
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
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import attrs
import trio

from prxmail._log import account_context, log_event
from prxmail._tls import shared_ssl_context
from prxmail.channel._core import _describe, collapse_exception_group
from prxmail.channel._sender import SMTPConnector, _draft, _Sender, retry_policy
from prxmail.channel._watcher import IMAPConnector, _Watcher
from prxmail.compose import OutgoingAttachment, compose_message, compose_reply
from prxmail.config import Config
from prxmail.conversation import message_thread_id
from prxmail.errors import LocalProtocolError
from prxmail.message import Address, Message
from prxmail.policy import choose_reply_recipient
from prxmail.state import (
    AsyncStateStore,
    MessageKey,
    MessageStatus,
    open_state_store,
)


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
        deferred: Times a message was deferred by the loop guard or the rate limit
            (kept, handed on later; a message deferred twice counts twice).
        held: Times a message was held because its thread looks like a mail loop.
        replied: Messages finished with :meth:`MailChannel.reply`.
        handled: Messages finished with :meth:`MailChannel.mark_handled`.
        failed: Messages finished with :meth:`MailChannel.mark_failed`, or failed by a
            release that used up their attempts.
        released: Messages given back with :meth:`MailChannel.release` to be handed
            on again.
    """

    delivered: int
    rejected: int
    duplicates: int
    replies_queued: int
    replies_sent: int
    in_flight: int
    deferred: int = 0
    held: int = 0
    replied: int = 0
    handled: int = 0
    failed: int = 0
    released: int = 0


class MailChannel(_Watcher, _Sender):
    """An open email channel; see :func:`open_mail_channel`.

    Iterate it (``async for message in channel``) to receive accepted messages, each a
    :class:`~prxmail.message.Message`. Finish every message with exactly one of
    :meth:`reply`, :meth:`mark_handled`, :meth:`mark_failed` or :meth:`release`.

    ``push_latency_hook``, when set, is called with the seconds from an IDLE push
    (EXISTS) to the next message handed out (the service's metrics use it).
    """

    def __init__(
        self,
        config: Config,
        store: AsyncStateStore,
        *,
        rng: random.Random,
        connect_imap: IMAPConnector | None = None,
        connect_smtp: SMTPConnector | None = None,
    ) -> None:
        super().__init__(config, store, rng=rng)
        self._connect_imap = connect_imap
        self._connect_smtp = connect_smtp

    def statistics(self) -> ChannelStatistics:
        """Returns: counters of what the channel did since it opened."""
        return ChannelStatistics(
            delivered=self._counts["delivered"],
            rejected=self._counts["rejected"],
            duplicates=self._counts["duplicates"],
            replies_queued=self._counts["replies_queued"],
            replies_sent=self._counts["replies_sent"],
            in_flight=len(self._in_flight),
            deferred=self._counts["deferred"],
            held=self._counts["held"],
            replied=self._counts["replied"],
            handled=self._counts["handled"],
            failed=self._counts["failed"],
            released=self._counts["released"],
        )

    def __repr__(self) -> str:
        return f"<MailChannel {self.account} folder={self.folder!r}>"

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
        while True:
            await self._handover_idle()
            if self._ahead:
                message = self._ahead.popleft()
            else:
                message = await self._message_receive.receive()
            key = self._key(message)
            if key not in self._unbegun:
                break
            try:
                await self._handover_idle()
            except BaseException:
                self._ahead.appendleft(message)
                raise
            self._handover_busy = True
            try:
                await self._store.begin_handling(key)
            except LocalProtocolError:
                self._drop_unbegun(key)  # not claimed any more: not ours to hand out
                continue
            except BaseException:
                # Not begun (a call cancelled before it started does nothing): the next
                # receive() hands this one out.
                self._ahead.appendleft(message)
                raise
            else:
                self._unbegun.discard(key)
            finally:
                self._handover_done()
            break
        self._counts["delivered"] += 1
        self._note_push_latency()
        return message

    def _note_push_latency(self) -> None:
        # The first hand-over after an IDLE push ends the push's latency.
        pushed, self._pushed_at = self._pushed_at, None
        if pushed is not None and self.push_latency_hook is not None:
            self.push_latency_hook(trio.current_time() - pushed)

    # -- the hand-over ------------------------------------------------------------------
    #
    # In a catch-up the watcher holds message k+1 (claimed, parsed) while you handle k.
    # Beginning k+1 and finishing k are two store calls, each a hop to the store's thread
    # and a commit; a hop costs most while a parse holds the GIL. So messages after the
    # first of a group reach the channel un-begun (``_unbegun``), and finishing k takes
    # k+1 off the channel (into ``_ahead``) and commits both in one transaction
    # (StateStore.finish_and_begin). The durability is that of the two calls in a row:
    # k's outcome is committed no later than k+1 is handed out, and k+1 is 'handling',
    # its attempt counted, before receive() returns it. A message that could not be
    # begun with its predecessor's outcome is begun on its own by receive().
    #
    # Consumers may be several tasks. One begin of a message taken off the channel runs
    # at a time (``_handover_busy``): while it runs, receive() waits for it instead of
    # taking a message that is still being begun, and other finishes do not take one.

    async def _handover_idle(self) -> None:
        while self._handover_busy:
            await self._handover_changed.wait()

    def _handover_done(self) -> None:
        self._handover_busy = False
        self._handover_changed.set()
        self._handover_changed = trio.Event()

    def _take_unbegun(self) -> Message | None:
        """The next message, taken off the channel early, if it still needs beginning."""
        if self._handover_busy:
            return None
        if not self._ahead:
            try:
                self._ahead.append(self._message_receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return None
        if self._key(self._ahead[0]) in self._unbegun:
            return self._ahead[0]
        return None

    def _drop_unbegun(self, key: MessageKey) -> None:
        self._unbegun.discard(key)
        self._in_flight.pop(key, None)
        self._pending_dirty = True
        log_event(logging.WARNING, "message not handed out: no longer claimed", uid=key.uid)

    async def _finish(
        self, key: MessageKey, outcome: MessageStatus, reason: str | None = None
    ) -> None:
        following = self._take_unbegun()
        if following is None:
            if outcome is MessageStatus.HANDLED:
                await self._store.mark_handled(key)
            else:
                await self._store.mark_failed(key, reason or "")
            return
        next_key = self._key(following)
        self._handover_busy = True  # no checkpoint since _take_unbegun saw it idle
        try:
            # Raises (changing nothing) when key cannot be finished; the next message
            # then stays in _ahead un-begun for receive().
            _, begun = await self._store.finish_and_begin(key, outcome, next_key, reason=reason)
            if begun is None:
                self._ahead.remove(following)
                self._drop_unbegun(next_key)
            else:
                self._unbegun.discard(next_key)
        finally:
            self._handover_done()

    async def reply(
        self,
        message: Message,
        body: str,
        *,
        html: str | None = None,
        attachments: Sequence[OutgoingAttachment] = (),
        subject: str | None = None,
    ) -> str:
        """Answer a message: compose the threaded reply once, store it, send it.

        The reply is stored durably (and the message marked ``replied``) before this
        returns, together with its place in the thread (its text is part of the
        thread's history, and the loop guard counts it); the sender task delivers
        it, retrying transient SMTP failures.

        Args:
            message: A message received from this channel and not finished yet.
            body: The reply text; it can never add headers.
            html: An HTML alternative to ``body`` (multipart/alternative).
            attachments: Files to attach (multipart/mixed).
            subject: The subject, used only when ``message`` had none.

        Returns:
            The reply's Message-ID.

        Raises:
            LocalProtocolError: the message was already finished (a reply is never
                composed twice) or an address cannot be written safely.
            ValueError: an attachment or the HTML cannot be composed.
        """
        key = self._key(message)
        to = choose_reply_recipient(message, self._policy)
        outgoing = compose_reply(
            message,
            body,
            from_address=self.config.from_address,
            to=to,
            default_subject=self.config.default_subject,
            html=html,
            attachments=attachments,
            subject=subject,
        )
        draft = _draft(outgoing)
        thread_id = message.thread_id or message_thread_id(message)
        await self._store.record_reply_in_thread(
            key,
            draft,
            entry=self._outgoing_entry(outgoing.message_id, thread_id, outgoing.subject, body),
            activity=self._noted_reply(thread_id),
        )
        self._finished(key, seen=True)
        self._counts["replied"] += 1
        self._counts["replies_queued"] += 1
        self._outbox_generation.value += 1
        return outgoing.message_id

    async def send(
        self,
        to: str,
        subject: str,
        body: str,
        *,
        html: str | None = None,
        attachments: Sequence[OutgoingAttachment] = (),
    ) -> str:
        """Send a new message (not a reply) through the durable outbox.

        The message starts a thread: answers to it are in that thread.

        Args:
            to: The recipient address.
            subject: The subject (``default_subject`` when empty).
            body: The text.
            html: An HTML alternative to ``body`` (multipart/alternative).
            attachments: Files to attach (multipart/mixed).

        Returns:
            The message's Message-ID.

        Raises:
            LocalProtocolError: the address cannot be written safely.
            ValueError: an attachment or the HTML cannot be composed.
        """
        outgoing = compose_message(
            from_address=self.config.from_address,
            to=Address(to),
            subject=subject,
            body=body,
            default_subject=self.config.default_subject,
            html=html,
            attachments=attachments,
        )
        draft = _draft(outgoing)
        thread_id = self._new_thread(outgoing.message_id)
        await self._store.enqueue_in_thread(
            self.account,
            draft,
            entry=self._outgoing_entry(outgoing.message_id, thread_id, outgoing.subject, body),
        )
        self._counts["replies_queued"] += 1
        self._outbox_generation.value += 1
        return outgoing.message_id

    async def mark_handled(self, message: Message) -> None:
        """Finish a message without answering it.

        Raises:
            LocalProtocolError: the message was already finished.
        """
        key = self._key(message)
        await self._finish(key, MessageStatus.HANDLED)
        self._finished(key, seen=True)
        self._counts["handled"] += 1

    async def mark_failed(self, message: Message, reason: str) -> None:
        """Record that a message could not be handled; it is never retried.

        Failed messages are left unseen on the server for a person to look at.

        Raises:
            LocalProtocolError: the message was already finished.
        """
        key = self._key(message)
        await self._finish(key, MessageStatus.FAILED, reason)
        self._finished(key, seen=False)
        self._counts["failed"] += 1

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
        retried = record.status is MessageStatus.CLAIMED
        self._counts["released" if retried else "failed"] += 1
        return retried

    async def _release_in_flight(self) -> None:
        for key in list(self._in_flight):
            if key in self._unbegun:
                # Never handed out (still claimed, no attempt counted): pending() finds
                # it next time, and a release must not count it against its attempts.
                continue
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


def _one_error(
    group: BaseExceptionGroup[BaseException], prefer: BaseException | None
) -> BaseException:
    """Collapse a nursery's group to one exception, whatever it holds.

    Cancellations aside, the group usually holds one error. When several tasks failed
    at once (the watcher and the sender, or a task and the caller's block), the
    caller's own exception wins, else the first; each other one is logged (through the
    redacting log) and named in a note on the one raised, so none disappears.
    """
    collapsed = collapse_exception_group(group)
    if not isinstance(collapsed, BaseExceptionGroup):
        return collapsed
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = exc.exceptions
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    primary = next((exc for exc in leaves if exc is prefer), leaves[0])
    for other in leaves:
        if other is primary:
            continue
        log_event(
            logging.ERROR,
            "mail channel: another error at the same time",
            error=_describe(other),
            raised=type(primary).__name__,
        )
        # The type only: an error's text may hold what a server echoed.
        primary.add_note(f"{type(other).__name__} was raised at the same time (logged)")
    return primary


@contextlib.asynccontextmanager
async def open_mail_channel(
    config: Config,
    *,
    rng: random.Random | None = None,
    connect_imap: IMAPConnector | None = None,
    connect_smtp: SMTPConnector | None = None,
    store: AsyncStateStore | None = None,
) -> AsyncIterator[MailChannel]:
    """Open the email channel: watch the mailbox, deliver accepted mail, send replies.

    Args:
        config: The validated configuration (see :func:`prxmail.config.load_config`).
        rng: Random source for backoff jitter (tests pass a seeded one).
        connect_imap: Opens one IMAP session: a zero-argument callable returning an
            async context manager that yields a greeted
            :class:`~prxmail.imap.IMAPConnection` with TLS set up, not logged in
            (the channel logs in and selects), and closes it on exit -- e.g.
            ``lambda: open_imap_stream(stream, security=...)`` over a stream of your
            own. Default: :func:`~prxmail.imap.open_imap_connection` to
            ``imap_host``/``imap_port`` as configured.
        connect_smtp: Opens one SMTP connection: a zero-argument async callable
            returning an :class:`~prxmail.smtp.SMTPConnection` ready to send
            (handshake done, logged in); the channel closes it. Called again for each
            reconnect. Default: ``smtp_host``/``smtp_port`` with the configured login.
        store: An open state store to use instead of opening ``state_dir``: the
            accounts of one process share one (its directory lock allows one opener),
            each keeping its rows apart by account. The caller closes it. See
            :func:`open_mail_channels`.

    Yields:
        The :class:`MailChannel`. Leaving the block stops both tasks; messages you
        received but did not finish are released to be handed on again next time.

    Raises:
        StateError: the state directory is in use by another process or unusable.
        Any exception from the block itself, unwrapped. Never an ExceptionGroup:
        when several things fail at once (the block and a task, or both tasks), the
        block's own exception is raised, else the first task's; the others are
        logged and named in a note on it.
    """
    source = rng or random.Random()  # noqa: S311 - jitter only
    collapsed: BaseException
    body_error: BaseException | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if store is None:
                store = await stack.enter_async_context(
                    open_state_store(
                        config.state_dir, retry_policy=retry_policy(config), rng=source
                    )
                )
            # Load the trust store in a thread (tens of ms the first time); the channel's
            # own call below then finds it in the process-wide cache.
            await trio.to_thread.run_sync(shared_ssl_context, config.tls_ca_file)
            channel = MailChannel(
                config, store, rng=source, connect_imap=connect_imap, connect_smtp=connect_smtp
            )
            try:
                async with trio.open_nursery() as nursery:
                    # The tasks copy the context they start in: every line they log
                    # names the account, whoever opened the channel.
                    with account_context(config.name):
                        await nursery.start(channel._run_sender)
                        await nursery.start(channel._run_watcher)
                        await nursery.start(channel._run_heartbeat)
                    try:
                        yield channel
                    except BaseException as exc:
                        body_error = exc
                        raise
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await channel._release_in_flight()
    except BaseExceptionGroup as group:
        collapsed = _one_error(group, body_error)
    else:
        return
    # Raised outside the except block so the group does not become its __context__.
    raise collapsed


@contextlib.asynccontextmanager
async def open_mail_channels(
    configs: Sequence[Config],
    *,
    rng: random.Random | None = None,
) -> AsyncIterator[dict[str, MailChannel]]:
    """Open one channel per account, all on one state store (see :func:`open_mail_channel`).

    The accounts come from :func:`prxmail.config.load_accounts`; they share
    ``state_dir`` (the configuration makes sure of it), so the store is opened once and
    each channel keeps its messages, outbox and threads apart by account. A server
    that refuses one account's login or is down does not stop the others: each
    channel retries on its own. A channel whose tasks *fail* (the state store broke, a
    bug) ends the block for all of them, as with one channel; ``prxmail serve``
    (:func:`prxmail.service.serve_mail_channels`) instead keeps every account apart.

    Args:
        configs: One configuration per account, unique ``name`` each, same ``state_dir``.
        rng: Random source for backoff jitter.

    Yields:
        The open channels by account name, in the order given.

    Raises:
        LocalProtocolError: no configuration, names not unique, or ``state_dir``
            differs.
        StateError: the state directory is in use by another process or unusable.
    """
    state_dir = shared_state_dir(configs)
    source = rng or random.Random()  # noqa: S311 - jitter only
    async with (
        open_state_store(state_dir, retry_policy=retry_policy(configs[0]), rng=source) as store,
        contextlib.AsyncExitStack() as stack,
    ):
        channels: dict[str, MailChannel] = {}
        for config in configs:
            channels[config.name] = await stack.enter_async_context(
                open_mail_channel(config, rng=source, store=store)
            )
        yield channels


def shared_state_dir(configs: Sequence[Config]) -> Path:
    """The one state directory of a process's accounts.

    Args:
        configs: The accounts.

    Returns:
        Their common ``state_dir``.

    Raises:
        LocalProtocolError: no account, two with one name, or a ``state_dir`` that
            differs (one process holds one store: its directory lock allows one).
    """
    if not configs:
        raise LocalProtocolError("no account to open")
    names = [config.name for config in configs]
    if len(set(names)) != len(names):
        raise LocalProtocolError(f"account names must be unique, got {names}")
    state_dir = configs[0].state_dir
    for config in configs[1:]:
        if config.state_dir != state_dir:
            raise LocalProtocolError(
                f"account {config.name!r} has another state_dir than {configs[0].name!r};"
                " the accounts of one process share one state directory"
            )
    return state_dir
