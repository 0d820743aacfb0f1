"""A push to one account goes ahead of another account's catch-up (issue 16, target 5).

Two channels on one state store, each against its own scripted IMAP server over memory
streams (the fake of test_channel_fake_imap). The bulk account's group is parsed in a
worker thread; while the chat account handles its push, that thread waits between two
messages (the push gate of prxmail.channel._fetch), so the push's steps do not wait
for the GIL behind it. Ordering is forced with events, never with timing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import attrs
import pytest
import trio

from prxmail.channel import _fetch as fetch_module
from prxmail.channel import open_mail_channel
from prxmail.state import open_state_store
from tests.unit.test_channel_fake_imap import FakeIMAP, fake_config, raw_message

pytestmark = pytest.mark.timeout(60)

# Enough 1 KB messages that the group is over INLINE_PARSE_BYTES: parsed in a thread.
BULK = 12
# The threads' waits in this test: far beyond anything it needs, never reached.
WAIT = 20.0


def bulk_message(uid: int) -> bytes:
    return raw_message(uid).replace(b"\r\n\r\n", b"\r\n\r\n" + b"x" * 1000 + b"\r\n", 1)


def test_the_bulk_group_is_big_enough_for_a_worker_thread() -> None:
    assert not fetch_module.parse_inline([bulk_message(uid) for uid in range(1, BULK + 1)])
    assert fetch_module.parse_inline([raw_message(1)])  # the push: on the loop


async def test_a_push_to_one_account_is_handed_over_while_another_accounts_group_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No deadline in this test: the pause lasts exactly as long as the push.
    monkeypatch.setattr(fetch_module, "PUSH_PAUSE_SECONDS", 3600.0)
    real_parse = fetch_module.parse_message
    real_enter = fetch_module._PushGate.enter
    real_pause = fetch_module._PushGate.pause
    bulk_parsing = threading.Event()  # the bulk thread has started on its group
    push_entered = threading.Event()  # chat's push holds the gate
    chat_received = threading.Event()  # chat's consumer has its message
    # uid -> pushes in progress when the bulk thread started parsing it (as its pause
    # before the message left them).
    bulk_parses: dict[int, int] = {}
    after_pause = [-1]

    def parse(raw: bytes, *, uid: int, **kwargs: int) -> object:
        if threading.current_thread() is not threading.main_thread():  # bulk, in its thread
            bulk_parses[uid] = after_pause[0]
            if uid == 1:
                bulk_parsing.set()
                assert push_entered.wait(WAIT)
            if uid == BULK:
                # The group is not done before chat's message is handed over.
                assert chat_received.wait(WAIT)
        return real_parse(raw, uid=uid, **kwargs)

    def enter(self: fetch_module._PushGate) -> None:
        real_enter(self)
        push_entered.set()

    def pause(self: fetch_module._PushGate) -> None:
        real_pause(self)
        after_pause[0] = self.pushes

    monkeypatch.setattr(fetch_module, "parse_message", parse)
    monkeypatch.setattr(fetch_module._PushGate, "pause", pause)
    monkeypatch.setattr(fetch_module._PushGate, "enter", enter)
    bulk_fake = FakeIMAP(messages={uid: bulk_message(uid) for uid in range(1, BULK + 1)})
    chat_fake = FakeIMAP()
    state = tmp_path / "state"
    bulk_config = attrs.evolve(fake_config(9, state), name="bulk")
    chat_config = attrs.evolve(fake_config(10, state), name="chat")
    async with trio.open_nursery() as nursery, open_state_store(state) as store:
        async with (
            open_mail_channel(
                chat_config, connect_imap=chat_fake.connector(nursery), store=store
            ) as chat,
            open_mail_channel(
                bulk_config, connect_imap=bulk_fake.connector(nursery), store=store
            ) as bulk,
        ):
            with trio.fail_after(WAIT):
                await chat.status.wait_value(lambda s: s.imap == "idle")
                # The bulk thread waits inside its first parse until the push holds
                # the gate (no bulk message is handed out before, so none is finished).
                await trio.to_thread.run_sync(bulk_parsing.wait, WAIT)
                chat_fake.add(1, raw_message(1))
                message = await chat.receive()
            chat_received.set()
            assert message.subject == "fake 1"
            await chat.mark_handled(message)
            with trio.fail_after(WAIT):
                for uid in range(1, BULK + 1):
                    got = await bulk.receive()
                    assert got.subject == f"fake {uid}"
                    await bulk.mark_handled(got)
        nursery.cancel_scope.cancel()
    assert sorted(bulk_parses) == list(range(1, BULK + 1))
    assert bulk_parses[1] == 0  # started before the push
    # Every later message of the group waited until the push was handed over.
    assert all(bulk_parses[uid] == 0 for uid in range(2, BULK + 1)), bulk_parses


def test_a_parse_thread_waits_only_while_a_push_is_in_progress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetch_module, "PUSH_PAUSE_SECONDS", 3600.0)
    gate = fetch_module._PushGate()
    gate.pause()  # no push: returns at once
    gate.enter()
    gate.enter()
    done = threading.Event()

    def parse_thread() -> None:
        gate.pause()
        done.set()

    thread = threading.Thread(target=parse_thread)
    thread.start()
    gate.leave()
    assert gate.pushes == 1
    assert not done.wait(0.05)  # one push still in progress
    gate.leave()
    thread.join(WAIT)
    assert done.is_set()
    assert gate.pushes == 0


def test_a_parse_thread_waits_no_longer_than_the_pause_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fetch_module, "PUSH_PAUSE_SECONDS", 0.0)
    gate = fetch_module._PushGate()
    gate.enter()  # a push that never ends (a consumer that never takes it, say)
    gate.pause()  # returns: the bound is over
    assert gate.pushes == 1
