"""DNS, TCP and TLS, diagnosed step by step before a protocol is spoken.

Theory of operation: the doctor opens the connection itself rather than through the
protocol openers so that each failure can be named exactly -- refused versus timed
out versus unreachable; expired versus wrong name versus untrusted certificate; plain
text on a TLS port and the reverse. A small recording wrapper
(:class:`_RecordingStream`) keeps the first bytes the server sent, which is what
tells "this port speaks plain text" from "this port speaks TLS" when a handshake or a
greeting fails. The connected stream is then handed to the IMAP or SMTP checks.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from typing import Any

import trio

from prxmail._diagnosis import (
    NOT_TLS_REASONS,
    ca_hint,
    certificate_error,
    connect_error,
    dns_error,
    looks_like_tls,
    port_advice,
)
from prxmail._tls import Security, create_ssl_context
from prxmail.config import Config
from prxmail.doctor._report import (
    CERT_EXPIRY_WARN_DAYS,
    FIRST_BYTES_KEPT,
    MAX_ADDRESSES,
    Status,
    Timeouts,
    _Chain,
    _server_text,
)
from prxmail.errors import RemoteProtocolError, SMTPReplyError


class _RecordingStream(trio.abc.Stream):
    """Passes bytes through and keeps the first :data:`FIRST_BYTES_KEPT` received."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.first = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        room = FIRST_BYTES_KEPT - len(self.first)
        if room > 0:
            self.first += data[:room]
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


_looks_like_tls = looks_like_tls


def _first_line(data: bytes | bytearray) -> str:
    line = bytes(data).split(b"\n", 1)[0].rstrip(b"\r")
    return _server_text(line.decode("utf-8", "replace"))


def _looks_like_text(data: bytes | bytearray) -> bool:
    line = bytes(data[:64]).split(b"\n", 1)[0]
    return bool(line) and all(32 <= b < 127 or b in b"\r\t" for b in line)


def _guess_protocol(data: bytes | bytearray) -> str | None:
    head = bytes(data[:16])
    if head.startswith((b"* OK", b"* PREAUTH", b"* BYE")):
        return "IMAP"
    if re.match(rb"\d{3}[ -]", head):
        return "SMTP"
    if head.startswith((b"+OK", b"-ERR")):
        return "POP3"
    if head.startswith(b"SSH-"):
        return "SSH"
    if head.startswith(b"HTTP/"):
        return "HTTP"
    return None


# -- DNS and TCP ------------------------------------------------------------------------


AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, Any]


async def _step_dns(
    chain: _Chain, proto: str, host: str, port: int, timeouts: Timeouts
) -> list[AddrInfo] | None:
    name = f"{proto}.dns"
    key = f"{proto}_host"
    try:
        with trio.fail_after(timeouts.dns):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except trio.TooSlowError:
        chain.add(
            name,
            Status.FAIL,
            f"looking up {host} did not finish within {timeouts.dns:g} s",
            hint="the DNS server does not answer: check the network connection and"
            " /etc/resolv.conf, or put an IP address in " + key,
        )
        return None
    except (socket.gaierror, UnicodeError) as exc:
        found = dns_error(host, proto, exc)
        chain.add(name, Status.FAIL, found.summary, detail=found.detail, hint=found.hint)
        return None
    addresses: list[AddrInfo] = [
        (family, kind, prot, sockaddr) for family, kind, prot, _, sockaddr in infos
    ]
    if not addresses:
        chain.add(
            name,
            Status.FAIL,
            f"{host} resolves to no usable address",
            hint=f"check {key}; the name exists but has no address for this machine",
        )
        return None
    shown = ", ".join(dict.fromkeys(str(a[3][0]) for a in addresses))
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        chain.add(name, Status.PASS, f"{host} resolves to {shown}")
    else:
        chain.add(name, Status.PASS, f"{host} is an IP address (no lookup needed)")
    return addresses


def _connect_error(host: str, port: int, proto: str, exc: OSError) -> tuple[str, str]:
    """Summary and hint for a failed connect() (see :func:`prxmail._diagnosis.connect_error`)."""
    found = connect_error(host, port, proto, exc)
    return found.summary, found.hint


