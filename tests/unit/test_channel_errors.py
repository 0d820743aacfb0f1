"""open_mail_channel's error contract: one exception out, never an ExceptionGroup.

The channel's tasks get their connections from the connect_imap= / connect_smtp=
hooks, so a test decides exactly when and how each side fails -- no server, no socket.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from prxmail.channel import open_mail_channel
from prxmail.imap import IMAPConnection
from prxmail.smtp import SMTPConnection
from prxmail.state import OutboxDraft, StateStore, account_key
from tests.unit.test_channel_fake_imap import fake_config

pytestmark = pytest.mark.timeout(60)


def logged_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``error`` fields of the channel's log events (log_event keeps fields apart)."""
    return [str(r.fields["error"]) for r in caplog.records if "error" in getattr(r, "fields", {})]


class Rendezvous:
    """Makes ``parties`` tasks fail in the same scheduler tick: the last to arrive
    wakes the others, and each raises before its next checkpoint, so the nursery's
    cancellation cannot turn any of them into a mere Cancelled."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.all_here = trio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == self.parties:
            self.all_here.set()
        else:
            await self.all_here.wait()


def failing_imap(
    meeting: Rendezvous, error: Exception
) -> Callable[[], AbstractAsyncContextManager[IMAPConnection]]:
    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[IMAPConnection]:
        await meeting.arrive()
        raise error
        yield  # an async generator that never yields a connection

    def connect() -> AbstractAsyncContextManager[IMAPConnection]:
        return session()

    return connect


def queue_one_reply(state_dir: Path) -> None:
    """Something due in the outbox, so the sender connects as soon as it starts."""
    with StateStore(state_dir) as store:
        store.enqueue(
            account_key("bot@example.com", "127.0.0.1", 9),
            OutboxDraft(
                message_id="<due@example.com>",
                envelope_from="bot@example.com",
                envelope_to=("alice@example.com",),
                raw=b"Subject: hi\r\n\r\nhello\r\n",
            ),
        )


async def test_two_tasks_failing_at_once_raise_one_error_and_log_the_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    queue_one_reply(state)
    meeting = Rendezvous(2)

    async def connect_smtp() -> SMTPConnection:
        await meeting.arrive()
        raise RuntimeError("the SMTP side broke")

    config = fake_config(9, state)
    caplog.set_level(logging.ERROR)
    with pytest.raises(RuntimeError) as info:
        async with open_mail_channel(
            config,
            connect_imap=failing_imap(meeting, RuntimeError("the IMAP side broke")),
            connect_smtp=connect_smtp,
        ):
            await trio.sleep_forever()
    raised = info.value
    assert not isinstance(raised, BaseExceptionGroup)
    assert str(raised) in {"the IMAP side broke", "the SMTP side broke"}
    other = ({"the IMAP side broke", "the SMTP side broke"} - {str(raised)}).pop()
    # The other one is not lost: logged with its text, named on the one raised.
    assert f"RuntimeError: {other}" in logged_errors(caplog)
    assert raised.__notes__ == ["RuntimeError was raised at the same time (logged)"]


async def test_the_callers_own_error_wins_over_a_task_failing_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meeting = Rendezvous(2)
    config = fake_config(9, tmp_path / "state")
    caplog.set_level(logging.ERROR)

    async def use_channel() -> None:
        async with open_mail_channel(
            config, connect_imap=failing_imap(meeting, RuntimeError("the watcher broke"))
        ):
            await meeting.arrive()
            raise ValueError("the caller's own")

    with pytest.raises(ValueError, match="the caller's own") as info:
        await use_channel()
    assert not isinstance(info.value, BaseExceptionGroup)
    assert "RuntimeError: the watcher broke" in logged_errors(caplog)
