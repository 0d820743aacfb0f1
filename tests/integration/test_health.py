"""``prxmail serve`` with health_listen and a NOTIFY_SOCKET, against the real servers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_serve import Setup
from tests.mailservers import MailServers

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A NOTIFY_SOCKET the test binds, as systemd would; serve inherits the variable."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def notifications_until(sock: socket.socket, wanted: str) -> list[str]:
    seen = [sock.recv(4096).decode()]
    while wanted not in seen[-1]:
        seen.append(sock.recv(4096).decode())
    return seen


def metric_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def test_healthz_metrics_and_ready_while_serving(
    mail_servers: MailServers, tmp_path: Path, notify_socket: socket.socket
) -> None:
    port = free_port()
    setup = Setup(mail_servers, tmp_path, "health", health_listen=f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    proc = setup.serve()
    try:
        before = notifications_until(notify_socket, "READY=1")
        assert "STATUS=default: idle" in before[-1]
        with httpx.Client(timeout=10) as client:
            healthy = client.get(f"{base}/healthz")
            assert healthy.status_code == 200, healthy.text
            assert healthy.json()["accounts"]["default"]["imap"] == "idle"
            setup.send("hello metrics")
            proc.wait_log("reply sent")
            deadline = time.monotonic() + 30
            while True:
                values = metric_values(client.get(f"{base}/metrics").text)
                default = frozenset({("account", "default")})
                if values[("prxmail_replies_sent_total", default)] == 1:
                    break
                assert time.monotonic() < deadline, values
                time.sleep(0.1)

            def outcome(name: str) -> float:
                labels = frozenset({("account", "default"), ("outcome", name)})
                return values[("prxmail_messages_total", labels)]

            assert outcome("replied") == 1
            assert outcome("failed") == 0
            assert outcome("rejected") == 0
            assert values[("prxmail_outbox_pending", default)] == 0
            assert values[("prxmail_imap_connected", default)] == 1
            assert values[("prxmail_reconnects_total", default)] == 0
            assert values[("prxmail_handler_seconds_count", default)] == 1
            # Sent after READY: it came by an IDLE push. The clock starts when EXISTS
            # arrives (after Dovecot's own 500 ms): search, fetch, parse, claim.
            assert values[("prxmail_push_latency_seconds_count", default)] == 1
            assert 0 < values[("prxmail_push_latency_seconds_sum", default)] < 5
            assert client.get(f"{base}/nothing").status_code == 404
    finally:
        status = proc.terminate()
    assert status == 0
    assert "STOPPING=1" in notifications_until(notify_socket, "STOPPING=1")[-1]
