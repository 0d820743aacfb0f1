"""``prxmail doctor``: check every step from configuration to a working mailbox.

Theory of operation
-------------------
The doctor walks the path the service takes and stops each protocol at the first step
that fails, because every later step depends on it. The steps are:

* ``config`` -- the file loads (every problem with its key path, from
  :func:`~prxmail.config.load_config`).
* ``imap.*`` -- ``dns``, ``tcp``, ``tls``, ``greeting``, ``capabilities``, ``login``,
  ``folder``, ``idle``. With implicit TLS the ``tls`` step runs before the greeting;
  with STARTTLS it runs after it (the upgrade); in plain mode it only warns.
* ``smtp.*`` -- ``dns``, ``tcp``, ``tls``, ``greeting``, ``ehlo``, ``auth`` and
  ``from_address`` (the last one only compares configuration values).
* ``policy`` -- ``allowed_senders`` empty or ``"*"``.
* ``state.dir`` and ``state.db`` -- the state directory is writable (or creatable), and
  what an existing database holds; nothing is created.

The IMAP and SMTP chains run concurrently in one nursery. DNS, TCP and TLS are done
here rather than by the protocol openers so that each failure can be named exactly
(refused versus timed out versus unreachable; expired versus wrong name versus
untrusted certificate; plain text on a TLS port and the reverse). The connected stream
is then handed to :class:`~prxmail.imap.IMAPConnection` /
:class:`~prxmail.smtp.SMTPConnection`, which speak the protocol. A small recording
wrapper keeps the first bytes the server sent, which is what tells "this port speaks
plain text" from "this port speaks TLS" when a handshake or a greeting fails.

Every network step runs under its own short timeout (the caller owns timeouts, so the
doctor is the caller here), so a run against hosts that never answer still ends in
seconds. No step lets an exception escape: each failure becomes a FAIL result with the
cause and the fix in plain words, and later steps of the same chain become SKIP.

The password never appears in the output: every text of every result is passed
through a redactor that removes the passwords and the forms in which they go on the
wire (base64 for SASL PLAIN/LOGIN, IMAP quoted strings), whatever the server echoes.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import attrs
import trio

from prxmail._redact import Redactor
from prxmail._tls import Security, create_ssl_context
from prxmail.config import Config, load_config
from prxmail.errors import (
    AuthenticationError,
    ConfigError,
    IMAPCommandError,
    PrxmailError,
    RemoteProtocolError,
    SMTPReplyError,
    StateError,
    TLSError,
)
from prxmail.imap import ConnectionState as IMAPState
from prxmail.imap import IMAPConnection, Raw, decode_mailbox
from prxmail.smtp import Extensions, SMTPConnection
from prxmail.state import DB_FILENAME, StateStore, account_key

__all__ = [
    "EXIT_BLOCKED",
    "EXIT_OK",
    "DoctorReport",
    "Status",
    "StepResult",
    "Timeouts",
    "render_text",
    "run_checks",
    "run_doctor",
]

EXIT_OK: Final = 0
EXIT_BLOCKED: Final = 1

# Step timeouts. Each bounds one step, so a run against hosts that never answer ends
# in well under a minute, and normally in about a second. Resolvers retry for 5 s
# and more when the DNS server is down; a name that has not resolved in 5 s will not
# work for the service either.
DNS_TIMEOUT: Final = 5.0
# All addresses of a host together: a firewall that drops packets makes connect() wait
# for the kernel's SYN retries (more than a minute); 5 s is plenty on any real network.
CONNECT_TIMEOUT: Final = 5.0
# The TLS handshake is two round trips plus certificate checks.
TLS_TIMEOUT: Final = 5.0
# Servers greet at once; one that has not spoken in 5 s is most likely waiting for a
# TLS ClientHello (implicit-TLS port used as STARTTLS / plain).
GREETING_TIMEOUT: Final = 5.0
# One protocol command (CAPABILITY, LOGIN, EXAMINE, EHLO, AUTH). Authentication can be
# slow on purpose (servers delay failed logins by a few seconds), hence 10 s.
COMMAND_TIMEOUT: Final = 10.0
# Saying goodbye (LOGOUT, QUIT) is a courtesy; nothing depends on its answer.
CLOSE_TIMEOUT: Final = 2.0
# The whole of one chain (IMAP or SMTP). A server that answers every step just before
# its own limit could otherwise stretch a run to over a minute; the doctor must end in
# seconds, and a server that slow is itself the problem to report.
CHAIN_TIMEOUT: Final = 30.0

# How many bytes of what the server sent first are kept to recognise plain text, TLS
# records or another protocol: one greeting line is enough to tell.
FIRST_BYTES_KEPT: Final = 512
# At most this many server addresses are tried for TCP (all within CONNECT_TIMEOUT).
MAX_ADDRESSES: Final = 4
# Folder names listed when the configured folder is missing: enough to spot the right
# one, short enough for one line.
MAX_FOLDERS_SHOWN: Final = 12
# Server texts are cut to this many characters: a hostile or chatty server must not
# flood the report.
MAX_SERVER_TEXT: Final = 300
# A certificate that expires sooner than this is a warning: the service would stop
# working within days.
CERT_EXPIRY_WARN_DAYS: Final = 14

# OpenSSL verify codes (x509_vfy.h) for the certificate problems named to the user.
_X509_NOT_YET_VALID: Final = 9
_X509_EXPIRED: Final = 10
_X509_SELF_SIGNED_LEAF: Final = 18
_X509_SELF_SIGNED_IN_CHAIN: Final = 19
_X509_NO_LOCAL_ISSUER: Final = 20
_X509_UNVERIFIABLE_LEAF: Final = 21
_X509_UNTRUSTED: Final = 27
_X509_HOSTNAME_MISMATCH: Final = 62
_X509_IP_MISMATCH: Final = 64
_UNTRUSTED_CODES: Final = frozenset(
    {
        2,  # unable to get issuer certificate
        _X509_SELF_SIGNED_LEAF,
        _X509_SELF_SIGNED_IN_CHAIN,
        _X509_NO_LOCAL_ISSUER,
        _X509_UNVERIFIABLE_LEAF,
        _X509_UNTRUSTED,
    }
)

# OpenSSL reasons when the peer's bytes are not TLS records at all.
_NOT_TLS_REASONS: Final = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LAYER_FAILURE",
        "HTTP_REQUEST",
        "UNKNOWN_PROTOCOL",
        "UNEXPECTED_RECORD",
    }
)

_LOGIN_HINT: Final = (
    "check username and password; Gmail and Google Workspace with 2-step verification"
    " need an app password (not the account password), as do iCloud, Yahoo and"
    " Outlook.com; make sure IMAP/SMTP access is enabled in the provider's settings"
)


class Status(enum.Enum):
    """The outcome of one step."""

    PASS = "pass"  # noqa: S105 - a status name
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@attrs.frozen
class StepResult:
    """What one check found.

    Attributes:
        name: Dotted step name, e.g. ``"imap.tls"``.
        status: pass, warn (works but deserves attention), fail (blocks the channel),
            skip (not checked because an earlier step of the same chain failed).
        summary: One line saying what was found.
        detail: More lines (server text, folder list, config problems), may be empty.
        hint: On warn/fail: the fix in plain words, may be empty.
    """

    name: str
    status: Status
    summary: str
    detail: tuple[str, ...] = ()
    hint: str = ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of this result."""
        return {
            "name": self.name,
            "status": self.status.value,
            "summary": self.summary,
            "detail": list(self.detail),
            "hint": self.hint,
        }


