"""TLS settings shared by the IMAP and SMTP clients."""

from __future__ import annotations

import enum
import ssl
from pathlib import Path

__all__ = ["Security", "create_ssl_context"]


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
