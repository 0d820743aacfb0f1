"""A loopback TCP proxy that forwards bytes and injects faults, for the fault tests.

Theory of operation
-------------------
``FaultProxy`` listens on a free 127.0.0.1 port and forwards every accepted connection
to one upstream (host, port). Each connection is two threads, one per direction, each
reading at most :data:`CHUNK` bytes and ``sendall``-ing them on, so a direction never
holds more than one chunk (backpressure is the kernel's). It runs in plain threads, so
it works under a prxmail running in-process on trio and under a ``prxmail serve``
subprocess alike. Bytes are forwarded unchanged: TLS passes through end to end and the
certificate (issued for 127.0.0.1) still verifies.

Faults, each applying to the connections open *now* (new connections are healthy, which
is what lets the client recover):

* :meth:`cut` closes both sides at once, with RST (``SO_LINGER`` 0) or FIN.
* :meth:`cut_after` arms a cut that fires after N more bytes in one direction (or
  either), so a test can land a cut inside a literal being fetched or a DATA being sent.
* :meth:`cut_on` arms a cut that fires when a byte pattern passes (plain-text protocols).
* :meth:`stall` (now) and :meth:`stall_after` (after N bytes) stop forwarding
  silently: no bytes either way, no FIN, no RST; the sockets stay open until
  :meth:`close`. It is what a NAT box that forgot the mapping looks like to both ends.
* :meth:`rewrite` (plain-text protocols) replaces a byte pattern in every chunk that
  passes in one direction, on every connection from then on, until
  :meth:`clear_rewrites`: a server that answers one message wrongly *every* time.
  A pattern split across two reads is not matched: keep patterns short and unique.

``source_host`` makes the upstream connections come from that loopback address (the
test Dovecot lets LOGIN through in plain text only on a connection whose local and
remote addresses are equal).

Counters (:meth:`statistics`) say how many connections were accepted, cut and stalled.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Literal

import attrs

__all__ = ["CHUNK", "Direction", "FaultProxy", "ProxyStatistics"]

# One read per direction: a TLS record's worth, so a handshake passes in one piece and
# a cut "after N bytes" lands within 16 KiB of where it was aimed.
CHUNK = 16 * 1024
# Connections open at once. The fault tests open a handful; the bound keeps a runaway
# reconnect loop from exhausting threads in the test process.
MAX_CONNECTIONS = 64
# How long a stalled direction sleeps between checks for close(); short so close() is
# prompt, long enough not to spin.
STALL_POLL = 0.05
# Bytes of recent traffic a pattern match may span (per direction).
PATTERN_WINDOW = 4096

Direction = Literal["up", "down", "any"]
"""``up``: client -> server; ``down``: server -> client; ``any``: either."""


@attrs.frozen
class ProxyStatistics:
    """Counters since the proxy started."""

    accepted: int
    cuts: int
    stalls: int
    open: int
    rewrites: int = 0


@attrs.define
class _Trigger:
    direction: Direction
    remaining: int | None
    pattern: bytes | None
    rst: bool
    stall: bool = False


class _Conn:
    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.lock = threading.Lock()
        self.closed = False
        self.stalled = False
        self.triggers: list[_Trigger] = []
        self.tails: dict[str, bytes] = {"up": b"", "down": b""}
        self.bytes = {"up": 0, "down": 0}

    def start(self) -> None:
        for direction, src, dst in (
            ("up", self.client, self.server),
            ("down", self.server, self.client),
        ):
            threading.Thread(target=self._pump, args=(direction, src, dst), daemon=True).start()

    def _pump(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                if self._wait_while_stalled():
                    return
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    data = b""
                if self._wait_while_stalled():
                    return  # stalled mid-read: the bytes just read are swallowed
                if not data:
                    self.shut(rst=False)
                    return
                data = self.proxy._rewrite(direction, data)
                data, fire = self._apply_triggers(direction, data)
                if data:
                    try:
                        dst.sendall(data)
                    except OSError:
                        self.shut(rst=False)
                        return
                if fire == "stall":
                    self.proxy._count_stall()
                    self.stall()
                    continue
                if fire is not None:
                    self.proxy._count_cut()
                    self.shut(rst=fire)
                    return
        finally:
            self.proxy._forget(self)

    def _wait_while_stalled(self) -> bool:
        """Sleep while stalled; True when the connection is closed."""
        while True:
            with self.lock:
                if self.closed:
                    return True
                if not self.stalled:
                    return False
            self.proxy._closing.wait(STALL_POLL)

    def _apply_triggers(
        self, direction: str, data: bytes
    ) -> tuple[bytes, bool | Literal["stall"] | None]:
        """Returns: the bytes to forward and what fires after them (RST?, stall, None)."""
        with self.lock:
            self.bytes[direction] += len(data)
            window = (self.tails[direction] + data)[-PATTERN_WINDOW:]
            self.tails[direction] = window
            for trigger in self.triggers:
                if trigger.direction not in (direction, "any"):
                    continue
                if trigger.remaining is not None:
                    if len(data) >= trigger.remaining:
                        self.triggers.remove(trigger)
                        return data[: trigger.remaining], "stall" if trigger.stall else trigger.rst
                    trigger.remaining -= len(data)
                elif trigger.pattern is not None and trigger.pattern in window:
                    self.triggers.remove(trigger)
                    # The chunk that completed the pattern is not forwarded.
                    return b"", "stall" if trigger.stall else trigger.rst
        return data, None

    def arm(self, trigger: _Trigger) -> None:
        with self.lock:
            self.triggers.append(trigger)

    def stall(self) -> None:
        with self.lock:
            self.stalled = True

    def shut(self, *, rst: bool) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                if rst:
                    # Linger 0: close() sends RST instead of FIN and drops unsent data.
                    # SHUT_RD sends nothing but wakes the pump blocked in recv() on this
                    # socket; until that recv returns, close() would not release it.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class FaultProxy:
    """Forward 127.0.0.1:``port`` to ``upstream`` and inject faults on demand.

    Use as a context manager (``with FaultProxy(host, port) as proxy``) or call
    :meth:`close`. Every method is thread-safe.

    Args:
        upstream_host: Where to connect for each accepted connection.
        upstream_port: Its port.
        source_host: The local address upstream connections come from (default: any).
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, source_host: str | None = None
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._source = (source_host, 0) if source_host is not None else None
        self._rewrites: list[tuple[bytes, bytes, Direction]] = []
        self._rewritten = 0
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._closing = threading.Event()
        self._accepted = 0
        self._cuts = 0
        self._stalls = 0
        # Triggers armed while no connection was open: they go to the next one accepted.
        self._pending: list[_Trigger] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(STALL_POLL * 4)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                too_many = len(self._conns) >= MAX_CONNECTIONS
            if too_many:
                client.close()
                continue
            try:
                server = socket.create_connection(
                    self.upstream, timeout=10, source_address=self._source
                )
                server.settimeout(None)
            except OSError:
                # Upstream down: the client sees its connection refused-like close.
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, client, server)
            with self._lock:
                self._conns.append(conn)
                self._accepted += 1
                conn.triggers.extend(self._pending)
                self._pending.clear()
            conn.start()

    def _forget(self, conn: _Conn) -> None:
        with conn.lock:
            leftover = list(conn.triggers)
            conn.triggers.clear()
        with self._lock:
            with contextlib.suppress(ValueError):
                self._conns.remove(conn)
            # A cut armed on a connection that ended first goes to the next one, so an
            # armed fault is not silently lost when the client closes on its own.
            if not self._closing.is_set():
                self._pending.extend(leftover)

    def _rewrite(self, direction: str, data: bytes) -> bytes:
        with self._lock:
            rules = list(self._rewrites)
        for pattern, replacement, where in rules:
            if where in (direction, "any") and pattern in data:
                data = data.replace(pattern, replacement)
                with self._lock:
                    self._rewritten += 1
        return data

    def rewrite(self, pattern: bytes, replacement: bytes, direction: Direction = "down") -> None:
        """Replace ``pattern`` by ``replacement`` in every chunk passing ``direction``,
        on every connection, until :meth:`clear_rewrites`.

        Raises:
            ValueError: the pattern is empty or longer than :data:`CHUNK`.
        """
        if not 0 < len(pattern) <= CHUNK:
            raise ValueError(f"pattern must be 1..{CHUNK} bytes")
        with self._lock:
            self._rewrites.append((pattern, replacement, direction))

    def clear_rewrites(self) -> None:
        """Stop rewriting."""
        with self._lock:
            self._rewrites.clear()

    def _count_stall(self) -> None:
        with self._lock:
            self._stalls += 1

    def _count_cut(self) -> None:
        with self._lock:
            self._cuts += 1

    def _current(self) -> list[_Conn]:
        with self._lock:
            return [c for c in self._conns if not c.closed and not c.stalled]

    def open_connections(self) -> int:
        """Returns: connections forwarding now (not cut, not stalled)."""
        return len(self._current())

    def cut(self, *, rst: bool = True) -> int:
        """Close every open connection now (both sides), with RST or FIN.

        Returns:
            How many connections were cut.
        """
        conns = self._current()
        for conn in conns:
            conn.shut(rst=rst)
        with self._lock:
            self._cuts += len(conns)
        return len(conns)

    def _arm(self, make: Callable[[], _Trigger]) -> int:
        conns = self._current()
        for conn in conns:
            conn.arm(make())
        if not conns:
            with self._lock:
                self._pending.append(make())
            return 1
        return len(conns)

    def cut_after(self, nbytes: int, direction: Direction = "any", *, rst: bool = True) -> int:
        """Arm a cut after ``nbytes`` more bytes pass on every open connection.

        With no connection open, the next accepted connection is armed instead, and a
        connection that ends before its cut fired hands the cut on to the next. A
        fired cut counts in :meth:`statistics`; an armed one that never fires does not.

        Returns:
            How many connections were armed.

        Raises:
            ValueError: ``nbytes`` is negative.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        return self._arm(lambda: _Trigger(direction, nbytes, None, rst))

    def cut_on(self, pattern: bytes, direction: Direction = "any", *, rst: bool = True) -> int:
        """Arm a cut when ``pattern`` passes (plain-text protocols), like :meth:`cut_after`.

        Returns:
            How many connections were armed.

        Raises:
            ValueError: the pattern is empty or longer than :data:`PATTERN_WINDOW`.
        """
        if not 0 < len(pattern) <= PATTERN_WINDOW:
            raise ValueError(f"pattern must be 1..{PATTERN_WINDOW} bytes")
        return self._arm(lambda: _Trigger(direction, None, pattern, rst))

    def disarm(self) -> None:
        """Drop every armed cut that has not fired yet."""
        with self._lock:
            self._pending.clear()
            conns = list(self._conns)
        for conn in conns:
            with conn.lock:
                conn.triggers.clear()

    def stall(self) -> int:
        """Stop forwarding on every open connection, silently and for good.

        Returns:
            How many connections were stalled.
        """
        conns = self._current()
        for conn in conns:
            conn.stall()
        with self._lock:
            self._stalls += len(conns)
        return len(conns)

    def stall_after(self, nbytes: int, direction: Direction = "any") -> int:
        """Arm a silent stall after ``nbytes`` more bytes pass, like :meth:`cut_after`.

        Returns:
            How many connections were armed.

        Raises:
            ValueError: ``nbytes`` is negative.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        return self._arm(lambda: _Trigger(direction, nbytes, None, rst=False, stall=True))

    def statistics(self) -> ProxyStatistics:
        """Returns: the counters since the proxy started."""
        with self._lock:
            return ProxyStatistics(
                accepted=self._accepted,
                cuts=self._cuts,
                stalls=self._stalls,
                open=sum(1 for c in self._conns if not c.closed),
                rewrites=self._rewritten,
            )

    def close(self) -> None:
        """Stop accepting and close every connection (stalled ones too). Idempotent."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shut(rst=False)