@attrs.frozen
class DoctorReport:
    """Every step's result, in a fixed order.

    Attributes:
        config_path: The configuration file checked.
        steps: The results: config, IMAP, SMTP, policy, state.
    """

    config_path: str
    steps: tuple[StepResult, ...]

    @property
    def ok(self) -> bool:
        """True when no step failed (warnings do not block the channel)."""
        return all(step.status is not Status.FAIL for step in self.steps)

    @property
    def exit_status(self) -> int:
        """:data:`EXIT_OK` or :data:`EXIT_BLOCKED`."""
        return EXIT_OK if self.ok else EXIT_BLOCKED

    def step(self, name: str) -> StepResult:
        """The result of the step called ``name``.

        Raises:
            KeyError: no such step in this report.
        """
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``ok``, ``config`` and ``steps``."""
        return {
            "ok": self.ok,
            "config": self.config_path,
            "steps": [step.to_json() for step in self.steps],
        }


@attrs.frozen
class Timeouts:
    """Per-step time limits in seconds (see the module constants for the reasons)."""

    dns: float = DNS_TIMEOUT
    connect: float = CONNECT_TIMEOUT
    tls: float = TLS_TIMEOUT
    greeting: float = GREETING_TIMEOUT
    command: float = COMMAND_TIMEOUT
    close: float = CLOSE_TIMEOUT
    chain: float = CHAIN_TIMEOUT


# -- secrets ----------------------------------------------------------------------------


def _redactor(config: Config) -> Redactor:
    """Removes every form in which the passwords go on the wire: as typed, IMAP-quoted,
    base64, and inside the SASL PLAIN payloads (with and without an authzid)."""
    secrets: list[str | bytes] = []
    for user, password in {
        (config.username, config.password.reveal()),
        (config.smtp_username, config.smtp_password.reveal()),
    }:
        raw, user_b = password.encode(), user.encode()
        secrets += [password, b"\0" + user_b + b"\0" + raw, user_b + b"\0" + user_b + b"\0" + raw]
    return Redactor(secrets)


def _redact_step(redact: Redactor, step: StepResult) -> StepResult:
    return StepResult(
        name=step.name,
        status=step.status,
        summary=redact(step.summary),
        detail=tuple(redact(line) for line in step.detail),
        hint=redact(step.hint),
    )


def _server_text(text: str) -> str:
    """A server's text made safe to print: one line, printable, bounded."""
    flat = " ".join(text.split())
    flat = "".join(ch if ch.isprintable() else "?" for ch in flat)
    if len(flat) > MAX_SERVER_TEXT:
        flat = flat[:MAX_SERVER_TEXT] + "..."
    return flat


# -- the chain of steps -----------------------------------------------------------------


