"""The channel's watcher against a scripted IMAP server, over memory streams.

open_mail_channel's connect_imap= hands the watcher a fresh
trio.testing.memory_stream_pair per session with the fake on the far end: no socket,
and the tests that are about timing run on a frozen MockClock they jump by hand.

Faults a real server will not produce on demand are injected here: a connection that
goes silent in the middle of IDLE (a NAT box that forgot it), a server without IDLE
(polling), and the IDLE renewal schedule. The fake speaks just enough IMAP4rev1.
"""

from __future__ import annotations

import functools
import logging
import re
import resource
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from prxmail._tls import Security
from prxmail.channel import (
    RECONNECT_INITIAL_SECONDS,
    ChannelStatus,
    MailChannel,
    open_mail_channel,
)
from prxmail.channel import _watcher as channel_watcher
from prxmail.channel._fetch import OVERSIZE_DEFECT, POISON_ATTEMPTS
from prxmail.channel._watcher import IMAPConnector
from prxmail.compose import OutgoingAttachment
from prxmail.config import Config, parse_config
from prxmail.imap import IMAPConnection, open_imap_stream
from prxmail.state import MessageKey, MessageStatus, StateStore, account_key
from tests.faults._logs import LogRecords, captured_logs

pytestmark = pytest.mark.timeout(60)

UIDVALIDITY = 77
# A hostile answer to a partial fetch of at most 1 MiB (issue 11 item 2: 250 MB).
HUGE_LITERAL = 250 * 1000 * 1000


def raw_message(uid: int, sender: str = "alice@example.com") -> bytes:
    return (
        f"From: {sender}\r\nTo: bot@example.com\r\nSubject: fake {uid}\r\n"
        f"Message-ID: <fake-{uid}@example.com>\r\n\r\nbody {uid}\r\n"
    ).encode()


