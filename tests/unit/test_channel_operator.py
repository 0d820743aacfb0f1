"""The running channel and the operator commands: heartbeat rows and "retry now"."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from prxmail.channel import open_mail_channel
from prxmail.channel._core import OPERATOR_POLL_SECONDS
from prxmail.state import MessageStatus, StateStore, account_key
from tests.unit.test_channel_fake_imap import FakeIMAP, fake_config, raw_message

pytestmark = pytest.mark.timeout(60)

ACCOUNT = account_key("bot@example.com", "127.0.0.1", 9)


async def test_heartbeat_is_written_and_a_retried_message_comes_again_at_once(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    fake = FakeIMAP(messages={1: raw_message(1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, state)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                message = await channel.receive()
            await channel.mark_failed(message, "handler exited with status 3")
            await channel.status.wait_value(lambda s: s.imap == "idle")
            with trio.fail_after(10):
                while True:
                    with StateStore(state, read_only=True) as reader:
                        beat = reader.heartbeat(ACCOUNT)
                    if beat is not None and beat.imap == "idle":
                        break
                    await trio.sleep(0.05)
            assert beat.last_connected_at is not None
            assert beat.stopped_at is None
            # `prxmail messages retry` from another process, while the watcher IDLEs
            # (its IDLE window is many minutes: only the operator request wakes it).
            with StateStore(state, shared=True) as operator:
                (failed,) = operator.operator_messages(ACCOUNT, MessageStatus.FAILED)
                operator.retry_message(ACCOUNT, failed.id)
            with trio.fail_after(OPERATOR_POLL_SECONDS * 5):
                again = await channel.receive()
            assert again.uid == 1
            await channel.mark_handled(again)
        nursery.cancel_scope.cancel()
    with StateStore(state, read_only=True) as reader:
        last = reader.heartbeat(ACCOUNT)
    assert last is not None
    assert last.stopped_at is not None  # a clean stop says so at once
