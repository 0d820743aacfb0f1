"""The running channel and the operator commands: heartbeat rows and "retry now"."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import trio

from prxmail.channel import MailChannel, open_mail_channel
from prxmail.channel._core import OPERATOR_POLL_SECONDS
from prxmail.smtp import SendResult
from prxmail.smtp._protocol import Command, Reply
from prxmail.state import MessageStatus, OutboxDraft, StateStore, account_key, open_state_store
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


async def test_a_reply_dropped_while_on_the_wire_does_not_stop_the_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    config = fake_config(9, state)
    draft = OutboxDraft("<r1@example.com>", "bot@example.com", ["alice@example.com"], b"x")
    sent = SendResult(Reply(250, ("queued",), Command.DATA), ())
    caplog.set_level(logging.INFO)
    async with open_state_store(state) as store:
        channel = MailChannel(config, store, rng=random.Random(0))
        item = await store.enqueue(ACCOUNT, draft)
        # `prxmail outbox drop` runs while the server is accepting the message.
        with StateStore(state, shared=True) as operator:
            operator.drop_outbox(ACCOUNT, item.id, "wrong answer")
        await channel._record_sent(item, sent)  # no LocalProtocolError: logged instead
        await channel._record_send_failure(item, OSError("connection reset"))
        assert await store.get_outbox_item(item.id) is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped it from the outbox meanwhile" in m for m in messages)
    assert any("dropped reply not sent" in m for m in messages)
