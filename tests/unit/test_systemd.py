"""systemd notifications: a test NOTIFY_SOCKET the test binds receives them."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from prxmail._systemd import (
    Notifier,
    notify_address,
    status_summary,
    supervise,
    watchdog_interval,
)
from prxmail.channel import open_mail_channel
from tests.unit.test_channel_fake_imap import FakeIMAP, fake_config, raw_message
from tests.unit.test_health import never_connecting, refusing_imap

pytestmark = pytest.mark.timeout(60)


class Listener:
    """The systemd side: a datagram socket that collects notifications."""

    def __init__(self, address: str) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.address = address

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    async def bind(self) -> None:
        await self.sock.bind(notify_address(self.address))

    async def next(self) -> str:
        with trio.fail_after(10):
            data = await self.sock.recv(4096)
        return data.decode()

    async def until(self, wanted: str) -> list[str]:
        """Every notification up to the first one holding ``wanted``."""
        seen = [await self.next()]
        while wanted not in seen[-1]:
            seen.append(await self.next())
        return seen


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[Listener]:
    with Listener(str(tmp_path / "notify")) as bound:
        yield bound


async def test_ready_after_the_first_catch_up_status_and_stopping(
    tmp_path: Path, listener: Listener
) -> None:
    await listener.bind()
    fake = FakeIMAP(messages={1: raw_message(1)})
    async with trio.open_nursery() as nursery:
        config = fake_config(9, tmp_path / "state")
        async with open_mail_channel(config, connect_imap=fake.connector(nursery)) as channel:
            channels = {"default": channel}
            async with trio.open_nursery() as inner:
                await inner.start(
                    lambda task_status: supervise(
                        Notifier(notify_address(listener.address)),
                        channels,
                        watchdog=None,
                        task_status=task_status,
                    )
                )
                first = await listener.next()
                # Message 1 waits to be handed out: the catch-up has not finished.
                assert "READY=1" not in first
                assert first.startswith("STATUS=default: connecting")
                message = await channel.receive()
                await channel.mark_handled(message)
                before = await listener.until("READY=1")
                assert all("READY=1" not in n for n in before[:-1])
                assert channel.status.value.imap in ("idle", "polling", "fetching")
                assert "1 handled" in before[-1]
                inner.cancel_scope.cancel()
            assert (await listener.until("STOPPING=1"))[-1] == "STOPPING=1"
        nursery.cancel_scope.cancel()


async def test_an_account_refused_login_does_not_hold_ready_back(tmp_path: Path) -> None:
    name = f"@prxmail-test-{os.getpid()}"  # the abstract namespace
    with Listener(name) as listener:
        await listener.bind()
        await _ready_despite_auth_failed(tmp_path, listener, name)


async def _ready_despite_auth_failed(tmp_path: Path, listener: Listener, name: str) -> None:
    async with trio.open_nursery() as nursery:
        bad = open_mail_channel(fake_config(9, tmp_path / "b"), connect_imap=refusing_imap(nursery))
        async with bad as sales:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": name})
            assert notifier is not None
            nursery.start_soon(lambda: supervise(notifier, {"sales": sales}, watchdog=None))
            ready = (await listener.until("READY=1"))[-1]
            assert "sales: auth-failed" in ready
        nursery.cancel_scope.cancel()


async def test_watchdog_pings_while_never_ready(tmp_path: Path, listener: Listener) -> None:
    await listener.bind()
    async with (
        open_mail_channel(
            fake_config(9, tmp_path / "s"), connect_imap=never_connecting()
        ) as channel,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(
            lambda: supervise(
                Notifier(notify_address(listener.address)), {"a": channel}, watchdog=0.05
            )
        )
        seen = [await listener.next() for _ in range(6)]
        nursery.cancel_scope.cancel()
    assert seen.count("WATCHDOG=1") >= 3
    assert not any("READY=1" in n for n in seen)


async def test_a_missing_socket_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    await notifier.send("READY=1")
    await notifier.send("READY=1")
    notifier.close()
    failures = [r for r in caplog.records if "could not be sent" in r.getMessage()]
    assert len(failures) == 1


def test_environment_parsing() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract") == "\0abstract"
    with pytest.raises(ValueError, match="absolute path"):
        notify_address("relative")
    assert Notifier.from_environ({}) is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "relative"}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    mine = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": mine}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None


def test_status_summary_is_one_line() -> None:
    assert status_summary({}) == " | 0 handled, 0 replies sent, 0 failed"
