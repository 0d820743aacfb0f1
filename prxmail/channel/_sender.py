"""The sender: the durable outbox drained over one SMTP connection.

Theory of operation: the sender task keeps an SMTP sender open, reads due outbox
items in batches of :data:`OUTBOX_BATCH`, sends several at once pipelined in one
exchange, and records every outcome durably (sent, transient failure with its retry
time, permanent refusal). Between batches it sleeps until the next item is due, the
outbox generation changes (a reply was queued), or :data:`OUTBOX_RECHECK_SECONDS`
pass, so a lost wake-up costs at most that delay. Nothing it does blocks the watcher.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final

import trio

from prxmail._diagnosis import diagnose
from prxmail._log import log_event
from prxmail.channel._core import _COMMAND_TIMEOUT, _ChannelCore, _describe, _time_limit
from prxmail.compose import OutgoingMessage
from prxmail.config import Config
from prxmail.errors import (
    AuthenticationError,
    ConnectionBrokenError,
    LocalProtocolError,
    PrxmailError,
    SMTPPermanentError,
)
from prxmail.smtp import (
    MailTransaction,
    SendResult,
    SMTPConnection,
    SMTPSender,
    connect_smtp,
)
from prxmail.state import OutboxDraft, OutboxItem, RetryPolicy

# Outbox items sent per state-store query; each holds its raw message in memory.
OUTBOX_BATCH: Final = 20

# The sender re-reads the outbox at least this often even without a wake-up, so items
# whose retry time arrives are picked up and a lost wake-up costs at most this delay.
OUTBOX_RECHECK_SECONDS: Final = 60.0


def retry_policy(config: Config) -> RetryPolicy:
    """The outbox backoff of one account (``smtp_retry_initial_secs`` / ``_max_secs``).

    Args:
        config: The account's configuration.

    Returns:
        The policy; the state store is shared by accounts, so it is passed per call.
    """
    return RetryPolicy(
        initial_delay=float(config.smtp_retry_initial_secs),
        max_delay=float(config.smtp_retry_max_secs),
    )


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


# Opens a new SMTP connection ready to send (handshake done, logged in); the sender
# closes it. open_mail_channel's connect_smtp= replaces the real one, e.g. with a
# scripted peer over a memory stream in tests.
SMTPConnector = Callable[[], Awaitable[SMTPConnection]]


class _Sender(_ChannelCore):
    """The sender task of a channel (see the module comment)."""

    _connect_smtp: SMTPConnector | None = None
    # Whether the last connection attempt reached the server (TCP, TLS and greeting
    # done): a send that fails before that "cannot connect" and carries the doctor's
    # diagnosis. A send over a reused connection makes no attempt and keeps True.
    _smtp_connected: bool = False

    async def _open_smtp(self) -> SMTPConnection:
        """One new connection for the SMTPSender, noting whether it got connected."""
        self._smtp_connected = False
        if self._connect_smtp is not None:
            conn = await self._connect_smtp()
            self._smtp_connected = True
            return conn
        config = self.config
        conn = await connect_smtp(
            config.smtp_host,
            config.smtp_port,
            security=config.smtp_security,
            ssl_context=self._ssl_context,
        )
        self._smtp_connected = True
        try:
            await self._login.smtp(conn)
        except BaseException:
            await conn.aclose()
            raise
        return conn

    async def _run_sender(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # As open_smtp_sender, with the connect step of the channel's own (_open_smtp).
        opened: AbstractAsyncContextManager[SMTPSender]
        opened = contextlib.aclosing(SMTPSender(self._open_smtp))
        async with opened as smtp:
            task_status.started()
            while True:
                generation = self._outbox_generation.value
                items = await self._store.due_outbox(limit=OUTBOX_BATCH, account=self.account)
                if len(items) == 1:
                    await self._send_one(smtp, items[0])
                elif items:
                    await self._send_batch(smtp, items)
                if len(items) == OUTBOX_BATCH:
                    continue
                next_at = await self._store.next_due_at(account=self.account)
                delay = math.inf if next_at is None else max(0.0, next_at - time.time())
                with trio.move_on_after(min(delay, OUTBOX_RECHECK_SECONDS)):
                    await self._outbox_generation.wait_value(lambda v, g=generation: v != g)

    async def _send_one(self, smtp: SMTPSender, item: OutboxItem) -> None:
        try:
            with _time_limit(self.config.command_timeout_secs, "SMTP send", _COMMAND_TIMEOUT):
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
            with _time_limit(
                self.config.command_timeout_secs * len(items),
                f"SMTP send of {len(items)} pipelined messages",
                f"{len(items)} x {_COMMAND_TIMEOUT}",
            ):
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
        try:
            await self._store.mark_sent_many(item.id for item, _ in sent)
        except LocalProtocolError:
            # An operator dropped one of them while it was on the wire (nothing was
            # committed): record the others one by one.
            for item, result in sent:
                await self._record_sent(item, result)
        else:
            for item, result in sent:
                self._log_sent(item, result)
        for item, reported in zip(items, outcomes, strict=True):
            if reported.result is None:
                error = reported.error or ConnectionBrokenError("no outcome for this message")
                await self._record_send_failure(item, error)

    async def _record_sent(self, item: OutboxItem, result: SendResult) -> None:
        try:
            await self._store.mark_sent(item.id)
        except LocalProtocolError:
            if await self._dropped_meanwhile(item):
                log_event(
                    logging.WARNING,
                    "reply sent, but an operator dropped it from the outbox meanwhile",
                    **_outbox_fields(item),
                )
                return
            raise
        self._log_sent(item, result)

    async def _dropped_meanwhile(self, item: OutboxItem) -> bool:
        """Whether ``prxmail outbox drop`` removed the item while it was being sent:
        the one way an item we read as queued can vanish."""
        return await self._store.get_outbox_item(item.id) is None

    def _log_sent(self, item: OutboxItem, result: SendResult) -> None:
        self._counts["replies_sent"] += 1
        self._set_status(smtp_error=None)
        refused = ", ".join(f"{r.address} ({r.reply.code})" for r in result.refused) or None
        log_event(logging.INFO, "reply sent", **_outbox_fields(item), refused=refused)

    async def _record_send_failure(self, item: OutboxItem, exc: BaseException) -> None:
        fields = _outbox_fields(item)
        if await self._dropped_meanwhile(item):
            log_event(logging.INFO, "dropped reply not sent", **fields, error=_describe(exc))
            return
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
        updated = await self._store.mark_transient_failure(
            item.id, _describe(exc), policy=retry_policy(self.config)
        )
        self._set_status(smtp_error=_describe(exc))
        level = logging.ERROR if isinstance(exc, AuthenticationError) else logging.WARNING
        # As in the watcher: only a failed connect (or a refused login) is diagnosed.
        config = self.config
        found = (
            diagnose(exc, proto="smtp", host=config.smtp_host, port=config.smtp_port, config=config)
            if not self._smtp_connected or isinstance(exc, AuthenticationError)
            else None
        )
        advice = {
            "diagnosis": found.summary if found else None,
            "hint": found.hint if found else None,
        }
        if updated.status is not updated.status.QUEUED:
            log_event(
                logging.ERROR,
                "reply given up after retries",
                **fields,
                error=_describe(exc),
                **advice,
            )
        else:
            log_event(
                level,
                "reply not sent yet, will retry"
                if self._smtp_connected
                else "SMTP cannot connect: reply not sent yet, will retry",
                **fields,
                attempts=updated.attempts,
                retry_in=round(max(0.0, updated.next_attempt_at - time.time()), 1),
                error=_describe(exc),
                **advice,
            )