async def _step_tcp(
    chain: _Chain,
    proto: str,
    host: str,
    port: int,
    addresses: list[AddrInfo],
    *,
    timeouts: Timeouts,
) -> trio.SocketStream | None:
    name = f"{proto}.tcp"
    errors: list[tuple[str, OSError]] = []
    start = time.monotonic()
    with trio.move_on_after(timeouts.connect):
        for family, kind, prot, sockaddr in addresses[:MAX_ADDRESSES]:
            sock = trio.socket.socket(family, kind, prot)
            try:
                await sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                errors.append((str(sockaddr[0]), exc))
                continue
            except BaseException:
                sock.close()
                raise
            elapsed = (time.monotonic() - start) * 1000
            chain.add(name, Status.PASS, f"connected to {sockaddr[0]}:{port} in {elapsed:.0f} ms")
            return trio.SocketStream(sock)
    if not errors:
        chain.add(
            name,
            Status.FAIL,
            f"connection to {host}:{port} timed out after {timeouts.connect:g} s",
            hint="a firewall drops the packets or the host is down; check"
            f" {proto}_host and {proto}_port, and whether outgoing connections to that"
            " port are allowed",
        )
        return None
    summary, hint = _connect_error(host, port, proto, errors[0][1])
    detail = [f"{addr}: {exc.strerror or exc}" for addr, exc in errors]
    if len(errors) < len(addresses[:MAX_ADDRESSES]):
        detail.append(f"further addresses timed out after {timeouts.connect:g} s")
    chain.add(name, Status.FAIL, summary, detail=detail if len(detail) > 1 else (), hint=hint)
    return None


# -- TLS --------------------------------------------------------------------------------


def _find_ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


_port_advice = port_advice
_ca_hint = ca_hint


def _tls_failure(
    chain: _Chain, proto: str, config: Config, exc: BaseException, first: bytes | bytearray
) -> None:
    """Explain a failed TLS handshake as precisely as the evidence allows."""
    name = f"{proto}.tls"
    host = config.imap_host if proto == "imap" else config.smtp_host
    error = _find_ssl_error(exc)
    if isinstance(error, ssl.SSLCertVerificationError):
        found = certificate_error(proto, host, config, error)
        chain.add(name, Status.FAIL, found.summary, detail=found.detail, hint=found.hint)
        return
    reason = getattr(error, "reason", None) or ""
    if (first and not _looks_like_tls(first)) or reason in NOT_TLS_REASONS:
        said = f" (it said {_first_line(first)!r})" if first and _looks_like_text(first) else ""
        chain.add(
            name,
            Status.FAIL,
            f"the server answered in plain text, not TLS{said}",
            hint=_port_advice(proto, Security.STARTTLS),
        )
        return
    if error is not None:
        text = str(error)
        hint = "the server may support only old TLS versions or ciphers (TLS 1.2 is required)"
        if "VERSION" not in reason.upper() and "PROTOCOL" not in reason.upper():
            hint = f"check {proto}_host, {proto}_port and {proto}_security"
        chain.add(name, Status.FAIL, f"TLS handshake failed: {text}", hint=hint)
        return
    chain.add(
        name,
        Status.FAIL,
        "the server closed the connection during the TLS handshake",
        detail=[str(exc)] if str(exc) else (),
        hint=f"check {proto}_port and {proto}_security; the server may refuse this client",
    )