@attrs.define
class FakeIMAP:
    """A scripted IMAP server: one folder, messages by UID, switchable faults."""

    idle: bool = True
    messages: dict[int, bytes] = attrs.field(factory=dict)
    seen: set[int] = attrs.field(factory=set)
    go_silent_in_idle: bool = False
    no_body: set[int] = attrs.field(factory=set)
    # UIDs whose body FETCH response is malformed (a parser-refused response).
    garbage_for: set[int] = attrs.field(factory=set)
    # UIDs whose RFC822.SIZE is reported as this many bytes (a lying server).
    size_lie: dict[int, int] = attrs.field(factory=dict)
    # UIDs SEARCH lists but FETCH returns nothing for.
    vanish: set[int] = attrs.field(factory=set)
    # UIDs every UID SEARCH lists as well (old mail reported as new).
    extra_search: list[int] = attrs.field(factory=list)
    # UIDs whose body comes as a 250 MB literal (only its first MiB is sent).
    huge_literal_for: set[int] = attrs.field(factory=set)
    # Drop the connection as soon as IDLE starts (a flaky link).
    drop_in_idle: bool = False
    commands: list[str] = attrs.field(factory=list)
    # While set, a command is recorded but not answered (a server gone slow).
    stalled: bool = False
    connections: int = 0
    reported: int = 0
    idle_starts: list[float] = attrs.field(factory=list)
    new_mail: trio.Event = attrs.field(factory=trio.Event)
    # Set (and replaced) whenever the fake's record changes, so a test can wait for a
    # state without polling on a clock (the memory-stream tests freeze the clock).
    changed: trio.Event = attrs.field(factory=trio.Event)

    def _record_changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds for what the fake recorded; no clock involved."""
        while not predicate():
            await self.changed.wait()

    def connector(self, nursery: trio.Nursery) -> IMAPConnector:
        """A ``connect_imap`` for open_mail_channel: each session is a fresh memory
        stream pair with this fake on the far end, so no socket and no real time."""

        def connect() -> AbstractAsyncContextManager[IMAPConnection]:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(self.handle, server)
            return open_imap_stream(client, security=Security.PLAIN)

        return connect

    def caps(self) -> str:
        return "IMAP4rev1 LITERAL+" + (" IDLE" if self.idle else "")

    def add(self, uid: int, raw: bytes) -> None:
        self.messages[uid] = raw
        self.new_mail.set()
        self.new_mail = trio.Event()

    def uids_in(self, spec: str) -> list[int]:
        present = sorted(self.messages)
        found: set[int] = set()
        for part in spec.split(","):
            lo, _, hi = part.partition(":")
            start = int(lo)
            end = (max(present, default=0) if hi == "*" else int(hi)) if hi else start
            if hi == "*" and present and start > present[-1]:
                found.add(present[-1])  # "n:*" always matches the highest UID
                continue
            found.update(u for u in present if min(start, end) <= u <= max(start, end))
        return sorted(found)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        # The client may drop the connection at any moment (that is what it does on
        # shutdown and after a timeout): that ends this session, not the server.
        try:
            await self._session(stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # also from inside the IDLE nursery, wrapped in an ExceptionGroup

    async def _session(self, stream: trio.abc.Stream) -> None:
        buf = b""

        async def send(line: str | bytes) -> None:
            data = line if isinstance(line, bytes) else line.encode()
            await stream.send_all(data + (b"" if data.endswith(b"\r\n") else b"\r\n"))

        async def read_line() -> str | None:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                buf += chunk
            line, _, buf = buf.partition(b"\r\n")
            return line.decode()

        await send(f"* OK [CAPABILITY {self.caps()}] fake ready")
        while True:
            line = await read_line()
            if line is None:
                return
            self.commands.append(line)
            self._record_changed()
            await self.until(lambda: not self.stalled)
            tag, _, rest = line.partition(" ")
            command = rest.upper()
            if command.startswith("CAPABILITY"):
                await send(f"* CAPABILITY {self.caps()}")
                await send(f"{tag} OK done")
            elif command.startswith("LOGIN"):
                await send(f"{tag} OK [CAPABILITY {self.caps()}] logged in")
            elif command.startswith("SELECT"):
                self.reported = len(self.messages)
                await send(f"* {len(self.messages)} EXISTS")
                await send(f"* OK [UIDVALIDITY {UIDVALIDITY}] ok")
                await send(f"* OK [UIDNEXT {max(self.messages, default=0) + 1}] ok")
                await send(f"{tag} OK [READ-WRITE] selected")
            elif command.startswith("UID SEARCH"):
                self.reported = len(self.messages)
                if "UNSEEN" in command:
                    found = [u for u in sorted(self.messages) if u not in self.seen]
                else:
                    match = re.search(r"UID ([0-9:*,]+)\s*$", command)
                    assert match is not None, line
                    found = self.uids_in(match.group(1))
                    found = sorted({*found, *self.extra_search, *self.vanish})
                await send("* SEARCH" + "".join(f" {u}" for u in found))
                await send(f"{tag} OK searched")
            elif command.startswith("UID FETCH"):
                spec = command.split()[2]
                partial = re.search(r"BODY\.PEEK\[\]<0\.(\d+)>", command)
                for seq, uid in enumerate(self.uids_in(spec), start=1):
                    if uid in self.vanish:
                        continue
                    raw = self.messages[uid]
                    items = [f"UID {uid}"]
                    if "RFC822.SIZE" in command:
                        items.append(f"RFC822.SIZE {self.size_lie.get(uid, len(raw))}")
                    if "BODY.PEEK[]" in command and uid in self.huge_literal_for:
                        head = f"* {seq} FETCH ({' '.join(items)} BODY[]<0> {{{HUGE_LITERAL}}}"
                        await send(head.encode())
                        await stream.send_all(b"x" * (1024 * 1024))
                        while await read_line() is not None:
                            pass  # the client refuses it and hangs up
                        return
                    if "BODY.PEEK[]" in command and uid in self.garbage_for:
                        await send(f"* {seq} FETCH ({' '.join(items)} BODY[] ((( garbage")
                        continue
                    if "BODYSTRUCTURE" in command:
                        items.append(
                            "BODYSTRUCTURE"
                            f' ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" {len(raw)} 2)'
                        )
                    if "BODY.PEEK[]" in command and uid in self.no_body:
                        items.append("FLAGS ()")
                    elif "BODY.PEEK[]" in command:
                        name, data = "BODY[]", raw
                        if partial is not None:
                            name, data = "BODY[]<0>", raw[: int(partial.group(1))]
                        head = " ".join(items)
                        await send(f"* {seq} FETCH ({head} {name} {{{len(data)}}}".encode())
                        await stream.send_all(data + b")\r\n")
                        continue
                    await send(f"* {seq} FETCH ({' '.join(items)})")
                await send(f"{tag} OK fetched")
            elif command.startswith("UID STORE"):
                self.seen.update(self.uids_in(command.split()[2]))
                self._record_changed()
                await send(f"{tag} OK stored")
            elif command.startswith("NOOP"):
                await send(f"{tag} OK noop")
            elif command.startswith("IDLE"):
                self.idle_starts.append(trio.current_time())
                self._record_changed()
                await send("+ idling")
                if self.drop_in_idle:
                    await stream.aclose()
                    return
                if self.go_silent_in_idle:
                    # Swallow everything from now on: the connection "died".
                    while await read_line() is not None:
                        pass
                    return
                async with trio.open_nursery() as nursery:

                    async def push_new() -> None:
                        # Like a real server: report what changed since the session
                        # last heard about the mailbox, or wait for a change.
                        while len(self.messages) == self.reported:
                            await self.new_mail.wait()
                        self.reported = len(self.messages)
                        await send(f"* {self.reported} EXISTS")

                    nursery.start_soon(push_new)
                    done = await read_line()
                    nursery.cancel_scope.cancel()
                if done is None:
                    return
                assert done.upper() == "DONE", done
                await send(f"{tag} OK idle done")
            elif command.startswith("LOGOUT"):
                await send("* BYE bye")
                await send(f"{tag} OK logged out")
                return
            else:
                await send(f"{tag} BAD unknown command")


def fake_config(port: int, state_dir: Path, **extra: object) -> Config:
    lines = [
        "[channels_config.email]",
        'imap_host = "127.0.0.1"',
        f"imap_port = {port}",
        'imap_security = "plain"',
        'smtp_host = "127.0.0.1"',
        "smtp_port = 9",
        'smtp_security = "plain"',
        'username = "bot@example.com"',
        'password = "pw"',
        'from_address = "bot@example.com"',
        'allowed_senders = ["alice@example.com"]',
        f'state_dir = "{state_dir}"',
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return parse_config("\n".join(lines) + "\n")


async def fake_until(fake: FakeIMAP, predicate: Callable[[], bool]) -> None:
    """Wait for a state of the fake, woken by its changes (no polling), bounded."""
    with trio.fail_after(10):
        await fake.until(predicate)


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a condition the fake server changes (it has no events of its own)."""
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - polling another task's plain state
            await trio.sleep(0.05)


