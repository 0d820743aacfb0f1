"""TLS settings and transport-error translation shared by the IMAP and SMTP clients."""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from prxmail.errors import ConnectionBrokenError, map_exceptions

__all__ = [
    "Security",
    "create_ssl_context",
    "describe_transport_error",
    "shared_ssl_context",
    "transport_errors",
]

# How many distinct CA files keep a shared context. Each context holds the whole system
# trust store (about 0.8 MB measured), so sharing one per CA file is what keeps memory
# per watched account small; a process rarely talks to servers under more than a
# handful of private CAs.
SHARED_CONTEXTS = 16


class Security(enum.Enum):
    """How a connection is protected.

    ``TLS`` is implicit TLS from the first byte (IMAP 993, SMTP 465); ``STARTTLS``
    connects in plain text and upgrades before anything else is sent -- required, never
    opportunistic: if the server does not offer it or the handshake fails, the client
    refuses to go on. ``PLAIN`` sends everything, credentials included, unencrypted and
    is only ever used when chosen explicitly.
    """

    TLS = "tls"
    STARTTLS = "starttls"
    PLAIN = "plain"


def create_ssl_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """Build a client context that verifies certificates and host names.

    Args:
        ca_file: PEM file of extra trusted CAs (a private CA for a self-hosted
            server). When ``None``, the system trust store is used, which honours the
            ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` environment variables.

    Returns:
        A context with ``CERT_REQUIRED`` and ``check_hostname`` on, TLS 1.2 or newer.

    Raises:
        FileNotFoundError, ssl.SSLError: the CA file is missing or not valid PEM.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@functools.lru_cache(maxsize=SHARED_CONTEXTS)
def _cached_context(ca_file: str | None, mtime_ns: int, size: int) -> ssl.SSLContext:
    return create_ssl_context(ca_file)


def shared_ssl_context(ca_file: Path | str | None = None) -> ssl.SSLContext:
    """Like :func:`create_ssl_context`, but one context per CA file for the process.

    Loading a trust store costs memory and CPU on every call; a client that reconnects,
    or a process that watches many mailboxes, should not pay that each time. The
    context is built anew when the CA file changes (size or modification time). Do not
    modify the returned context: it is shared.

    Args:
        ca_file: PEM file of extra trusted CAs, or ``None`` for the system store (read
            once per process, including ``SSL_CERT_FILE``/``SSL_CERT_DIR``).

    Raises:
        FileNotFoundError, ssl.SSLError: the CA file is missing or not valid PEM.
    """
    if ca_file is None:
        return _cached_context(None, 0, 0)
    stat = os.stat(ca_file)
    return _cached_context(str(ca_file), stat.st_mtime_ns, stat.st_size)


def describe_transport_error(exc: BaseException) -> str:
    """A readable reason for a transport failure (trio's own messages are often empty).

    Args:
        exc: What the transport raised.

    Returns:
        One line naming the underlying cause where there is one.
    """
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):  # trio.open_tcp_stream: one per address
        cause = cause.exceptions[0]
        while isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
    if isinstance(cause, ssl.SSLEOFError):
        return "the server closed the connection (without ending TLS cleanly)"
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return str(exc) or type(exc).__name__


def transport_errors(
    what: str, failures: Sequence[type[BaseException]]
) -> contextlib.AbstractContextManager[None]:
    """The block in which a client talks to its transport: each of ``failures`` leaves
    it as :class:`ConnectionBrokenError` (``what``: reason), the original as cause.

    The clients pass trio's stream errors and ``OSError``; they are not named here so
    that this module (which the configuration imports) does not load trio.

    Args:
        what: What was being done, e.g. ``"sending to the server failed"``.
        failures: The exception types that mean the transport failed.

    Returns:
        A context manager (see :func:`prxmail.errors.map_exceptions`).
    """
    return map_exceptions(
        {
            tuple(failures): lambda exc: ConnectionBrokenError(
                f"{what}: {describe_transport_error(exc)}"
            )
        }
    )