class _Chain:
    """The steps of one protocol, in order; after a failure the rest are skipped."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.results: list[StepResult] = []
        self.failed: str | None = None

    def add(
        self,
        name: str,
        status: Status,
        summary: str,
        *,
        detail: Iterable[str] = (),
        hint: str = "",
    ) -> bool:
        """Record a result; return True when the chain may go on."""
        assert name in self.names, name
        self.results.append(StepResult(name, status, summary, tuple(detail), hint))
        if status is Status.FAIL and self.failed is None:
            self.failed = name
        return status is not Status.FAIL

    def finish(self) -> list[StepResult]:
        """The results, with a SKIP for every step that did not run."""
        done = {r.name for r in self.results}
        reason = f"not checked: {self.failed} failed" if self.failed else "not checked"
        skipped = [StepResult(n, Status.SKIP, reason) for n in self.names if n not in done]
        order = {name: i for i, name in enumerate(self.names)}
        return sorted(self.results + skipped, key=lambda r: order[r.name])


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


def _looks_like_tls(data: bytes | bytearray) -> bool:
    # A TLS record starts with its content type (20..23) and major version 3.
    return len(data) >= 2 and data[0] in (20, 21, 22, 23) and data[1] == 3


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
        code = exc.args[0] if isinstance(exc, socket.gaierror) and exc.args else None
        if code in (socket.EAI_AGAIN, getattr(socket, "EAI_FAIL", None)):
            chain.add(
                name,
                Status.FAIL,
                f"looking up {host} failed temporarily ({exc})",
                hint="the DNS server cannot be reached or failed: check the network"
                " connection and try again",
            )
        else:
            chain.add(
                name,
                Status.FAIL,
                f"{host} does not resolve: no such host",
                detail=[str(exc)],
                hint=f"check the spelling of {key} (e.g. imap.gmail.com, smtp.gmail.com)",
            )
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
    """Summary and hint for a failed connect()."""
    where = f"{host}:{port}"
    key = f"{proto}_port"
    code = exc.errno
    if code == errno.ECONNREFUSED:
        usual = "993 (TLS) or 143 (STARTTLS)" if proto == "imap" else "465 (TLS) or 587 (STARTTLS)"
        return (
            f"connection to {where} refused: nothing listens on that port",
            f"check {key} (usually {usual}) and {proto}_host; is the server running?",
        )
    if code == errno.ENETUNREACH:
        return (
            f"network unreachable for {where}",
            "this machine has no route to that network (no connection, or an IPv6"
            " address without IPv6 connectivity)",
        )
    if code == errno.EHOSTUNREACH:
        return (
            f"no route to host {where}",
            "the host is down or a firewall rejects the connection; check"
            f" {proto}_host and the network",
        )
    if code == errno.ETIMEDOUT:
        return (
            f"connection to {where} timed out",
            "a firewall drops the packets or the host is down; check the host, the port,"
            " and whether outgoing connections to that port are allowed",
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"connection to {where} not permitted by this machine",
            "a local firewall or security policy blocks outgoing connections to it",
        )
    return (f"cannot connect to {where}: {exc.strerror or exc}", f"check {proto}_host and {key}")


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


def _port_advice(proto: str, want: Security) -> str:
    if proto == "imap":
        if want is Security.STARTTLS:
            return (
                "this port speaks plain text first, so it probably expects STARTTLS: set"
                " imap_security = 'starttls' (usual port 143), or use the implicit-TLS"
                " port (usually 993)"
            )
        return (
            "this port probably expects implicit TLS: set imap_security = 'tls' (usual"
            " port 993), or use the STARTTLS port (usually 143)"
        )
    if want is Security.STARTTLS:
        return (
            "this port speaks plain text first, so it probably expects STARTTLS: set"
            " smtp_security = 'starttls' (usual port 587), or use port 465 for implicit TLS"
        )
    return (
        "this port probably expects implicit TLS: set smtp_security = 'tls' (usual port"
        " 465), or use port 587 for STARTTLS"
    )


def _ca_hint(config: Config) -> str:
    if config.tls_ca_file is not None:
        return (
            f"tls_ca_file = '{config.tls_ca_file}' does not contain the CA that signed the"
            " server's certificate: point it at that CA's PEM file"
        )
    return (
        "if the server uses a private or self-signed CA, set tls_ca_file to that CA's PEM"
        " file; otherwise the server's certificate chain is incomplete or forged"
    )


def _tls_failure(
    chain: _Chain, proto: str, config: Config, exc: BaseException, first: bytes | bytearray
) -> None:
    """Explain a failed TLS handshake as precisely as the evidence allows."""
    name = f"{proto}.tls"
    host = config.imap_host if proto == "imap" else config.smtp_host
    error = _find_ssl_error(exc)
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        message = error.verify_message or str(error)
        if code == _X509_EXPIRED:
            chain.add(
                name,
                Status.FAIL,
                "the server's certificate has expired",
                detail=[message],
                hint="the server administrator must renew the certificate; if the clock of"
                " this machine is wrong, fix it",
            )
        elif code == _X509_NOT_YET_VALID:
            chain.add(
                name,
                Status.FAIL,
                "the server's certificate is not valid yet",
                detail=[message],
                hint="check this machine's clock and time zone",
            )
        elif code in (_X509_HOSTNAME_MISMATCH, _X509_IP_MISMATCH):
            chain.add(
                name,
                Status.FAIL,
                f"the server's certificate is not valid for the name {host!r}",
                detail=[message],
                hint=f"set {proto}_host to a name the certificate was issued for (the"
                " provider's documented host name, not an IP address or an alias)",
            )
        elif code in _UNTRUSTED_CODES:
            what = (
                "self-signed"
                if code in (_X509_SELF_SIGNED_LEAF, _X509_SELF_SIGNED_IN_CHAIN)
                else "issued by a CA this machine does not trust"
            )
            chain.add(
                name,
                Status.FAIL,
                f"the server's certificate is {what}",
                detail=[message],
                hint=_ca_hint(config),
            )
        else:
            chain.add(
                name,
                Status.FAIL,
                f"the server's certificate was rejected: {message}",
                hint=_ca_hint(config),
            )
        return
    reason = getattr(error, "reason", None) or ""
    if (first and not _looks_like_tls(first)) or reason in _NOT_TLS_REASONS:
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


# -- IMAP -------------------------------------------------------------------------------


def _imap_names(security: Security) -> list[str]:
    head = ["imap.dns", "imap.tcp"]
    if security is Security.TLS:
        head += ["imap.tls", "imap.greeting"]
    else:
        head += ["imap.greeting", "imap.tls"]
    return [*head, "imap.capabilities", "imap.login", "imap.folder", "imap.idle"]


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


_IMAP_NOTABLE: Final = (
    "IMAP4REV1",
    "IMAP4REV2",
    "IDLE",
    "UIDPLUS",
    "ESEARCH",
    "CONDSTORE",
    "LITERAL+",
    "ENABLE",
    "MOVE",
    "SASL-IR",
)


def _imap_capabilities(caps: frozenset[str]) -> str:
    notable = [c for c in _IMAP_NOTABLE if c in caps]
    auth = sorted(c.removeprefix("AUTH=") for c in caps if c.startswith("AUTH="))
    text = " ".join(notable) or "none of note"
    if auth:
        text += "; AUTH " + " ".join(auth)
    return f"{len(caps)} capabilities: {text}"


async def _list_folders(conn: IMAPConnection, timeouts: Timeouts) -> list[str] | None:
    """Selectable folder names from LIST, or None when they cannot be had."""
    if conn.broken:
        return None
    try:
        with trio.fail_after(timeouts.command):
            boxes = await conn.list_mailboxes()
    except (PrxmailError, trio.TooSlowError):
        return None
    return [decode_mailbox(box.raw_name) for box in boxes if box.selectable]


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


async def _imap_chain(config: Config, timeouts: Timeouts, chain: _Chain) -> None:
    host, port, security = config.imap_host, config.imap_port, config.imap_security
    opened = await _open_transport(
        chain, "imap", config, host=host, port=port, security=security, timeouts=timeouts
    )
    if opened is None:
        return
    raw, stream, context = opened
    conn: IMAPConnection | None = None
    try:
        conn = IMAPConnection(
            stream,
            encrypted=security is Security.TLS,
            allow_plaintext_login=security is Security.PLAIN,
        )
        if not await _imap_greeting(chain, conn, security, raw, timeouts):
            return
        if security is Security.STARTTLS:
            assert context is not None
            if not await _imap_starttls(chain, conn, config, context, timeouts):
                return
        elif security is Security.PLAIN:
            chain.add(
                "imap.tls",
                Status.WARN,
                "not encrypted: imap_security = 'plain' sends the password in clear text",
                hint="use imap_security = 'tls' (port 993) or 'starttls' (port 143)",
            )
        if not await _imap_capabilities_step(chain, conn, timeouts):
            return
        if not await _imap_login(chain, conn, config, timeouts):
            return
        if not await _imap_folder(chain, conn, config, timeouts):
            return
        if "IDLE" in conn.capabilities:
            chain.add("imap.idle", Status.PASS, "IDLE supported: new mail is seen at once")
        else:
            chain.add(
                "imap.idle",
                Status.WARN,
                "the server does not support IDLE: prxmail will poll for new mail every"
                f" {config.poll_interval_secs} s",
                hint="replies come up to one poll interval late; lower poll_interval_secs"
                " for quicker answers, or use a provider with IDLE",
            )
    finally:
        if conn is not None:
            with trio.move_on_after(timeouts.close):
                await conn.logout()
            await conn.aclose()
        else:
            await trio.aclose_forcefully(stream)


async def _imap_greeting(
    chain: _Chain,
    conn: IMAPConnection,
    security: Security,
    raw: _RecordingStream,
    timeouts: Timeouts,
) -> bool:
    try:
        with trio.fail_after(timeouts.greeting):
            greeting = await conn.read_greeting()
    except (trio.TooSlowError, PrxmailError) as exc:
        _greeting_failure(chain, "imap", security, raw, exc, timeouts=timeouts)
        return False
    text = _server_text(greeting.text) or "(no text)"
    if greeting.status == "PREAUTH":
        return chain.add(
            "imap.greeting",
            Status.WARN,
            f"PREAUTH: the server logged us in without a password ({text})",
            hint="unusual: the server trusts this connection; login is skipped",
        )
    return chain.add("imap.greeting", Status.PASS, f"* {greeting.status} {text}")


async def _imap_starttls(
    chain: _Chain,
    conn: IMAPConnection,
    config: Config,
    context: ssl.SSLContext,
    timeouts: Timeouts,
) -> bool:
    if conn.state is not IMAPState.NOT_AUTHENTICATED:
        return chain.add(
            "imap.tls",
            Status.FAIL,
            "the server pre-authenticated the session, so STARTTLS is impossible",
            hint="use implicit TLS: imap_security = 'tls' (usually port 993)",
        )
    try:
        with trio.fail_after(timeouts.command + timeouts.tls):
            await conn.starttls(context, server_hostname=config.imap_host)
    except trio.TooSlowError:
        return chain.add(
            "imap.tls",
            Status.FAIL,
            "STARTTLS did not complete in time",
            hint="check imap_port and imap_security",
        )
    except TLSError as exc:
        if _find_ssl_error(exc) is not None or isinstance(exc.__cause__, trio.BrokenResourceError):
            _tls_failure(chain, "imap", config, exc, b"")
            return False
        return chain.add(
            "imap.tls",
            Status.FAIL,
            _server_text(str(exc)),
            hint="the server offers no STARTTLS on this port: use implicit TLS,"
            " imap_security = 'tls' (usually port 993)",
        )
    except PrxmailError as exc:
        return chain.add("imap.tls", Status.FAIL, f"STARTTLS failed: {_server_text(str(exc))}")
    stream = conn.stream
    assert isinstance(stream, trio.SSLStream)
    status, summary = _cert_summary(stream, Security.STARTTLS)
    hint = "the certificate expires soon: the server administrator must renew it"
    return chain.add("imap.tls", status, summary, hint=hint if status is Status.WARN else "")


async def _imap_capabilities_step(chain: _Chain, conn: IMAPConnection, timeouts: Timeouts) -> bool:
    try:
        with trio.fail_after(timeouts.command):
            caps = conn.capabilities or await conn.capability()
    except (trio.TooSlowError, PrxmailError) as exc:
        return chain.add(
            "imap.capabilities",
            Status.FAIL,
            f"CAPABILITY failed: {_server_text(str(exc)) or type(exc).__name__}",
            hint="the server does not behave like an IMAP4rev1 server",
        )
    if "IMAP4REV1" not in caps and "IMAP4REV2" not in caps:
        return chain.add(
            "imap.capabilities",
            Status.WARN,
            _imap_capabilities(caps) + " (IMAP4rev1 not announced)",
            hint="the server may not support everything prxmail needs",
        )
    return chain.add("imap.capabilities", Status.PASS, _imap_capabilities(caps))


async def _imap_login(
    chain: _Chain, conn: IMAPConnection, config: Config, timeouts: Timeouts
) -> bool:
    if conn.state is not IMAPState.NOT_AUTHENTICATED:
        return chain.add("imap.login", Status.PASS, "already authenticated (PREAUTH)")
    try:
        with trio.fail_after(timeouts.command):
            await conn.login(config.username, config.password.reveal())
    except trio.TooSlowError:
        return chain.add(
            "imap.login",
            Status.FAIL,
            f"the server did not answer LOGIN within {timeouts.command:g} s",
            hint="the server is overloaded or hangs; try again later",
        )
    except AuthenticationError as exc:
        if exc.code == "LOGINDISABLED":
            return chain.add(
                "imap.login",
                Status.FAIL,
                "the server refuses LOGIN on an unencrypted connection (LOGINDISABLED)",
                hint="use imap_security = 'starttls' (port 143) or 'tls' (port 993)",
            )
        said = _server_text(exc.server_text)
        code = f"[{exc.code}] " if exc.code else ""
        return chain.add(
            "imap.login",
            Status.FAIL,
            f"authentication failed for {config.username}: {code}{said}".rstrip(": "),
            hint=_LOGIN_HINT,
        )
    except TLSError as exc:
        return chain.add(
            "imap.login",
            Status.FAIL,
            _server_text(str(exc)),
            hint="use imap_security = 'tls' or 'starttls'",
        )
    except PrxmailError as exc:
        return chain.add("imap.login", Status.FAIL, f"LOGIN failed: {_server_text(str(exc))}")
    if not conn.encrypted:
        return chain.add(
            "imap.login",
            Status.WARN,
            f"logged in as {config.username}, but the password went unencrypted",
            hint="use imap_security = 'tls' or 'starttls'",
        )
    return chain.add("imap.login", Status.PASS, f"logged in as {config.username}")


async def _imap_folder(
    chain: _Chain, conn: IMAPConnection, config: Config, timeouts: Timeouts
) -> bool:
    folder = config.imap_folder
    try:
        with trio.fail_after(timeouts.command):
            box = await conn.examine(folder)
    except trio.TooSlowError:
        return chain.add(
            "imap.folder",
            Status.FAIL,
            f"EXAMINE {folder!r} did not answer within {timeouts.command:g} s",
            hint="a very large folder or a slow server; try again",
        )
    except IMAPCommandError as exc:
        folders = await _list_folders(conn, timeouts)
        if folders is None:
            detail = ["the folder list could not be read"]
        elif folders:
            shown = sorted(folders, key=str.lower)[:MAX_FOLDERS_SHOWN]
            more = f" (and {len(folders) - len(shown)} more)" if len(folders) > len(shown) else ""
            detail = ["folders on the server: " + ", ".join(shown) + more]
        else:
            detail = ["the server lists no folders"]
        said = _server_text(exc.text)
        return chain.add(
            "imap.folder",
            Status.FAIL,
            f"folder {folder!r} cannot be opened: {said}" if said else f"no folder {folder!r}",
            detail=detail,
            hint="set imap_folder to an existing folder (names are case-sensitive, except"
            " INBOX; sub-folders use the server's separator, e.g. 'Archive/Bots')",
        )
    except PrxmailError as exc:
        return chain.add(
            "imap.folder", Status.FAIL, f"EXAMINE {folder!r} failed: {_server_text(str(exc))}"
        )
    unseen = "? unseen"
    try:
        with trio.fail_after(timeouts.command):
            unseen_uids = await conn.uid_search(Raw("UNSEEN"))
        unseen = f"{len(unseen_uids)} unseen"
    except (trio.TooSlowError, PrxmailError):
        if conn.broken:
            return chain.add(
                "imap.folder", Status.FAIL, f"searching {folder!r} for unseen mail failed"
            )
    validity = box.uidvalidity if box.uidvalidity is not None else "not reported"
    summary = f"{folder!r}: {box.exists} messages, {unseen}, UIDVALIDITY {validity}"
    if box.uidvalidity is None:
        # The service refuses such a folder: without UIDVALIDITY a re-created folder
        # cannot be told from the old one, so stored UIDs could skip or repeat mail.
        return chain.add(
            "imap.folder",
            Status.FAIL,
            summary,
            hint="the server does not report UIDVALIDITY, which prxmail needs to track"
            " mail safely; use another server or folder",
        )
    return chain.add("imap.folder", Status.PASS, summary)


# -- SMTP -------------------------------------------------------------------------------


def _smtp_names(security: Security) -> list[str]:
    if security is Security.TLS:
        head = ["smtp.dns", "smtp.tcp", "smtp.tls", "smtp.greeting"]
    else:
        head = ["smtp.dns", "smtp.tcp", "smtp.greeting", "smtp.tls"]
    return [*head, "smtp.ehlo", "smtp.auth"]


def _describe_extensions(ext: Extensions) -> str:
    parts = []
    if ext.size is not None:
        parts.append(f"SIZE {ext.size // (1024 * 1024)} MiB" if ext.size else "SIZE (no limit)")
    for flag, label in (
        (ext.pipelining, "PIPELINING"),
        (ext.eightbitmime, "8BITMIME"),
        (ext.smtputf8, "SMTPUTF8"),
        (ext.starttls, "STARTTLS"),
    ):
        if flag:
            parts.append(label)
    parts.append("AUTH " + " ".join(sorted(ext.auth)) if ext.auth else "no AUTH")
    return ", ".join(parts)


async def _smtp_chain(config: Config, timeouts: Timeouts, chain: _Chain) -> None:
    host, port, security = config.smtp_host, config.smtp_port, config.smtp_security
    opened = await _open_transport(
        chain, "smtp", config, host=host, port=port, security=security, timeouts=timeouts
    )
    if opened is None:
        return
    raw, stream, context = opened
    conn: SMTPConnection | None = None
    try:
        conn = SMTPConnection(stream, security=security, ssl_context=context, server_hostname=host)
        try:
            with trio.fail_after(timeouts.greeting):
                greeting = await conn.read_greeting()
        except (trio.TooSlowError, PrxmailError) as exc:
            _greeting_failure(chain, "smtp", security, raw, exc, timeouts=timeouts)
            return
        chain.add("smtp.greeting", Status.PASS, f"{greeting.code} {_server_text(greeting.text)}")
        if not await _smtp_ehlo(chain, conn, config, timeouts):
            return
        await _smtp_auth(chain, conn, config, timeouts)
    finally:
        if conn is not None:
            with trio.move_on_after(timeouts.close):
                await conn.aclose()
        await trio.aclose_forcefully(stream)


async def _smtp_ehlo(
    chain: _Chain, conn: SMTPConnection, config: Config, timeouts: Timeouts
) -> bool:
    try:
        with trio.fail_after(timeouts.command):
            ext = await conn.ehlo()
    except (trio.TooSlowError, PrxmailError) as exc:
        return chain.add(
            "smtp.ehlo",
            Status.FAIL,
            f"EHLO failed: {_server_text(str(exc)) or type(exc).__name__}",
            hint="the server does not behave like an SMTP submission server",
        )
    if config.smtp_security is Security.STARTTLS:
        try:
            with trio.fail_after(timeouts.command + timeouts.tls):
                await conn.starttls()
        except trio.TooSlowError:
            return chain.add(
                "smtp.tls",
                Status.FAIL,
                "STARTTLS did not complete in time",
                hint="check smtp_port and smtp_security",
            )
        except TLSError as exc:
            if _find_ssl_error(exc) is not None or isinstance(
                exc.__cause__, trio.BrokenResourceError
            ):
                _tls_failure(chain, "smtp", config, exc, b"")
                return False
            return chain.add(
                "smtp.tls",
                Status.FAIL,
                _server_text(str(exc)),
                hint="use implicit TLS: smtp_security = 'tls' (usually port 465)",
            )
        except PrxmailError as exc:
            return chain.add("smtp.tls", Status.FAIL, f"STARTTLS failed: {_server_text(str(exc))}")
        stream = conn.stream
        assert isinstance(stream, trio.SSLStream)
        status, summary = _cert_summary(stream, Security.STARTTLS)
        hint = "the certificate expires soon: the server administrator must renew it"
        chain.add("smtp.tls", status, summary, hint=hint if status is Status.WARN else "")
        ext = conn.extensions
    elif config.smtp_security is Security.PLAIN:
        chain.add(
            "smtp.tls",
            Status.WARN,
            "not encrypted: the SMTP password and every reply travel in clear text",
            hint="use smtp_security = 'tls' (port 465) or 'starttls' (port 587)",
        )
    return chain.add("smtp.ehlo", Status.PASS, _describe_extensions(ext))


async def _smtp_auth(
    chain: _Chain, conn: SMTPConnection, config: Config, timeouts: Timeouts
) -> bool:
    offered = conn.extensions.auth
    if not offered:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            "the server offers no AUTH here, so prxmail cannot log in",
            hint="use the provider's submission port (465 with TLS or 587 with STARTTLS),"
            " not port 25",
        )
    if not {"PLAIN", "LOGIN"} & offered:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            "the server offers no password mechanism prxmail supports (PLAIN or LOGIN);"
            " offered: " + " ".join(sorted(offered)),
            hint="the provider may require OAuth 2 for SMTP; prxmail needs password login",
        )
    try:
        with trio.fail_after(timeouts.command):
            await conn.login(config.smtp_username, config.smtp_password.reveal())
    except trio.TooSlowError:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            f"the server did not answer AUTH within {timeouts.command:g} s",
            hint="the server is overloaded or hangs; try again later",
        )
    except AuthenticationError as exc:
        said = _server_text(exc.server_text)
        code = f"{exc.code} " if exc.code else ""
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            f"authentication failed for {config.smtp_username}: {code}{said}".rstrip(": "),
            hint=_LOGIN_HINT
            + "; if SMTP uses other credentials, set smtp_username and smtp_password",
        )
    except SMTPReplyError as exc:
        return chain.add(
            "smtp.auth",
            Status.FAIL,
            f"AUTH failed temporarily: {exc.code} {_server_text(exc.text)}",
            hint="the server has a temporary problem; try again later",
        )
    except PrxmailError as exc:
        return chain.add("smtp.auth", Status.FAIL, f"AUTH failed: {_server_text(str(exc))}")
    return chain.add(
        "smtp.auth", Status.PASS, f"authenticated as {config.smtp_username} (no mail sent)"
    )


def _check_from_address(config: Config) -> StepResult:
    name = "smtp.from_address"
    sender_domain = config.from_address.rpartition("@")[2].lower()
    login = config.smtp_username
    if "@" not in login:
        return StepResult(
            name,
            Status.PASS,
            f"From: {config.from_address} (login {login!r} has no domain to compare)",
        )
    login_domain = login.rpartition("@")[2].lower()
    if config.from_address.lower() == login.lower():
        return StepResult(name, Status.PASS, f"From: {config.from_address} is the login itself")
    if sender_domain == login_domain:
        return StepResult(
            name, Status.PASS, f"From: {config.from_address} is in the login's domain"
        )
    return StepResult(
        name,
        Status.WARN,
        f"From: {config.from_address} is not in the login's domain ({login_domain})",
        hint="most providers refuse or rewrite a From address the account does not own"
        " (add it as an alias / 'send as' address), and receivers' SPF/DMARC checks may"
        " reject it; use the account's own address unless the alias is set up",
    )


# -- policy and state -------------------------------------------------------------------


def _check_policy(config: Config) -> StepResult:
    senders = config.allowed_senders
    if not senders:
        return StepResult(
            "policy",
            Status.WARN,
            "allowed_senders is empty: nobody will be answered",
            hint="list the addresses ('alice@example.com') or domains ('@example.com')"
            " the bot may answer",
        )
    if "*" in senders:
        return StepResult(
            "policy",
            Status.WARN,
            "allowed_senders contains '*': anyone can make the bot answer",
            hint="anyone who knows the address can make the bot send mail (and run the"
            " handler); list addresses or domains instead unless that is intended",
        )
    shown = ", ".join(senders[:5]) + (f" and {len(senders) - 5} more" if len(senders) > 5 else "")
    return StepResult("policy", Status.PASS, f"answers mail from {shown}")


def _check_state_dir(path: Path) -> StepResult:
    name = "state.dir"
    if path.exists():
        if not path.is_dir():
            return StepResult(
                name,
                Status.FAIL,
                f"state_dir {path} exists but is not a directory",
                hint="point state_dir at a directory (or remove the file)",
            )
        if not os.access(path, os.W_OK | os.X_OK):
            return StepResult(
                name,
                Status.FAIL,
                f"state_dir {path} is not writable by this user",
                hint="fix its owner/permissions, or point state_dir elsewhere",
            )
        return StepResult(name, Status.PASS, f"{path} is writable")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return StepResult(name, Status.PASS, f"{path} does not exist yet; it can be created")
    return StepResult(
        name,
        Status.FAIL,
        f"state_dir {path} does not exist and cannot be created ({parent} is not writable)",
        hint="create it with the right owner, or point state_dir at a writable place",
    )


def _check_state_db(config: Config) -> StepResult:
    name = "state.db"
    db = config.state_dir / DB_FILENAME
    if not db.is_file():
        return StepResult(name, Status.PASS, "no state database yet (created on first serve)")
    try:
        with StateStore(config.state_dir, read_only=True) as store:
            stats = store.statistics()
    except StateError as exc:
        text = str(exc)
        status = Status.WARN if "run prxmail serve once" in text else Status.FAIL
        return StepResult(
            name,
            status,
            f"the state database cannot be read: {text}",
            hint="" if status is Status.WARN else "restore it from a backup or move it aside",
        )
    account = account_key(config.username, config.imap_host, config.imap_port)
    mine = [m for m in stats.mailboxes if m.account == account]
    detail = [
        f"folder {m.folder!r}: last processed UID {m.last_uid} (UIDVALIDITY {m.uidvalidity})"
        for m in mine
    ]
    if not mine:
        detail.append(f"no folder of {account} recorded yet")
    summary = f"{stats.outbox_queued} replies waiting in the outbox"
    status = Status.PASS
    hint = ""
    if stats.outbox_failed:
        summary += f", {stats.outbox_failed} failed permanently"
        status = Status.WARN
        hint = "some replies could not be sent; the log of prxmail serve says why"
    folder_state = next((m for m in mine if m.folder == config.imap_folder), None)
    if folder_state is not None:
        summary += f"; last processed UID {folder_state.last_uid} in {config.imap_folder!r}"
    return StepResult(name, status, summary, tuple(detail), hint)


# -- running ----------------------------------------------------------------------------


def _config_step(config_path: Path, config: Config) -> StepResult:
    # The allowed_senders warnings belong to the policy step.
    warnings = [w for w in config.warnings if not w.startswith("allowed_senders")]
    detail = [*config.describe(), *(f"warning: {w}" for w in warnings)]
    if warnings:
        return StepResult(
            "config",
            Status.WARN,
            f"{config_path} loaded, with {len(warnings)} warning(s)",
            tuple(detail),
            hint="the usual pairs are IMAP 993 = tls, 143 = starttls; SMTP 465 = tls,"
            " 587 = starttls",
        )
    return StepResult("config", Status.PASS, f"{config_path} loaded", tuple(detail))


async def run_checks(config_path: Path, *, timeouts: Timeouts | None = None) -> DoctorReport:
    """Run every check and return the report (nothing is printed).

    Args:
        config_path: The configuration file.
        timeouts: Per-step limits; the module defaults when ``None``.

    Returns:
        The report; no exception escapes for problems the checks find.
    """
    limits = timeouts if timeouts is not None else Timeouts()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return DoctorReport(
            str(config_path),
            (
                StepResult(
                    "config",
                    Status.FAIL,
                    f"{config_path} cannot be used",
                    exc.problems,
                    hint="fix each key named above; nothing else was checked",
                ),
            ),
        )
    redact = _redactor(config)
    imap = _Chain(_imap_names(config.imap_security))
    smtp = _Chain(_smtp_names(config.smtp_security))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_guarded, _imap_chain, config, limits, imap)
        nursery.start_soon(_guarded, _smtp_chain, config, limits, smtp)
    steps = [
        _config_step(config_path, config),
        *imap.finish(),
        *smtp.finish(),
        _check_from_address(config),
        _check_policy(config),
        _check_state_dir(config.state_dir),
        _check_state_db(config),
    ]
    return DoctorReport(str(config_path), tuple(_redact_step(redact, s) for s in steps))


async def _guarded(
    chain_fn: Callable[[Config, Timeouts, _Chain], Awaitable[None]],
    config: Config,
    timeouts: Timeouts,
    chain: _Chain,
) -> None:
    """Run one chain within its time limit; a bug in a check or the limit becomes a FAIL
    of the step that was running, not a crash."""

    def fail_pending(summary: str, hint: str = "") -> None:
        done = {r.name for r in chain.results}
        pending = next((n for n in chain.names if n not in done), None)
        if pending is not None:
            chain.add(pending, Status.FAIL, summary, hint=hint)

    try:
        with trio.move_on_after(timeouts.chain) as scope:
            await chain_fn(config, timeouts, chain)
    except Exception as exc:  # a diagnostic tool must finish its report
        fail_pending(f"unexpected error: {type(exc).__name__}: {exc}")
        return
    if scope.cancelled_caught:
        fail_pending(
            f"the checks did not finish within {timeouts.chain:g} s",
            hint="the server answers very slowly; the service would time out as well",
        )


_MARKS: Final = {
    Status.PASS: "PASS",
    Status.WARN: "WARN",
    Status.FAIL: "FAIL",
    Status.SKIP: "SKIP",
}
_NAME_WIDTH: Final = 18
_INDENT: Final = " " * (5 + _NAME_WIDTH)


def render_text(report: DoctorReport) -> str:
    """The report as lines for a terminal: one per step, then details and fixes.

    Args:
        report: What :func:`run_checks` returned.

    Returns:
        The text, ending with a newline.
    """
    lines: list[str] = []
    for step in report.steps:
        lines.append(f"{_MARKS[step.status]} {step.name.ljust(_NAME_WIDTH - 1)} {step.summary}")
        lines.extend(f"{_INDENT}{line}" for line in step.detail)
        if step.hint and step.status in (Status.WARN, Status.FAIL):
            lines.append(f"{_INDENT}fix: {step.hint}")
    failed = [s.name for s in report.steps if s.status is Status.FAIL]
    warned = sum(1 for s in report.steps if s.status is Status.WARN)
    if failed:
        lines.append(f"BLOCKED: {len(failed)} step(s) failed: {', '.join(failed)}")
    else:
        note = f" ({warned} warning(s))" if warned else ""
        lines.append(f"OK: nothing blocks the channel{note}")
    return "\n".join(lines) + "\n"


def run_doctor(config_path: Path, *, as_json: bool, out: TextIO) -> int:
    """Run the checks and print one line per step.

    Args:
        config_path: The configuration file to check.
        as_json: Print one JSON document (``ok``, ``config``, ``steps``) instead of lines.
        out: Where to print.

    Returns:
        0 when nothing blocks the channel, 1 otherwise.
    """
    report = trio.run(run_checks, config_path)
    if as_json:
        print(json.dumps(report.to_json(), indent=2), file=out)
    else:
        out.write(render_text(report))
    return report.exit_status