async def channel_receive(channel: MailChannel) -> str:
    """The next message's subject (marked handled), with no clock-based bound: the
    frozen-clock tests rely on the module's pytest timeout for a hang instead."""
    message = await channel.receive()
    await channel.mark_handled(message)
    return message.subject


async def receive(channel: MailChannel) -> str:
    with trio.fail_after(10):
        message = await channel.receive()
    await channel.mark_handled(message)
    return message.subject


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """Virtual time that moves only when a test jumps it: a timer that fires proves a
    schedule, one that does not cannot be a slow machine. (Not the autojump clock:
    the state store works in a thread, and autojump would leap over its calls.)"""
    return trio.testing.MockClock()


async def test_new_mail_during_idle_is_fetched_at_once_and_flagged_seen(
    tmp_path: Path, frozen_clock: trio.testing.MockClock
) -> None:
    fake = FakeIMAP(messages={1: raw_message(1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await channel_receive(channel) == "fake 1"  # unseen on first start
            await channel.status.wait_value(lambda s: s.imap == "idle")
            started = trio.current_time()
            fake.add(2, raw_message(2))
            assert await channel_receive(channel) == "fake 2"
            # EXISTS -> search -> fetch -> you with the clock standing still: no timer
            # (the 300 s keepalive, a poll) had to fire for it.
            assert trio.current_time() == started
            await fake.until(lambda: fake.seen == {1, 2})
        nursery.cancel_scope.cancel()
    assert not any("BODY[]" in c.upper() and "PEEK" not in c.upper() for c in fake.commands)


async def test_idle_is_renewed_before_the_keepalive(
    tmp_path: Path, frozen_clock: trio.testing.MockClock
) -> None:
    fake = FakeIMAP()
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", keepalive_secs=1)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)):
            await fake.until(lambda: len(fake.idle_starts) == 1)
            for renewals in range(1, 4):
                # Until the channel has the server's "+" and waits in IDLE, its window
                # has not started.
                await trio.testing.wait_all_tasks_blocked()
                # Binary fractions, so the two jumps add up to the window exactly.
                frozen_clock.jump(0.75)
                await trio.testing.wait_all_tasks_blocked()
                assert len(fake.idle_starts) == renewals  # not before the window ends
                frozen_clock.jump(0.25)
                await fake.until(lambda n=renewals: len(fake.idle_starts) == n + 1)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(fake.idle_starts, fake.idle_starts[1:], strict=False)]
    assert gaps == pytest.approx([1.0, 1.0, 1.0])  # exactly the window, in virtual time
    assert fake.connections == 1  # renewal, not reconnection


async def test_silent_connection_is_detected_and_replaced(tmp_path: Path) -> None:
    fake = FakeIMAP(go_silent_in_idle=True)
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", keepalive_secs=1, command_timeout_secs=1)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(15):
                await channel.status.wait_value(lambda s: s.reconnects >= 1)
            status: ChannelStatus = channel.status.value
            assert "TooSlowError: IMAP IDLE cycle timed out after 3 s" in str(status.imap_error)
            fake.go_silent_in_idle = False
            fake.add(1, raw_message(1))
            assert await receive(channel) == "fake 1"
        nursery.cancel_scope.cancel()
    assert fake.connections >= 2


async def test_server_without_idle_is_polled(tmp_path: Path) -> None:
    fake = FakeIMAP(idle=False)
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", poll_interval_secs=1)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                await channel.status.wait_value(lambda s: s.imap == "polling")
            fake.add(5, raw_message(5))
            assert await receive(channel) == "fake 5"
        nursery.cancel_scope.cancel()
    assert not any(c.upper().endswith("IDLE") for c in fake.commands)
    # Each quiet poll interval re-SELECTs (which also refreshes the folder's state).
    assert sum(1 for c in fake.commands if " SELECT " in c.upper()) >= 2


async def test_first_start_new_skips_existing_mail(tmp_path: Path) -> None:
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", first_start='"new"')
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                await channel.status.wait_value(lambda s: s.imap == "idle")
            fake.add(3, raw_message(3))
            assert await receive(channel) == "fake 3"
        nursery.cancel_scope.cancel()


async def test_rejected_mail_is_not_delivered_nor_flagged(tmp_path: Path) -> None:
    fake = FakeIMAP(messages={1: raw_message(1, "mallory@example.com"), 2: raw_message(2)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await receive(channel) == "fake 2"
            await fake_until(fake, lambda: 2 in fake.seen)
        nursery.cancel_scope.cancel()
    assert 1 not in fake.seen  # left unseen for a person to look at


async def test_a_message_that_breaks_the_parser_is_failed_not_retried_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prxmail.channel import _fetch as channel_module

    real = channel_module.parse_message
    calls: list[int] = []

    def flaky(raw: bytes, *, uid: int, **kwargs: int) -> object:
        calls.append(uid)
        if uid == 1:
            raise RuntimeError("parser bug")
        return real(raw, uid=uid, **kwargs)

    monkeypatch.setattr(channel_module, "parse_message", flaky)
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", keepalive_secs=1)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await receive(channel) == "fake 2"
            await fake_until(fake, lambda: len(fake.idle_starts) >= 2)
            assert channel.status.value.reconnects == 0
        nursery.cancel_scope.cancel()
    assert calls.count(1) == 1


async def test_a_message_the_server_lists_but_does_not_return_is_not_skipped(
    tmp_path: Path,
) -> None:
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2)}, no_body={1})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            # UID 2 must not be claimed past UID 1: the watcher reconnects (backing off).
            with trio.fail_after(10):
                await channel.status.wait_value(lambda s: s.reconnects >= 2)
            assert "UID 1" in str(channel.status.value.imap_error)
            fake.no_body.clear()  # the server recovers: the message comes through
            assert await receive(channel) == "fake 1"
            assert await receive(channel) == "fake 2"
        nursery.cancel_scope.cancel()
    assert fake.connections < 8  # backed off, did not hammer


async def test_reply_rate_limit_defers_beyond_the_limit_and_hands_on_when_a_token_is_back(
    tmp_path: Path,
) -> None:
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2), 3: raw_message(3)})
    async with trio.open_nursery() as nursery:
        # A bucket of 2, refilled at one token per 2 s.
        config = fake_config(
            9,
            tmp_path / "state",
            reply_rate_limit=1,
            reply_rate_window_secs=2,
            reply_rate_burst=2,
        )
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await receive(channel) == "fake 1"
            assert await receive(channel) == "fake 2"
            started = trio.current_time()
            with trio.fail_after(10):
                third = await channel.receive()
            # Not refused: deferred, then handed on by the watcher's own wake-up.
            assert third.subject == "fake 3"
            assert trio.current_time() - started >= 0.5
            assert channel.statistics().rejected == 0
            assert channel.statistics().deferred >= 1
            assert 3 not in fake.seen
            await channel.mark_handled(third)
            await wait_until(lambda: 3 in fake.seen)
        nursery.cancel_scope.cancel()


