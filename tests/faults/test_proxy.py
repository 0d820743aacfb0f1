"""The fault proxy itself: forwards bytes, cuts exactly where told, stalls silently."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.faults.proxy import FaultProxy

# No mark "integration": the proxy is tested against its own sockets, no mail server.
pytestmark = pytest.mark.timeout(30)


@contextlib.contextmanager
def sink_server() -> Iterator[tuple[int, list[bytes], threading.Event]]:
    """A server that records everything it receives and answers each read with 'ok'."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []
    ended = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                received.append(data)
                with contextlib.suppress(OSError):
                    conn.sendall(b"ok")
        ended.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received, ended
    finally:
        listener.close()
        thread.join(timeout=5)


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    deadline = 50
    while proxy.open_connections() < 1 and deadline:
        threading.Event().wait(0.02)
        deadline -= 1
    return sock


def ending(sock: socket.socket) -> str:
    """Read until the connection ends; how it ended: "rst" or "fin"."""
    try:
        for _ in range(1000):
            if not sock.recv(4096):
                return "fin"
    except ConnectionResetError:
        return "rst"
    return "still open"


def test_forwards_and_cuts_after_exact_bytes_with_rst() -> None:
    with sink_server() as (port, received, ended), FaultProxy("127.0.0.1", port) as proxy:
        client = connect(proxy)
        client.sendall(b"hello")
        assert client.recv(10) == b"ok"
        assert proxy.cut_after(7, "up", rst=True) == 1
        client.sendall(b"0123456789")
        assert ending(client) == "rst"
        assert ended.wait(5)
        client.close()
        assert b"".join(received) == b"hello0123456"
        assert proxy.statistics().cuts == 1


def test_cut_with_fin_is_an_orderly_close() -> None:
    with sink_server() as (port, _received, ended), FaultProxy("127.0.0.1", port) as proxy:
        client = connect(proxy)
        assert proxy.cut(rst=False) == 1
        assert ending(client) == "fin"
        assert ended.wait(5)
        client.close()


def test_cut_on_pattern_drops_the_chunk() -> None:
    with sink_server() as (port, received, ended), FaultProxy("127.0.0.1", port) as proxy:
        client = connect(proxy)
        proxy.cut_on(b"DATA", "up")
        client.sendall(b"MAIL FROM")
        assert client.recv(10) == b"ok"
        client.sendall(b"DATA\r\n")
        assert ended.wait(5)
        client.close()
        assert b"".join(received) == b"MAIL FROM"


def test_stall_is_silent_and_new_connections_work() -> None:
    with sink_server() as (port, received, ended), FaultProxy("127.0.0.1", port) as proxy:
        client = connect(proxy)
        assert proxy.stall() == 1
        client.sendall(b"lost")
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(10)  # no bytes, no FIN, no RST
        assert received == []
        assert not ended.is_set()
        assert proxy.statistics().stalls == 1
        client.close()


def test_rewrite_replaces_a_pattern_on_every_connection_until_cleared() -> None:
    with sink_server() as (port, received, ended), FaultProxy("127.0.0.1", port) as proxy:
        proxy.rewrite(b"secret", b"XXXXXXXXXX", "up")
        client = connect(proxy)
        client.sendall(b"a secret here")
        assert client.recv(10) == b"ok"
        proxy.clear_rewrites()
        client.sendall(b" secret")
        assert client.recv(10) == b"ok"
        client.close()
        assert ended.wait(5)
        assert b"".join(received) == b"a XXXXXXXXXX here secret"
        assert proxy.statistics().rewrites == 1


def test_upstream_connections_come_from_the_source_host() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    peers: list[str] = []

    def accept() -> None:
        conn, peer = listener.accept()
        peers.append(peer[0])
        conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        with FaultProxy("127.0.0.1", port, source_host="127.0.0.3") as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            thread.join(timeout=5)
            client.close()
    finally:
        listener.close()
    assert peers == ["127.0.0.3"]
