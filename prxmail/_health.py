"""The health and metrics endpoint (``health_listen``): ``GET /healthz``, ``GET /metrics``.

Theory of operation: a deliberately small HTTP/1.1 server for a supervisor, a
container runtime or Prometheus on the same host. h11 does the framing (no request
parsing of our own); each connection carries one request and is then closed
(``Connection: close``), so there is no keep-alive state to bound. Every connection is
bounded three ways: the request head may be at most :data:`MAX_REQUEST_BYTES` (h11
refuses more with 431), the whole exchange must finish within
:data:`REQUEST_TIMEOUT_SECONDS`, and at most :data:`MAX_CONNECTIONS` are served at once
(a ``CapacityLimiter``; one over it is closed at once instead of queueing, so a flood
cannot pile up sockets). Only ``GET /healthz`` and ``GET /metrics`` exist; another
method on them is 405, another path 404, a malformed request 400.

``/healthz`` is 200 when every account's IMAP session works (idle, polling or
fetching) and its SMTP is not failing, else 503; the JSON body names each account's
state and, for an unhealthy one, why (the status texts are redacted already).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from typing import Final

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST

from prxmail._log import log_event
from prxmail._metrics import ServiceMetrics
from prxmail._systemd import CONNECTED_STATES
from prxmail.channel import MailChannel
from prxmail.channel._core import _describe
from prxmail.errors import PrxmailError

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT_SECONDS",
    "health_report",
    "serve_health",
]

# A GET from curl, Prometheus or a container runtime's probe is a few hundred bytes;
# 8 KiB is the common server limit for a request head and leaves room for long headers.
MAX_REQUEST_BYTES: Final = 8 * 1024

# Scrapers and probes come one or two at a time; more than this at once is a fault
# or a flood, and each connection holds a socket and a task.
MAX_CONNECTIONS: Final = 16

# A probe on loopback answers in milliseconds; a client that has not sent its request
# and read the answer in this time is stuck (or slow-lorising) and is dropped.
REQUEST_TIMEOUT_SECONDS: Final = 10.0

# Bytes read per receive: a whole request head in the usual case.
_RECEIVE_BYTES: Final = 4096

_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"
_ENDPOINTS: Final = ("/healthz", "/metrics")


def health_report(channels: Mapping[str, MailChannel]) -> tuple[bool, dict[str, object]]:
    """Judge the service's health from its accounts' channels.

    Args:
        channels: Account name -> its open channel.

    Returns:
        ``(healthy, body)``: healthy when every account's IMAP is idle, polling or
        fetching and its SMTP has no error; ``body`` is the JSON object ``/healthz``
        answers: ``status`` (``"ok"`` / ``"unhealthy"``) and ``accounts``, per account
        ``healthy``, ``imap`` (its state, e.g. ``"auth-failed"``), ``imap_error``,
        ``smtp_error`` and, when unhealthy, ``reasons``.
    """
    accounts: dict[str, object] = {}
    healthy = True
    for name, channel in channels.items():
        status = channel.status.value
        reasons: list[str] = []
        if status.imap not in CONNECTED_STATES:
            reasons.append(
                f"IMAP {status.imap}" + (f": {status.imap_error}" if status.imap_error else "")
            )
        if status.smtp_error is not None:
            reasons.append(f"SMTP failing: {status.smtp_error}")
        entry: dict[str, object] = {
            "healthy": not reasons,
            "imap": status.imap,
            "imap_error": status.imap_error,
            "smtp_error": status.smtp_error,
        }
        if reasons:
            entry["reasons"] = reasons
            healthy = False
        accounts[name] = entry
    return healthy, {"status": "ok" if healthy else "unhealthy", "accounts": accounts}


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    """The request, or None when the client left before sending one."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_RECEIVE_BYTES)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            return event
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return None


async def _respond(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    *,
    content_type: str,
    extra: tuple[tuple[str, str], ...] = (),
) -> None:
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
        *extra,
    ]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _answer(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    request: h11.Request,
    channels: Mapping[str, MailChannel],
    metrics: ServiceMetrics,
) -> int:
    path = request.target.decode("ascii", "replace").split("?", 1)[0]
    if path not in _ENDPOINTS:
        await _respond(conn, stream, 404, b"not found\n", content_type=_TEXT)
        return 404
    if request.method == b"HEAD":
        # A HEAD answer carries no body (h11 refuses one), so not even the reason.
        await _respond(conn, stream, 405, b"", content_type=_TEXT, extra=(("allow", "GET"),))
        return 405
    if request.method != b"GET":
        await _respond(
            conn,
            stream,
            405,
            b"method not allowed\n",
            content_type=_TEXT,
            extra=(("allow", "GET"),),
        )
        return 405
    if path == "/healthz":
        healthy, report = health_report(channels)
        status = 200 if healthy else 503
        await _respond(
            conn, stream, status, json.dumps(report).encode() + b"\n", content_type=_JSON
        )
        return status
    try:
        exposition = await metrics.exposition()
    except (PrxmailError, OSError) as exc:
        # The state store could not be read: say so, and keep the service running.
        log_event(logging.WARNING, "metrics could not be read", error=_describe(exc))
        await _respond(conn, stream, 500, b"metrics unavailable\n", content_type=_TEXT)
        return 500
    await _respond(conn, stream, 200, exposition, content_type=CONTENT_TYPE_LATEST)
    return 200


async def _serve_connection(
    stream: trio.abc.Stream,
    *,
    channels: Mapping[str, MailChannel],
    metrics: ServiceMetrics,
    limiter: trio.CapacityLimiter,
) -> None:
    async with stream:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            return  # over MAX_CONNECTIONS: closed at once (see the module comment)
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
            with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
                try:
                    request = await _read_request(conn, stream)
                    if request is not None:
                        await _answer(conn, stream, request, channels, metrics)
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        reason = f"bad request: {exc}\n".encode()
                        await _respond(
                            conn, stream, exc.error_status_hint, reason, content_type=_TEXT
                        )
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client went away; nothing to answer
                except h11.LocalProtocolError as exc:
                    # Our answer does not fit the exchange h11 saw: drop this one
                    # connection; a probe must never take the service down.
                    log_event(logging.WARNING, "health request dropped", error=str(exc))
        finally:
            limiter.release()


async def serve_health(
    host: str,
    port: int,
    channels: Mapping[str, MailChannel],
    metrics: ServiceMetrics,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/healthz`` and ``/metrics`` until cancelled.

    Args:
        host: The IP address to listen on.
        port: The TCP port (0: any free one; the listeners say which).
        channels: Account name -> open channel; read at each request, so accounts
            added later are reported too.
        metrics: The service's metrics.
        task_status: For ``nursery.start``: started with the listeners.

    Raises:
        OSError: the address cannot be bound (in use, not local).
    """
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    handler = functools.partial(
        _serve_connection, channels=channels, metrics=metrics, limiter=limiter
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, port, host=host))
        bound = listeners[0].socket.getsockname()
        log_event(logging.INFO, "health endpoint listening", address=f"{bound[0]}:{bound[1]}")
        task_status.started(listeners)