async def test_required_authentication_results(tmp_path: Path) -> None:
    verified = (
        b"Authentication-Results: mx.example.com; dmarc=pass header.from=example.com\r\n"
        + raw_message(2)
    )
    forged = (
        b"Authentication-Results: evil.example.net; dmarc=pass header.from=example.com\r\n"
        + raw_message(1)
    )
    fake = FakeIMAP(messages={1: forged, 2: verified})
    async with trio.open_nursery() as nursery:
        config = fake_config(
            9,
            tmp_path / "state",
            require_authentication="true",
            authserv_id='"mx.example.com"',
        )
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await receive(channel) == "fake 2"
            assert channel.statistics().rejected == 1
        nursery.cancel_scope.cancel()


async def test_mark_seen_false_never_changes_flags(tmp_path: Path) -> None:
    fake = FakeIMAP(messages={1: raw_message(1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", mark_seen="false", keepalive_secs=1)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await receive(channel) == "fake 1"
            await fake_until(fake, lambda: len(fake.idle_starts) >= 2)
        nursery.cancel_scope.cancel()
    assert not any("STORE" in c.upper() for c in fake.commands)
    assert fake.seen == set()


async def test_a_backlog_larger_than_the_seen_buffer_is_flagged_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prxmail.channel import _core as channel_module

    monkeypatch.setattr(channel_module, "SEEN_BUFFER", 8)
    count = 40
    fake = FakeIMAP(messages={uid: raw_message(uid) for uid in range(1, count + 1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(
            9, tmp_path / "state", fetch_batch_size=5, reply_rate_limit=1000, reply_rate_burst=1000
        )
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            for uid in range(1, count + 1):
                assert await receive(channel) == f"fake {uid}"
            await fake_until(fake, lambda: len(fake.seen) == count)
        nursery.cancel_scope.cancel()


async def test_a_pushed_message_larger_than_the_first_fetch_comes_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prxmail.channel import _fetch as channel_module

    monkeypatch.setattr(channel_module, "FIRST_FETCH_BYTES", 200)
    small, large = raw_message(1), raw_message(2).replace(b"body 2", b"x" * 500)
    assert len(small) < 200 < len(large)
    fake = FakeIMAP()
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            for uid, raw in ((1, small), (2, large)):
                with trio.fail_after(10):
                    await channel.status.wait_value(lambda s: s.imap == "idle")
                fake.add(uid, raw)
                with trio.fail_after(10):
                    message = await channel.receive()
                await channel.mark_handled(message)
                assert message.uid == uid
        nursery.cancel_scope.cancel()
    assert message.text == "x" * 500

    def fetches(uid: int) -> list[str]:
        return [
            c.split(" ", 1)[1].upper()
            for c in fake.commands
            if c.upper().split(" ", 1)[1].startswith(f"UID FETCH {uid} ")
        ]

    # Within the first fetch: one round trip. Beyond it: the whole message next.
    assert fetches(1) == ["UID FETCH 1 (RFC822.SIZE BODY.PEEK[]<0.200>)"]
    assert fetches(2) == [
        "UID FETCH 2 (RFC822.SIZE BODY.PEEK[]<0.200>)",
        "UID FETCH 2 (BODY.PEEK[])",
    ]


async def test_a_catch_up_parsed_in_threads_keeps_uid_order_and_fails_only_the_poison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prxmail.channel import _fetch as channel_module

    # Every message its own group, every group parsed in a worker thread while the next
    # is fetched.
    monkeypatch.setattr(channel_module, "INLINE_PARSE_BYTES", 0)
    monkeypatch.setattr(channel_module, "GROUP_BYTES", 1)
    real = channel_module.parse_message

    def poisoned(raw: bytes, *, uid: int, **kwargs: int) -> object:
        if uid == 7:
            raise RuntimeError("parser bug")
        return real(raw, uid=uid, **kwargs)

    monkeypatch.setattr(channel_module, "parse_message", poisoned)
    count = 15
    fake = FakeIMAP(messages={uid: raw_message(uid) for uid in range(1, count + 1)})
    async with trio.open_nursery() as nursery:
        state = tmp_path / "state"
        config = fake_config(
            9, state, fetch_batch_size=4, reply_rate_limit=1000, reply_rate_burst=1000
        )
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            got = [await receive(channel) for _ in range(count - 1)]
            await fake_until(fake, lambda: len(fake.seen) == count - 1)
        nursery.cancel_scope.cancel()
    assert got == [f"fake {uid}" for uid in range(1, count + 1) if uid != 7]
    assert 7 not in fake.seen
    with StateStore(state) as store:
        account = account_key(config.username, config.imap_host, config.imap_port)
        failed = store.get_message(MessageKey(account, "INBOX", UIDVALIDITY, 7))
        mailbox = store.mailbox(account, "INBOX")
    assert failed is not None
    assert failed.status is MessageStatus.FAILED
    assert failed.reason == "cannot parse: RuntimeError: parser bug"
    assert mailbox is not None
    assert mailbox.last_uid == count


def _nested_multipart(uid: int, levels: int) -> bytes:
    """A small hostile message: a few KiB of nested multiparts, slow to parse."""
    head = raw_message(uid).split(b"\r\n\r\n", 1)[0]
    return (
        head
        + b"\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
        + b"".join(
            b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
            for i in range(levels)
        )
    )


async def test_small_hostile_mail_is_parsed_in_a_thread_under_the_parse_limiter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from prxmail.channel import PARSE_THREADS
    from prxmail.channel import _fetch as channel_module

    real = channel_module.parse_message
    # uid -> (parsed on the event loop's thread, parse-limiter tokens then in use)
    where: dict[int, tuple[bool, int]] = {}

    def recording(raw: bytes, *, uid: int, **kwargs: int) -> object:
        on_loop = threading.current_thread() is threading.main_thread()
        borrowed = -1
        if not on_loop:
            borrowed = trio.from_thread.run_sync(
                lambda: channel_module.parse_limiter().statistics().borrowed_tokens
            )
        where[uid] = (on_loop, borrowed)
        return real(raw, uid=uid, **kwargs)

    monkeypatch.setattr(channel_module, "parse_message", recording)
    hostile = _nested_multipart(2, levels=60)  # about 3.5 KiB
    assert len(hostile) < 4096
    fake = FakeIMAP(messages={1: raw_message(1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await receive(channel) == "fake 1"
            with trio.fail_after(10):
                await channel.status.wait_value(lambda s: s.imap == "idle")
            fake.add(2, hostile)
            assert await receive(channel) == "fake 2"
        nursery.cancel_scope.cancel()
    assert where[1] == (True, -1)  # plain and small: on the loop, no thread hop
    on_loop, borrowed = where[2]
    assert not on_loop
    assert 1 <= borrowed <= PARSE_THREADS


@pytest.fixture
def records() -> Iterator[LogRecords]:
    with captured_logs(logging.DEBUG) as handler:
        yield handler


async def test_a_message_whose_fetch_always_breaks_is_failed_and_the_folder_moves_on(
    tmp_path: Path, records: LogRecords
) -> None:
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2)}, garbage_for={1})
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:
        config = fake_config(9, state)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(20):
                message = await channel.receive()
            assert message.subject == "fake 2"
            await channel.mark_handled(message)
        nursery.cancel_scope.cancel()
    # One failure of the pair (then fetched one by one), POISON_ATTEMPTS of UID 1 alone,
    # then the session that moves on.
    assert fake.connections == 1 + POISON_ATTEMPTS + 1
    with StateStore(state) as store:
        key = MessageKey(account_key("bot@example.com", "127.0.0.1", 9), "INBOX", UIDVALIDITY, 1)
        failed = store.get_message(key)
    assert failed is not None
    assert failed.status is MessageStatus.FAILED
    assert f"fetch failed {POISON_ATTEMPTS} times: RemoteProtocolError" in str(failed.reason)
    [warning] = records.fields("its fetch failed the same way every time")
    assert warning["uid"] == 1
    assert warning["attempts"] == POISON_ATTEMPTS


async def test_a_body_longer_than_its_rfc822_size_is_cut_and_marked_truncated(
    tmp_path: Path, records: LogRecords
) -> None:
    raw = raw_message(1) + b"x" * 500 + b"\r\n"
    fake = FakeIMAP(messages={1: raw}, size_lie={1: 120})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                message = await channel.receive()
        nursery.cancel_scope.cancel()
    assert OVERSIZE_DEFECT in message.defects  # the handler's "truncated": true
    assert "x" * 100 not in message.text
    [warning] = records.fields("longer than its RFC822.SIZE")
    assert warning == {"account": "default", "uid": 1, "size": 120, "received": len(raw)}


async def test_the_channel_caps_literals_at_max_message_bytes(tmp_path: Path) -> None:
    seen: list[int] = []

    fake = FakeIMAP(messages={1: raw_message(1)})
    with pytest.MonkeyPatch.context() as patch:
        async with trio.open_nursery() as nursery:
            connect = fake.connector(nursery)

            def spy(*args: Any, **kwargs: Any) -> Any:
                # The channel's own opener (no connect_imap= given), answered by the fake.
                seen.append(kwargs.get("max_literal_size", -1))
                return connect()

            patch.setattr(channel_watcher, "open_imap_connection", spy)
            config = fake_config(9, tmp_path / "state", max_message_bytes=200_000)
            async with open_mail_channel(config) as channel:
                assert await receive(channel) == "fake 1"
            nursery.cancel_scope.cancel()
    assert seen
    assert set(seen) == {200_000}


async def test_skipped_uids_are_logged(tmp_path: Path, records: LogRecords) -> None:
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2), 3: raw_message(3)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            for _ in range(3):
                await receive(channel)
            fake.extra_search = [1, 2]  # old mail listed again
            fake.vanish = {9}  # listed, never returned
            fake.add(4, raw_message(4))
            assert await receive(channel) == "fake 4"
            await wait_until(lambda: bool(records.fields("treated as expunged")))
        nursery.cancel_scope.cancel()
    below = records.fields("at or below the high-water mark")
    assert below
    assert below[0]["uids"] == "1,2"
    expunged = records.fields("treated as expunged")
    assert expunged[0]["uids"] == "9"


async def test_a_session_that_made_progress_resets_the_backoff(
    tmp_path: Path, records: LogRecords
) -> None:
    fake = FakeIMAP(drop_in_idle=True)
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(15):
                await channel.status.wait_value(lambda s: s.reconnects >= 5)
        nursery.cancel_scope.cancel()
    delays = [float(str(f["retry_in"])) for f in records.fields("reconnecting")]
    assert len(delays) >= 5
    # Every session logged in and selected: healthy, so no delay grows past the first.
    assert max(delays) <= RECONNECT_INITIAL_SECONDS, delays


def test_status_texts_and_stored_reasons_are_redacted() -> None:
    from prxmail._log import redacting
    from prxmail.channel._core import _describe

    with redacting(["S3cr3tPassw0rd"]):
        text = _describe(RuntimeError("server said: you sent bot S3cr3tPassw0rd"))
    assert text == "RuntimeError: server said: you sent bot ***"


async def test_a_250_mb_answer_to_a_1_mib_partial_fetch_is_refused_and_failed(
    tmp_path: Path,
) -> None:
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2)}, huge_literal_for={1})
    state = tmp_path / "state"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with trio.open_nursery() as nursery:
        # Over loopback TCP, not a memory stream: the point is what a real socket
        # delivers while the client refuses the announced literal.
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1")
        )
        config = fake_config(listeners[0].socket.getsockname()[1], state)
        async with open_mail_channel(config) as channel:
            assert await receive(channel) == "fake 2"
        nursery.cancel_scope.cancel()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(f"channel: 250 MB partial-fetch answer, peak RSS grew {grown_kib / 1024:.1f} MiB")
    assert grown_kib < 64 * 1024  # refused when announced: nothing near 250 MB held
    with StateStore(state) as store:
        [failed] = store.messages_with_status(MessageStatus.FAILED)
    assert failed.key.uid == 1
    assert "literal" in str(failed.reason)


async def test_a_connector_of_your_own_keeps_the_literal_limit_at_max_message_bytes(
    tmp_path: Path,
) -> None:
    # The same hostile answer over a connect_imap= connection: open_imap_stream's own
    # limit (256 MiB) admits the 250 MB announcement, so only the channel's cap refuses
    # it. Without that cap the client allocated 250 MB and waited for the rest (which
    # never comes) until command_timeout_secs, far beyond receive()'s 10 s.
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2)}, huge_literal_for={1})
    state = tmp_path / "state"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with trio.open_nursery() as nursery:
        config = fake_config(9, state)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            assert await receive(channel) == "fake 2"
        nursery.cancel_scope.cancel()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024  # refused when announced: no 250 MB bytearray
    assert fake.connections >= 2  # the refusal broke the session; the channel came back
    with StateStore(state) as store:
        [failed] = store.messages_with_status(MessageStatus.FAILED)
    assert failed.key.uid == 1
    assert "announced a literal of 250000000 bytes" in str(failed.reason)


