"""One classification of connection failures, shared by ``prxmail doctor`` and serve.

Theory of operation: the doctor opens connections step by step and knows which step
failed; the channel only sees the exception a connect raised. Everything that can be
told from the exception alone -- the connect errno, a failed name lookup, a rejected
certificate, plain text on a TLS port and the reverse, refused credentials -- is
named here once, so a serve log line carries the same summary and fix hint the doctor
prints for the same configuration. The exception chain is walked (``__cause__``,
``__context__`` and the first member of exception groups, which is how the clients and
``trio.open_tcp_stream`` wrap the original error).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from typing import Final

import attrs

from prxmail._tls import Security
from prxmail.config import AuthMethod, Config
from prxmail.errors import AuthenticationError, RemoteProtocolError

# How many links of an exception chain are followed: the clients wrap at most a few
# times; the bound only protects against a cycle built by hand.
_MAX_CHAIN: Final = 10

# OpenSSL verify codes (x509_vfy.h) for the certificate problems named to the user.
X509_NOT_YET_VALID: Final = 9
X509_EXPIRED: Final = 10
X509_SELF_SIGNED_LEAF: Final = 18
X509_SELF_SIGNED_IN_CHAIN: Final = 19
X509_NO_LOCAL_ISSUER: Final = 20
X509_UNVERIFIABLE_LEAF: Final = 21
X509_UNTRUSTED: Final = 27
X509_HOSTNAME_MISMATCH: Final = 62
X509_IP_MISMATCH: Final = 64
UNTRUSTED_CODES: Final = frozenset(
    {
        2,  # unable to get issuer certificate
        X509_SELF_SIGNED_LEAF,
        X509_SELF_SIGNED_IN_CHAIN,
        X509_NO_LOCAL_ISSUER,
        X509_UNVERIFIABLE_LEAF,
        X509_UNTRUSTED,
    }
)
# OpenSSL reasons when the peer's bytes are not TLS records at all.
NOT_TLS_REASONS: Final = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "PACKET_LENGTH_TOO_LONG",
        "RECORD_LAYER_FAILURE",
        "HTTP_REQUEST",
        "UNKNOWN_PROTOCOL",
        "UNEXPECTED_RECORD",
    }
)
# The connect() errnos :func:`connect_error` names; any other OSError is not taken
# for a connect failure when found in a chain.
_CONNECT_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.EACCES,
        errno.EPERM,
    }
)


@attrs.frozen
class Diagnosis:
    """What went wrong and what to do about it.

    Attributes:
        summary: One line naming the failure.
        hint: What to check or change.
        detail: Extra lines the doctor shows under the summary (the raw error).
    """

    summary: str
    hint: str
    detail: tuple[str, ...] = ()


def looks_like_tls(data: bytes | bytearray) -> bool:
    """Whether ``data`` starts like a TLS record.

    Args:
        data: The first bytes a server sent.

    Returns:
        True for a content type 20..23 followed by major version 3.
    """
    return len(data) >= 2 and data[0] in (20, 21, 22, 23) and data[1] == 3


def port_advice(proto: str, want: Security) -> str:
    """The hint for a TLS / STARTTLS port mix-up.

    Args:
        proto: ``"imap"`` or ``"smtp"``.
        want: What the port seems to expect: ``STARTTLS`` (it spoke plain text) or
            ``TLS`` (it spoke TLS).

    Returns:
        The setting to change and the usual ports.
    """
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


def ca_hint(config: Config) -> str:
    """The hint for a certificate this machine does not trust.

    Args:
        config: The account's configuration (its ``tls_ca_file``).

    Returns:
        Which CA file to set or fix.
    """
    if config.tls_ca_file is not None:
        return (
            f"tls_ca_file = '{config.tls_ca_file}' does not contain the CA that signed the"
            " server's certificate: point it at that CA's PEM file"
        )
    return (
        "if the server uses a private or self-signed CA, set tls_ca_file to that CA's PEM"
        " file; otherwise the server's certificate chain is incomplete or forged"
    )


def connect_error(host: str, port: int, proto: str, exc: OSError) -> Diagnosis:
    """Summary and hint for a failed ``connect()``.

    Args:
        host, port: Where the connection went.
        proto: ``"imap"`` or ``"smtp"`` (names the settings in the hint).
        exc: What ``connect()`` raised.

    Returns:
        The diagnosis, by errno.
    """
    where = f"{host}:{port}"
    key = f"{proto}_port"
    code = exc.errno
    if code == errno.ECONNREFUSED:
        usual = "993 (TLS) or 143 (STARTTLS)" if proto == "imap" else "465 (TLS) or 587 (STARTTLS)"
        return Diagnosis(
            f"connection to {where} refused: nothing listens on that port",
            f"check {key} (usually {usual}) and {proto}_host; is the server running?",
        )
    if code == errno.ENETUNREACH:
        return Diagnosis(
            f"network unreachable for {where}",
            "this machine has no route to that network (no connection, or an IPv6"
            " address without IPv6 connectivity)",
        )
    if code == errno.EHOSTUNREACH:
        return Diagnosis(
            f"no route to host {where}",
            "the host is down or a firewall rejects the connection; check"
            f" {proto}_host and the network",
        )
    if code == errno.ETIMEDOUT:
        return Diagnosis(
            f"connection to {where} timed out",
            "a firewall drops the packets or the host is down; check the host, the port,"
            " and whether outgoing connections to that port are allowed",
        )
    if code in (errno.EACCES, errno.EPERM):
        return Diagnosis(
            f"connection to {where} not permitted by this machine",
            "a local firewall or security policy blocks outgoing connections to it",
        )
    return Diagnosis(
        f"cannot connect to {where}: {exc.strerror or exc}", f"check {proto}_host and {key}"
    )


def dns_error(host: str, proto: str, exc: socket.gaierror | UnicodeError) -> Diagnosis:
    """Summary and hint for a failed name lookup.

    Args:
        host: The name looked up.
        proto: ``"imap"`` or ``"smtp"``.
        exc: What ``getaddrinfo`` raised (``UnicodeError`` for a name IDNA rejects).

    Returns:
        The diagnosis: a temporary DNS failure or a name that does not exist.
    """
    code = exc.args[0] if isinstance(exc, socket.gaierror) and exc.args else None
    if code in (socket.EAI_AGAIN, getattr(socket, "EAI_FAIL", None)):
        return Diagnosis(
            f"looking up {host} failed temporarily ({exc})",
            "the DNS server cannot be reached or failed: check the network connection and"
            " try again",
        )
    return Diagnosis(
        f"{host} does not resolve: no such host",
        f"check the spelling of {proto}_host (e.g. imap.gmail.com, smtp.gmail.com)",
        detail=(str(exc),),
    )


def certificate_error(
    proto: str, host: str, config: Config, error: ssl.SSLCertVerificationError
) -> Diagnosis:
    """Summary and hint for a certificate the handshake rejected.

    Args:
        proto: ``"imap"`` or ``"smtp"``.
        host: The name the certificate was checked against.
        config: The account's configuration (for the CA hint).
        error: The verification error.

    Returns:
        The diagnosis, by OpenSSL verify code.
    """
    code = error.verify_code
    message = error.verify_message or str(error)
    if code == X509_EXPIRED:
        return Diagnosis(
            "the server's certificate has expired",
            "the server administrator must renew the certificate; if the clock of"
            " this machine is wrong, fix it",
            detail=(message,),
        )
    if code == X509_NOT_YET_VALID:
        return Diagnosis(
            "the server's certificate is not valid yet",
            "check this machine's clock and time zone",
            detail=(message,),
        )
    if code in (X509_HOSTNAME_MISMATCH, X509_IP_MISMATCH):
        return Diagnosis(
            f"the server's certificate is not valid for the name {host!r}",
            f"set {proto}_host to a name the certificate was issued for (the"
            " provider's documented host name, not an IP address or an alias)",
            detail=(message,),
        )
    if code in UNTRUSTED_CODES:
        what = (
            "self-signed"
            if code in (X509_SELF_SIGNED_LEAF, X509_SELF_SIGNED_IN_CHAIN)
            else "issued by a CA this machine does not trust"
        )
        return Diagnosis(f"the server's certificate is {what}", ca_hint(config), detail=(message,))
    return Diagnosis(f"the server's certificate was rejected: {message}", ca_hint(config))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    current: BaseException | None = exc
    seen = 0
    while current is not None and seen < _MAX_CHAIN:
        yield current
        while isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
            yield current
        current = current.__cause__ or current.__context__
        seen += 1


def diagnose(
    exc: BaseException, *, proto: str, host: str, port: int, config: Config
) -> Diagnosis | None:
    """Name a connection failure from the exception alone, as the doctor would.

    Args:
        exc: What connecting (or a session) raised.
        proto: ``"imap"`` or ``"smtp"``.
        host, port: Where the connection went.
        config: The account's configuration (security, CA file, auth method).

    Returns:
        The diagnosis, or ``None`` when the exception does not show the cause (a
        connection lost mid-session, a timeout, a protocol error).
    """
    security = config.imap_security if proto == "imap" else config.smtp_security
    for link in _chain(exc):
        if isinstance(link, AuthenticationError):
            method = config.auth if proto == "imap" else config.smtp_auth
            if method is AuthMethod.PASSWORD:
                user_key = "username" if proto == "imap" else "smtp_username"
                return Diagnosis(
                    "the server refused the login",
                    f"check {user_key} and the password",
                )
            return Diagnosis(
                "the server refused the OAuth 2 login",
                "check the OAuth 2 settings; run 'prxmail auth' if the grant was revoked",
            )
        if isinstance(link, ssl.SSLCertVerificationError):
            return certificate_error(proto, host, config, link)
        if isinstance(link, ssl.SSLError):
            if (getattr(link, "reason", None) or "") in NOT_TLS_REASONS:
                return Diagnosis(
                    "the server answered in plain text, not TLS",
                    port_advice(proto, Security.STARTTLS),
                )
            continue
        if isinstance(link, socket.gaierror):
            return dns_error(host, proto, link)
        if isinstance(link, OSError) and link.errno in _CONNECT_ERRNOS:
            return connect_error(host, port, proto, link)
        if (
            isinstance(link, RemoteProtocolError)
            and security is not Security.TLS
            and looks_like_tls(link.excerpt)
        ):
            return Diagnosis(
                "the server answered with TLS, not a plain-text greeting",
                port_advice(proto, Security.TLS),
            )
    return None
