"""SASL messages for OAuth 2 bearer tokens: XOAUTH2 and OAUTHBEARER (RFC 7628).

Pure functions, no I/O: the IMAP and SMTP connections put the bytes returned here
(base64-encoded) on the wire and pass a server's error challenge back to
:func:`decode_error_challenge`.

* XOAUTH2 (Google's, also Microsoft's and Dovecot's):
  ``user=<user>^Aauth=Bearer <token>^A^A``.
* OAUTHBEARER (RFC 7628 §3.1): a GS2 header ``n,a=<user>,`` then
  ``^Ahost=<host>^Aport=<port>^Aauth=Bearer <token>^A^A``; in the user name ``=`` and
  ``,`` are escaped as ``=3D`` and ``=2C`` (RFC 5801 saslname).

A refused token makes the server send one more challenge: base64 of a JSON object
with ``status`` (``"401"`` / ``"invalid_token"``, ``"insufficient_scope"``...) and
optionally ``schemes`` and ``scope`` (RFC 7628 §3.2.2). The client answers with
:data:`ERROR_ACKNOWLEDGEMENT` (XOAUTH2: an empty response; OAUTHBEARER: ``^A``) and the
server then finishes with NO / 535.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable

import attrs

from prxmail._redact import Redactor
from prxmail.errors import LocalProtocolError

__all__ = [
    "ERROR_ACKNOWLEDGEMENT",
    "MAX_CHALLENGE_BYTES",
    "ErrorChallenge",
    "decode_error_challenge",
    "oauthbearer_initial_response",
    "preferred_mechanism",
    "xoauth2_initial_response",
]

# The client's answer to an error challenge, per mechanism (RFC 7628 §3.2.3 for
# OAUTHBEARER: a single %x01; Google's XOAUTH2 documentation: an empty response).
ERROR_ACKNOWLEDGEMENT = {"XOAUTH2": b"", "OAUTHBEARER": b"\x01"}
# An error challenge is a small JSON object (well under 1 KB from Google, Microsoft and
# Dovecot); a longer one is not decoded, so a hostile server cannot make our errors big.
MAX_CHALLENGE_BYTES = 4096
# Longest value of one challenge field shown in a message.
MAX_FIELD_CHARS = 200

_STATUS_HINTS = {
    "401": "the token is invalid, expired or revoked, or was issued for another user",
    "invalid_token": "the token is invalid, expired or revoked, or was issued for another user",
    "400": "the server found the request malformed",
    "invalid_request": "the server found the request malformed",
    "403": "the token lacks a scope the server needs",
    "insufficient_scope": "the token lacks a scope the server needs",
}


def _check(value: str, what: str, *, forbid: str) -> None:
    if any(c in value for c in forbid) or not value.isprintable():
        raise LocalProtocolError(f"the {what} contains characters SASL cannot carry")


def xoauth2_initial_response(username: str, token: str) -> bytes:
    """The XOAUTH2 initial client response (before base64).

    Args:
        username: The mailbox address.
        token: The access token.

    Returns:
        ``user=...\\x01auth=Bearer ...\\x01\\x01``.

    Raises:
        LocalProtocolError: a control character (``\\x01``, CR, LF...) in either.
    """
    _check(username, "user name", forbid="\x01")
    _check(token, "access token", forbid="\x01 ")
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def _saslname(username: str) -> str:
    return username.replace("=", "=3D").replace(",", "=2C")


def oauthbearer_initial_response(
    username: str, token: str, *, host: str | None = None, port: int | None = None
) -> bytes:
    """The OAUTHBEARER initial client response of RFC 7628 §3.1 (before base64).

    Args:
        username: The mailbox address (the GS2 authzid).
        token: The access token.
        host: The server's host name, sent as ``host=`` when given.
        port: The server's port, sent as ``port=`` when given.

    Returns:
        ``n,a=<user>,\\x01host=...\\x01port=...\\x01auth=Bearer ...\\x01\\x01``.

    Raises:
        LocalProtocolError: a control character in the user name, token or host.
    """
    _check(username, "user name", forbid="\x01")
    _check(token, "access token", forbid="\x01 ")
    parts = [f"n,a={_saslname(username)},"]
    if host is not None:
        _check(host, "host name", forbid="\x01")
        parts.append(f"host={host}")
    if port is not None:
        parts.append(f"port={int(port)}")
    parts.append(f"auth=Bearer {token}")
    return ("\x01".join(parts) + "\x01\x01").encode()


def preferred_mechanism(offered: Iterable[str]) -> str | None:
    """Pick the OAuth 2 mechanism to use among the server's SASL mechanisms.

    OAUTHBEARER is the standard (RFC 7628) and preferred; XOAUTH2 otherwise.

    Args:
        offered: Mechanism names (IMAP ``AUTH=`` capabilities without the prefix, or
            the SMTP EHLO ``AUTH`` list); case does not matter.

    Returns:
        ``"OAUTHBEARER"``, ``"XOAUTH2"`` or ``None`` when neither is offered.
    """
    names = {m.upper() for m in offered}
    for mechanism in ("OAUTHBEARER", "XOAUTH2"):
        if mechanism in names:
            return mechanism
    return None


@attrs.frozen
class ErrorChallenge:
    """A decoded RFC 7628 §3.2.2 error challenge.

    Attributes:
        status: The ``status`` member (``"401"``, ``"invalid_token"``...), or ``None``.
        schemes: The ``schemes`` member (``"bearer"``), or ``None``.
        scope: The ``scope`` member: scopes the server needs, or ``None``.
        message: A readable sentence with the fields and what they mean.
    """

    status: str | None
    schemes: str | None
    scope: str | None
    message: str


def _field(obj: dict[str, object], name: str, redact: Redactor) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    text = " ".join(redact(str(value)).split())
    return text[:MAX_FIELD_CHARS]


def decode_error_challenge(
    challenge: bytes | str, secrets: Iterable[str | bytes] = ()
) -> ErrorChallenge:
    """Decode a server's base64 JSON error challenge into a readable message.

    Never raises on bad input: a challenge that is not base64 JSON is described as such.

    Args:
        challenge: The challenge as sent (base64 text, without ``+ `` / ``334 ``).
        secrets: Tokens and the like to keep out of the message (the token sent).

    Returns:
        The decoded fields and a message such as ``"the server refused the token
        (status 401, schemes bearer, needs scope https://mail.google.com/): the token
        is invalid, expired or revoked, or was issued for another user"``.
    """
    redact = Redactor(secrets)
    raw = challenge.encode("ascii", "replace") if isinstance(challenge, str) else challenge
    raw = raw.strip()
    obj: object = None
    if len(raw) <= MAX_CHALLENGE_BYTES * 4 // 3 + 4:
        try:
            obj = json.loads(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            obj = None
    if not isinstance(obj, dict):
        return ErrorChallenge(
            None, None, None, "the server refused the token (its error challenge was unreadable)"
        )
    status = _field(obj, "status", redact)
    schemes = _field(obj, "schemes", redact)
    scope = _field(obj, "scope", redact)
    details = []
    if status:
        details.append(f"status {status}")
    if schemes:
        details.append(f"schemes {schemes}")
    if scope:
        details.append(f"needs scope {scope}")
    shown = f" ({', '.join(details)})" if details else ""
    hint = _STATUS_HINTS.get(status or "", "")
    message = f"the server refused the token{shown}" + (f": {hint}" if hint else "")
    return ErrorChallenge(status, schemes, scope, message)