async def test_a_connector_s_own_lower_literal_limit_is_kept(tmp_path: Path) -> None:
    # The channel only lowers a connection's literal limit: an opener that chose less
    # than max_message_bytes keeps its choice, so this 4 KB message is refused.
    big = raw_message(1) + b"x" * 4000 + b"\r\n"
    fake = FakeIMAP(messages={1: big, 2: raw_message(2)})
    state = tmp_path / "state"
    async with trio.open_nursery() as nursery:

        def connect() -> AbstractAsyncContextManager[IMAPConnection]:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(fake.handle, server)
            return open_imap_stream(client, security=Security.PLAIN, max_literal_size=2048)

        config = fake_config(9, state)
        async with open_mail_channel(config, connect_imap=connect) as channel:
            assert await receive(channel) == "fake 2"
        nursery.cancel_scope.cancel()
    with StateStore(state) as store:
        [failed] = store.messages_with_status(MessageStatus.FAILED)
    assert failed.key.uid == 1
    assert "limit of 2048" in str(failed.reason)


def answer_to(uid: int, parent_id: str, references: list[str]) -> bytes:
    return (
        f"From: alice@example.com\r\nTo: bot@example.com\r\nSubject: Re: fake 1\r\n"
        f"Message-ID: <fake-{uid}@example.com>\r\nIn-Reply-To: {parent_id}\r\n"
        f"References: {' '.join(references)}\r\n\r\nanswer {uid}\r\n"
    ).encode()