def _cert_summary(stream: trio.SSLStream[Any], security: Security) -> tuple[Status, str]:
    how = "STARTTLS" if security is Security.STARTTLS else "TLS"
    version = stream.version() or "TLS"
    cert = stream.getpeercert() or {}

    def name_of(field: str) -> str:
        for rdn in cert.get(field, ()):
            for key, value in rdn:
                if key in ("commonName", "organizationName"):
                    return str(value)
        return "?"

    sans = [
        value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")
    ]
    subject = sans[0] if sans else name_of("subject")
    text = f"{how} up ({version}); certificate for {subject} issued by {name_of('issuer')!r}"
    not_after = cert.get("notAfter")
    if isinstance(not_after, str):
        expires = ssl.cert_time_to_seconds(not_after)
        days = int((expires - time.time()) // 86400)
        text += f", valid {days} more days"
        if days < CERT_EXPIRY_WARN_DAYS:
            return Status.WARN, text
    return Status.PASS, text


async def _step_tls_implicit(
    chain: _Chain,
    proto: str,
    config: Config,
    context: ssl.SSLContext,
    raw: _RecordingStream,
    *,
    timeouts: Timeouts,
) -> trio.SSLStream[_RecordingStream] | None:
    name = f"{proto}.tls"
    host = config.imap_host if proto == "imap" else config.smtp_host
    tls = trio.SSLStream(raw, context, server_hostname=host)
    try:
        with trio.fail_after(timeouts.tls):
            await tls.do_handshake()
    except trio.TooSlowError:
        chain.add(
            name,
            Status.FAIL,
            f"the TLS handshake did not finish within {timeouts.tls:g} s",
            hint=_port_advice(proto, Security.STARTTLS)
            if raw.first and not _looks_like_tls(raw.first)
            else f"check {proto}_port and {proto}_security",
        )
        return None
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        _tls_failure(chain, proto, config, exc, raw.first)
        return None
    status, summary = _cert_summary(tls, Security.TLS)
    hint = "the certificate expires soon: the server administrator must renew it"
    chain.add(name, status, summary, hint=hint if status is Status.WARN else "")
    return tls


def _ssl_context(chain: _Chain, proto: str, config: Config) -> ssl.SSLContext | None:
    try:
        return create_ssl_context(config.tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        chain.add(
            f"{proto}.tls",
            Status.FAIL,
            f"cannot load tls_ca_file {config.tls_ca_file}: {exc}",
            hint="point tls_ca_file at a readable PEM file holding the CA certificate",
        )
        return None


# -- shared by both chains ---------------------------------------------------------


def _greeting_failure(
    chain: _Chain,
    proto: str,
    security: Security,
    raw: _RecordingStream,
    exc: BaseException,
    *,
    timeouts: Timeouts,
) -> None:
    name = f"{proto}.greeting"
    # Under implicit TLS the recorded bytes are ciphertext; what the server said in
    # clear is only known from the protocol error's excerpt.
    first: bytes | bytearray = raw.first
    if security is Security.TLS:
        first = exc.excerpt if isinstance(exc, RemoteProtocolError) else b""
    expected = proto.upper()
    if isinstance(exc, trio.TooSlowError) and not first:
        if security is Security.TLS:
            chain.add(
                name,
                Status.FAIL,
                f"TLS is up but the server sent no greeting within {timeouts.greeting:g} s",
                hint=f"check {proto}_port: this may not be an {expected} server",
            )
        else:
            chain.add(
                name,
                Status.FAIL,
                f"the server sent no greeting within {timeouts.greeting:g} s",
                hint=_port_advice(proto, Security.TLS),
            )
        return
    if security is not Security.TLS and _looks_like_tls(first):
        chain.add(
            name,
            Status.FAIL,
            "the server answered with TLS, not a plain-text greeting",
            hint=_port_advice(proto, Security.TLS),
        )
        return
    other = _guess_protocol(first)
    if other is not None and other != expected:
        chain.add(
            name,
            Status.FAIL,
            f"this is not an {expected} server: it greets like {other} ({_first_line(first)!r})",
            hint=f"check {proto}_host and {proto}_port",
        )
        return
    if isinstance(exc, trio.TooSlowError):
        chain.add(
            name,
            Status.FAIL,
            f"the greeting did not complete within {timeouts.greeting:g} s",
            detail=[_first_line(first)] if first else (),
            hint=f"check {proto}_port",
        )
        return
    if isinstance(exc, SMTPReplyError):
        chain.add(
            name,
            Status.FAIL,
            f"the server refused the session: {exc.code} {_server_text(exc.text)}",
            hint="the server is overloaded or refuses this client; try again later",
        )
        return
    if isinstance(exc, RemoteProtocolError):
        chain.add(
            name,
            Status.FAIL,
            f"the server's greeting is not {expected}",
            detail=[_first_line(first)] if first else [str(exc)],
            hint=f"check {proto}_host and {proto}_port",
        )
        return
    chain.add(
        name,
        Status.FAIL,
        f"the server closed the connection instead of greeting: {_server_text(str(exc))}",
        hint=f"the server refuses this client or is overloaded; check {proto}_port",
    )


async def _open_transport(
    chain: _Chain,
    proto: str,
    config: Config,
    *,
    host: str,
    port: int,
    security: Security,
    timeouts: Timeouts,
) -> tuple[_RecordingStream, trio.abc.Stream, ssl.SSLContext | None] | None:
    """The steps both chains share: DNS, TCP and, for implicit TLS, the handshake.

    Returns:
        The raw (recording) stream, the stream to speak the protocol on, and the TLS
        context (``None`` for plain text); ``None`` when a step failed (it is reported
        in ``chain`` and the connection is closed).
    """
    addresses = await _step_dns(chain, proto, host, port, timeouts)
    if addresses is None:
        return None
    tcp = await _step_tcp(chain, proto, host, port, addresses, timeouts=timeouts)
    if tcp is None:
        return None
    raw = _RecordingStream(tcp)
    opened = False
    try:
        context = None
        if security is not Security.PLAIN:
            context = _ssl_context(chain, proto, config)
            if context is None:
                return None
        stream: trio.abc.Stream = raw
        if security is Security.TLS:
            assert context is not None
            tls = await _step_tls_implicit(chain, proto, config, context, raw, timeouts=timeouts)
            if tls is None:
                return None
            stream = tls
        opened = True
        return raw, stream, context
    finally:
        if not opened:
            await trio.aclose_forcefully(raw)
