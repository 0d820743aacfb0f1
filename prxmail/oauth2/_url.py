"""The one rule for OAuth 2 endpoint URLs, kept free of heavy imports for the config."""

from __future__ import annotations

import urllib.parse

from prxmail.errors import ConfigError

__all__ = ["LOOPBACK_HOSTS", "check_endpoint_url"]

# Plain http is allowed only to these: tokens and secrets travel in the request body,
# so they must never cross a network unencrypted; the tests' and `prxmail auth`'s
# local servers are the only legitimate plain-http endpoints.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def check_endpoint_url(url: str, *, key: str = "oauth2_token_url") -> None:
    """Check that ``url`` is an https URL, or http to a loopback host.

    Args:
        url: The endpoint.
        key: The configuration key named in the error.

    Raises:
        ConfigError: any other scheme, no host, or plain http to a non-loopback host.
    """
    parts = urllib.parse.urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and host in LOOPBACK_HOSTS:
        return
    raise ConfigError(
        [
            f"expected an https:// URL (plain http only for 127.0.0.1, localhost or ::1), "
            f"got {url!r} @ {key}"
        ]
    )