async def test_an_instant_answerer_is_held_per_thread_and_released_by_the_operator(
    tmp_path: Path,
) -> None:
    fake = FakeIMAP(messages={1: raw_message(1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", loop_slow_down_secs=1)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                message = await channel.receive()
            thread_id = message.thread_id
            assert len(thread_id) == 16
            refs = [message.message_id]
            uid = 1
            replies = 0
            while True:
                reply_id = await channel.reply(message, f"answer {replies}")
                replies += 1
                refs.append(reply_id)
                uid += 1
                fake.add(uid, answer_to(uid, reply_id, refs))
                with trio.move_on_after(5):
                    message = await channel.receive()
                    assert message.thread_id == thread_id
                    refs.append(message.message_id)
                    history = await channel.thread(message)
                    assert [h["direction"] for h in history][-2:] == ["in", "out"]
                    assert history[-1]["text"] == f"answer {replies - 1}"
                    continue
                break
            # Held after 8 instant answers (FAST_STREAK_TO_HOLD), far below 50.
            assert replies == 8
            parked = await channel._store.parked_messages(channel.account)
            assert [(p.status.value, p.thread_id) for p in parked] == [("held", thread_id)]
            assert "loop suspected" in (parked[0].reason or "")
            assert channel.statistics().held == 1
            assert uid not in fake.seen
            # Another thread of the same sender is not affected.
            fake.add(uid + 1, raw_message(uid + 1))
            with trio.fail_after(10):
                other = await channel.receive()
            assert other.thread_id != thread_id
            await channel.mark_handled(other)
            # The operator releases the thread: the held message is handed on.
            assert await channel.release_thread(thread_id) == 1
            with trio.fail_after(10):
                released = await channel.receive()
            assert released.uid == uid
            assert released.thread_id == thread_id
        nursery.cancel_scope.cancel()


async def test_incoming_text_is_kept_in_the_thread_only_when_opted_in_and_rich_mail_is_queued(
    tmp_path: Path,
) -> None:
    first = raw_message(1)
    fake = FakeIMAP(messages={1: first})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", thread_keep_incoming_text="true")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                message = await channel.receive()
            png = OutgoingAttachment("c.png", "image/png", b"\x89PNG\r\n\x00")
            reply_id = await channel.reply(
                message, "plain answer", html="<p>answer</p>", attachments=[png]
            )
            fake.add(2, answer_to(2, reply_id, [message.message_id, reply_id]))
            with trio.fail_after(10):
                second = await channel.receive()
            history = await channel.thread(second)
            assert [(h["direction"], h["text"]) for h in history] == [
                ("in", "body 1"),
                ("out", "plain answer"),
            ]
            assert history[0]["message_id"] == message.message_id
            assert history[1]["message_id"] == reply_id
            await channel.mark_handled(second)
            sent_id = await channel.send(
                "alice@example.com", "news", "text", html="<p>news</p>", attachments=[png]
            )
            items = {i.message_id: i for i in await channel._store.outbox_items()}
            for mid in (reply_id, sent_id):
                raw = items[mid].raw
                assert b"multipart/mixed" in raw
                assert b"multipart/alternative" in raw
                assert b'filename="c.png"' in raw or b"filename=c.png" in raw
            # What we send starts a thread of its own, known to the store.
            assert await channel._store.thread_of(channel.account, sent_id)
        nursery.cancel_scope.cancel()


class _CountingConnection(sqlite3.Connection):
    """Counts the write transactions the state store begins."""

    writes: list[int]

    def execute(self, sql: str, parameters: object = (), /) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE":
            self.writes.append(1)
        return super().execute(sql, parameters)  # type: ignore[arg-type]


async def test_a_catch_up_commits_one_store_transaction_per_handed_over_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    real_connect = sqlite3.connect

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real_connect(*args, factory=_CountingConnection, **kwargs)  # type: ignore[call-overload]
        conn.writes = writes
        return conn  # type: ignore[no-any-return]

    monkeypatch.setattr(sqlite3, "connect", connect)
    count = 30
    fake = FakeIMAP(messages={uid: raw_message(uid) for uid in range(1, count + 1)})
    async with trio.open_nursery() as nursery:
        state = tmp_path / "state"
        config = fake_config(9, state, reply_rate_limit=1000, reply_rate_burst=1000)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                first = await channel.receive()
            before = len(writes)
            got = [first.subject]
            await channel.mark_handled(first)
            for _ in range(count - 1):
                with trio.fail_after(10):
                    message = await channel.receive()
                got.append(message.subject)
                await channel.mark_handled(message)
            during = len(writes) - before
            await wait_until(lambda: len(fake.seen) == count)
        nursery.cancel_scope.cancel()
    assert got == [f"fake {uid}" for uid in range(1, count + 1)]
    # One group: each finish commits with the next message's begin (two transactions
    # each were the cost before); a few more for the end of the catch-up's search.
    assert during <= count + 3, during
    with StateStore(state) as store:
        account = account_key(config.username, config.imap_host, config.imap_port)
        keys = [MessageKey(account, "INBOX", UIDVALIDITY, uid) for uid in range(1, count + 1)]
        records = [store.get_message(k) for k in keys]
    assert [(r.status, r.attempts) for r in records if r is not None] == [
        (MessageStatus.HANDLED, 1)
    ] * count


async def test_a_receive_cancelled_while_beginning_hands_the_message_out_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 3
    fake = FakeIMAP(messages={uid: raw_message(uid) for uid in range(1, count + 1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state", reply_rate_limit=1000, reply_rate_burst=1000)
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            with trio.fail_after(10):
                first = await channel.receive()
            # The next message reached the channel un-begun; a receive() cancelled
            # before its begin_handling started must neither lose nor skip it.
            store = channel._store
            blocked = trio.Event()

            async def never_starts(key: MessageKey) -> object:
                blocked.set()
                await trio.sleep_forever()
                raise AssertionError("not reached")

            await wait_until(lambda: channel._message_send.statistics().tasks_waiting_send == 1)
            with monkeypatch.context() as patch:
                patch.setattr(store, "begin_handling", never_starts)
                with trio.move_on_after(0.2) as scope:
                    await channel.receive()
            assert blocked.is_set()
            assert scope.cancelled_caught
            # Still un-begun: finishing the first begins it, receive() hands it out.
            await channel.mark_handled(first)
            assert await receive(channel) == "fake 2"
            assert await receive(channel) == "fake 3"
        nursery.cancel_scope.cancel()


async def test_several_consumer_tasks_get_every_message_of_a_catch_up_once(
    tmp_path: Path,
) -> None:
    count = 40
    fake = FakeIMAP(messages={uid: raw_message(uid) for uid in range(1, count + 1)})
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        state = tmp_path / "state"
        config = fake_config(
            9, state, fetch_batch_size=10, reply_rate_limit=1000, reply_rate_burst=1000
        )
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:

            async def consume(pause: float) -> None:
                while len(got) < count:
                    with trio.move_on_after(2):
                        message = await channel.receive()
                        got.append(message.subject)
                        await trio.sleep(pause)  # the tasks finish in varying order
                        await channel.mark_handled(message)

            with trio.fail_after(30):
                async with trio.open_nursery() as consumers:
                    for n in range(3):
                        consumers.start_soon(consume, n * 0.001)
        nursery.cancel_scope.cancel()
    assert sorted(got) == sorted(f"fake {uid}" for uid in range(1, count + 1))
    with StateStore(state) as store:
        account = account_key(config.username, config.imap_host, config.imap_port)
        keys = [MessageKey(account, "INBOX", UIDVALIDITY, uid) for uid in range(1, count + 1)]
        records = [store.get_message(k) for k in keys]
    assert [(r.status, r.attempts) for r in records if r is not None] == [
        (MessageStatus.HANDLED, 1)
    ] * count


async def test_a_catch_up_hands_on_the_next_fetched_group_without_waiting_for_the_server(
    tmp_path: Path,
) -> None:
    # Groups of three. The pipeline's fetching task works a group ahead of the one being
    # handed on, so when the consumer finishes the first group the second is already
    # fetched: it is handed on even while the server answers nothing more (before, the
    # next group waited for the \\Seen flags, the next size probe and body fetch).
    count = 9
    fake = FakeIMAP(messages={uid: raw_message(uid) for uid in range(1, count + 1)})

    def body_fetches() -> int:
        return sum("UID FETCH" in c.upper() and "BODY.PEEK[]" in c.upper() for c in fake.commands)

    async with trio.open_nursery() as nursery:
        config = fake_config(
            9, tmp_path / "state", fetch_batch_size=3, reply_rate_limit=1000, reply_rate_burst=1000
        )
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            got = [await receive(channel)]
            with trio.fail_after(10):
                second = await channel.receive()
            await fake_until(fake, lambda: body_fetches() >= 2)  # the second group is in
            fake.stalled = True
            await channel.mark_handled(second)
            got += [second.subject] + [await receive(channel) for _ in range(4)]
            fake.stalled = False
            fake._record_changed()
            got += [await receive(channel) for _ in range(count - 6)]
            await fake_until(fake, lambda: len(fake.seen) == count)
        nursery.cancel_scope.cancel()
    assert got == [f"fake {uid}" for uid in range(1, count + 1)]
