"""The health and metrics endpoint: a real HTTP client against the running server.

The channels behind it watch the scripted IMAP server of test_channel_fake_imap (over
memory streams); the endpoint itself listens on a real loopback socket and is asked
by httpx, as a supervisor or Prometheus would.
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import types
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trio_util  # type: ignore[import-untyped]
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from prxmail import _health
from prxmail._health import MAX_CONNECTIONS, MAX_REQUEST_BYTES, health_report, serve_health
from prxmail._metrics import ServiceMetrics
from prxmail._tls import Security
from prxmail.channel import ChannelStatus, MailChannel, open_mail_channel
from prxmail.channel._watcher import IMAPConnector
from prxmail.cli._serve import EXIT_CONFIG, run_serve
from prxmail.config import Config
from prxmail.imap import IMAPConnection, open_imap_stream
from tests.unit.test_channel_fake_imap import FakeIMAP, fake_config, raw_message

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def endpoint(channels: dict[str, MailChannel], metrics: ServiceMetrics) -> AsyncIterator[str]:
    """The endpoint on a free loopback port; yields its base URL."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_health, "127.0.0.1", 0, channels, metrics)
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and labels (parsed by prometheus-client)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def refusing_imap(nursery: trio.Nursery) -> IMAPConnector:
    """An IMAP server that refuses every login (a wrong password)."""

    async def serve(stream: trio.abc.Stream) -> None:
        try:
            await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
            buf = b""
            while True:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                buf += chunk
                while b"\r\n" in buf:
                    line, _, buf = buf.partition(b"\r\n")
                    tag = line.split(b" ", 1)[0]
                    if b"LOGIN" in line.upper():
                        await stream.send_all(tag + b" NO [AUTHENTICATIONFAILED] no\r\n")
                    else:
                        await stream.send_all(tag + b" OK done\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def connect() -> AbstractAsyncContextManager[IMAPConnection]:
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(serve, server)
        return open_imap_stream(client, security=Security.PLAIN)

    return connect


def config(tmp_path: Path, name: str = "state") -> Config:
    return fake_config(9, tmp_path / name)


async def test_healthz_is_503_while_connecting_and_200_once_idle(tmp_path: Path) -> None:
    fake = FakeIMAP()
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        real = fake.connector(nursery)

        @asynccontextmanager
        async def gated() -> AsyncIterator[IMAPConnection]:
            await gate.wait()  # the IMAP session has not started yet: "connecting"
            async with real() as conn:
                yield conn

        async with open_mail_channel(config(tmp_path), connect_imap=gated) as channel:
            metrics = ServiceMetrics()
            metrics.add_account("default", channel)
            channels = {"default": channel}
            async with endpoint(channels, metrics) as url, httpx.AsyncClient() as client:
                down = await client.get(f"{url}/healthz")
                assert down.status_code == 503
                assert down.headers["content-type"] == "application/json"
                body = down.json()
                assert body["status"] == "unhealthy"
                assert body["accounts"]["default"]["imap"] == "connecting"
                assert body["accounts"]["default"]["reasons"] == ["IMAP connecting"]
                gate.set()
                await channel.status.wait_value(lambda s: s.imap == "idle")
                up = await client.get(f"{url}/healthz")
                assert up.status_code == 200
                assert up.json() == {
                    "status": "ok",
                    "accounts": {
                        "default": {
                            "healthy": True,
                            "imap": "idle",
                            "imap_error": None,
                            "smtp_error": None,
                        }
                    },
                }
        nursery.cancel_scope.cancel()


async def test_refused_login_is_auth_failed_at_once_and_names_the_account(
    tmp_path: Path,
) -> None:
    fake = FakeIMAP()
    async with trio.open_nursery() as nursery:
        good = open_mail_channel(config(tmp_path, "a"), connect_imap=fake.connector(nursery))
        bad = open_mail_channel(config(tmp_path, "b"), connect_imap=refusing_imap(nursery))
        async with good as support, bad as sales:
            with trio.fail_after(10):
                await support.status.wait_value(lambda s: s.imap == "idle")
                # The first refusal, not a later retry (those come every 10 minutes).
                await sales.status.wait_value(lambda s: s.imap == "auth-failed")
            metrics = ServiceMetrics()
            channels = {"support": support, "sales": sales}
            async with endpoint(channels, metrics) as url, httpx.AsyncClient() as client:
                answer = await client.get(f"{url}/healthz")
            assert answer.status_code == 503
            body = answer.json()
            assert body["accounts"]["support"]["healthy"] is True
            assert "reasons" not in body["accounts"]["support"]
            sales_entry = body["accounts"]["sales"]
            assert sales_entry["imap"] == "auth-failed"
            assert sales_entry["reasons"][0].startswith("IMAP auth-failed: ")
        nursery.cancel_scope.cancel()


async def test_metrics_count_what_happened(tmp_path: Path) -> None:
    fake = FakeIMAP(messages={1: raw_message(1), 2: raw_message(2, "mallory@example.com")})
    async with trio.open_nursery() as nursery:
        async with open_mail_channel(
            config(tmp_path), connect_imap=fake.connector(nursery)
        ) as channel:
            metrics = ServiceMetrics()
            metrics.add_account("default", channel)
            with trio.fail_after(10):
                first = await channel.receive()  # 1 is handed out, 2 is rejected
                await channel.mark_handled(first)
                await channel.status.wait_value(lambda s: s.imap == "idle")
                fake.add(3, raw_message(3))  # pushed: EXISTS during IDLE
                third = await channel.receive()
            await channel.mark_failed(third, "handler broke")
            metrics.observe_handler("default", 0.2)
            async with (
                endpoint({"default": channel}, metrics) as url,
                httpx.AsyncClient() as client,
            ):
                answer = await client.get(f"{url}/metrics")
        nursery.cancel_scope.cancel()
    assert answer.status_code == 200
    assert answer.headers["content-type"] == CONTENT_TYPE_LATEST
    found = samples(answer.text)
    account = ("account", "default")

    def outcome(name: str) -> float:
        return found[("prxmail_messages_total", (account, ("outcome", name)))]

    assert outcome("handled") == 1
    assert outcome("failed") == 1
    assert outcome("rejected") == 1
    assert outcome("replied") == 0
    assert found[("prxmail_replies_sent_total", (account,))] == 0
    assert found[("prxmail_reconnects_total", (account,))] == 0
    assert found[("prxmail_imap_connected", (account,))] == 1
    assert found[("prxmail_outbox_pending", (account,))] == 0
    assert found[("prxmail_handler_seconds_count", (account,))] == 1
    assert found[("prxmail_handler_seconds_sum", (account,))] == pytest.approx(0.2)
    # Message 3 came by push; 1 was there at the start (no push, no latency).
    assert found[("prxmail_push_latency_seconds_count", (account,))] == 1
    assert found[("prxmail_push_latency_seconds_sum", (account,))] >= 0


async def test_two_services_keep_their_metrics_apart() -> None:
    # A per-service registry: a second one neither fails to register nor shares counts.
    first, second = ServiceMetrics(), ServiceMetrics()
    first.observe_handler("default", 1.0)
    assert first.registry is not second.registry
    assert b'prxmail_handler_seconds_count{account="default"} 1.0' in (await first.exposition())
    assert b"prxmail_handler_seconds_count" not in await second.exposition()


async def test_outbox_pending_counts_queued_replies(tmp_path: Path) -> None:
    fake = FakeIMAP(messages={1: raw_message(1)})
    async with trio.open_nursery() as nursery:
        # SMTP on port 9 of loopback (discard, nothing listening): the reply stays queued.
        async with open_mail_channel(
            config(tmp_path), connect_imap=fake.connector(nursery)
        ) as channel:
            metrics = ServiceMetrics()
            metrics.add_account("default", channel)
            with trio.fail_after(10):
                message = await channel.receive()
            await channel.reply(message, "hello")
            found = samples((await metrics.exposition()).decode())
        nursery.cancel_scope.cancel()
    account = ("account", "default")
    assert found[("prxmail_outbox_pending", (account,))] == 1
    assert found[("prxmail_messages_total", (account, ("outcome", "replied")))] == 1


async def test_other_paths_methods_and_bad_requests(tmp_path: Path) -> None:
    async with open_mail_channel(config(tmp_path), connect_imap=never_connecting()) as ch:
        metrics = ServiceMetrics()
        async with endpoint({"default": ch}, metrics) as url, httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/")).status_code == 404
            assert (await client.get(f"{url}/healthz/x")).status_code == 404
            refused = await client.post(f"{url}/healthz", content=b"x")
            assert refused.status_code == 405
            assert refused.headers["allow"] == "GET"
            head = await client.head(f"{url}/healthz")
            assert (head.status_code, head.content) == (405, b"")
            assert (await client.get(f"{url}/metrics?x=1")).status_code == 200
            port = int(url.rsplit(":", 1)[1])
            assert (await raw_exchange(port, b"NOT HTTP\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            # A head over the bound, never finished: refused once it is too long.
            head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: "
            huge = head + b"a" * (MAX_REQUEST_BYTES + 4096 - len(head))
            assert (await raw_exchange(port, huge)).startswith(b"HTTP/1.1 431 ")


def never_connecting() -> IMAPConnector:
    """An IMAP connector whose session never starts (the channel stays connecting)."""

    @asynccontextmanager
    async def never() -> AsyncIterator[IMAPConnection]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")
        yield

    return never


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes to the endpoint; return everything it answers before closing."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            # It may answer and close before it read all of an oversized request.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(request)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            return answer


async def test_connections_over_the_limit_are_closed_and_idle_ones_time_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Long enough that the over-limit client is turned away while every slot is held.
    monkeypatch.setattr(_health, "REQUEST_TIMEOUT_SECONDS", 3.0)
    metrics = ServiceMetrics()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_health, "127.0.0.1", 0, {}, metrics)
        port = listeners[0].socket.getsockname()[1]
        # MAX_CONNECTIONS clients that never send a request hold every slot.
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)  # all accepted
        one_more = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert one_more == b""  # closed without an answer
        # The idle ones are dropped after the request timeout; then the service answers.
        for stream in idle:
            with trio.fail_after(60):
                assert await stream.receive_some(10) == b""
            await stream.aclose()
        answer = await raw_exchange(port, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")  # no accounts: nothing unhealthy
        nursery.cancel_scope.cancel()


def fake_channel(**status: Any) -> Any:
    """Just what health_report reads: the status."""
    return types.SimpleNamespace(status=trio_util.AsyncValue(ChannelStatus(**status)))


def test_a_failing_smtp_is_unhealthy_and_polling_is_healthy() -> None:
    healthy, body = health_report(
        {"a": fake_channel(imap="idle", smtp_error="SMTPPermanentError: 554 no")}
    )
    assert not healthy
    accounts: Any = body["accounts"]
    assert accounts["a"]["reasons"] == ["SMTP failing: SMTPPermanentError: 554 no"]
    assert health_report({"a": fake_channel(imap="polling")})[0]
    assert not health_report({"a": fake_channel(imap="reconnecting")})[0]


def test_serve_cannot_start_when_the_health_address_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "prxmail.toml"
        lines = [
            "[channels_config.email]",
            'imap_host = "127.0.0.1"',
            "imap_port = 9",
            'imap_security = "plain"',
            'smtp_host = "127.0.0.1"',
            "smtp_port = 9",
            'smtp_security = "plain"',
            'username = "bot@example.com"',
            'password = "pw"',
            'from_address = "bot@example.com"',
            f'state_dir = "{tmp_path / "state"}"',
            f'health_listen = "127.0.0.1:{port}"',
        ]
        path.write_text("\n".join(lines) + "\n")
        err = io.StringIO()
        code = run_serve(
            path, exec_command=sys.executable, log_format="human", out=io.StringIO(), err=err
        )
    assert code == EXIT_CONFIG
    assert "prxmail could not start" in err.getvalue()
    assert "address already in use" in err.getvalue().lower()
