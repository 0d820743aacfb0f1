"""Loading the system trust store (tens of ms the first time) never runs on the event loop."""

from __future__ import annotations

import ssl
import threading

import pytest
import trio
import trio.testing

from prxmail import Security
from prxmail.imap import _connection as imap_connection
from prxmail.imap import open_imap_stream


async def test_open_imap_stream_loads_the_trust_store_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread = threading.get_ident()
    loaded_in: list[int] = []

    def recording_context(ca_file: object = None) -> ssl.SSLContext:
        loaded_in.append(threading.get_ident())
        return ssl.create_default_context()

    monkeypatch.setattr(imap_connection, "shared_ssl_context", recording_context)
    client, server = trio.testing.memory_stream_pair()

    async def peer() -> None:
        await server.send_all(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        received = b""
        while b"LOGOUT" not in received:
            chunk = await server.receive_some()
            if not chunk:
                return
            received += chunk
        tag = received.split(b" ", 1)[0]
        await server.send_all(b"* BYE bye\r\n" + tag + b" OK done\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer)
        async with open_imap_stream(client, security=Security.PLAIN) as imap:
            assert "IMAP4REV1" in {c.upper() for c in imap.capabilities}
    assert loaded_in
    assert loop_thread not in loaded_in
