"""Keeping secrets out of everything prxmail shows: errors, logs and doctor output.

A server may echo what we sent -- the password in a LOGIN line, the base64 of a SASL
exchange -- back in its error text, and that text ends up in exceptions, log lines and
``prxmail doctor``. Every such text goes through one :class:`Redactor`, built from the
secrets as they went on the wire: for each secret its plain form, its IMAP quoted-string
form and its base64 forms (padded and unpadded). SASL payloads (``\\0user\\0password``)
are passed as secrets of their own so that their base64 is covered too. Matching ignores
case, because some servers upper-case what they echo.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:  # only for the annotation: config must stay importable without us
    from prxmail.config import Config

__all__ = [
    "REDACTED",
    "SHORT_SECRET",
    "WITHHELD",
    "Redactor",
    "Secret",
    "config_secrets",
    "credential_secrets",
    "secret_forms",
]

REDACTED = "***"
WITHHELD = "(server text withheld: it contains the credentials)"

# A secret shorter than this cannot be cut out of a text without also cutting ordinary
# words (a two-letter password occurs everywhere); a text containing one is withheld whole.
SHORT_SECRET = 4


@attrs.frozen(repr=False)
class Secret:
    """A secret string that never shows itself in ``repr``, ``str`` or f-strings.

    The one secret type of prxmail: passwords from the configuration, OAuth 2 client
    secrets, refresh and access tokens. It lives here, beside the redaction it serves,
    because this module imports nothing of prxmail: the configuration and the OAuth 2
    package both use it without importing each other.
    """

    _value: str

    def reveal(self) -> str:
        """Return the secret value. Call it only where the value goes on the wire."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


def secret_forms(secret: str | bytes) -> set[str]:
    """Every form in which ``secret`` may travel on the wire and come back in a text.

    Args:
        secret: A password, token or SASL payload.

    Returns:
        The plain text, the IMAP quoted-string escaping, and base64 with and without
        padding; empty forms left out.
    """
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not raw:
        return set()
    text = raw.decode("utf-8", "replace")
    encoded = base64.b64encode(raw).decode("ascii")
    forms = {text, text.replace("\\", "\\\\").replace('"', '\\"'), encoded, encoded.rstrip("=")}
    return {form for form in forms if form}


def credential_secrets(credentials: Iterable[tuple[str, str]]) -> list[str | bytes]:
    """The secrets to redact for some logins: each password and its SASL PLAIN payloads.

    Args:
        credentials: ``(username, password)`` pairs; empty passwords are skipped.

    Returns:
        For each password: the password itself and the PLAIN payloads
        ``\\0user\\0password`` and ``user\\0user\\0password`` (with and without an
        authzid), so that their base64 is cut out of server echoes too.
    """
    secrets: list[str | bytes] = []
    for user, password in credentials:
        if not password:
            continue
        raw, user_b = password.encode("utf-8"), user.encode("utf-8")
        secrets += [password, b"\0" + user_b + b"\0" + raw, user_b + b"\0" + user_b + b"\0" + raw]
    return secrets


def config_secrets(config: Config) -> list[str | bytes]:
    """Every secret a configuration holds, in the forms :class:`Redactor` takes.

    Args:
        config: The validated configuration; its passwords came from the file, the
            environment or a password file -- by now they are all the same ``Secret``.

    Returns:
        The IMAP and SMTP passwords and their SASL PLAIN payloads, the OAuth 2 client
        secret and the configured refresh token. (Access tokens and rotated refresh
        tokens exist only at run time; the connections and the token source redact
        them where they are used.)
    """
    pairs = set()
    if config.password is not None:
        pairs.add((config.username, config.password.reveal()))
    if config.smtp_password is not None:
        pairs.add((config.smtp_username, config.smtp_password.reveal()))
    secrets = credential_secrets(pairs)
    oauth2 = config.oauth2
    if oauth2 is not None:
        for secret in (oauth2.client_secret, oauth2.refresh_token):
            if secret is not None:
                secrets.append(secret.reveal())
    return secrets


class Redactor:
    """Removes every form of the given secrets from texts.

    Args:
        secrets: Passwords, tokens and SASL payloads (str or bytes); empty ones ignored.
    """

    def __init__(self, secrets: Iterable[str | bytes]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            forms |= secret_forms(secret)
        short = sorted(f for f in forms if len(f) < SHORT_SECRET)
        long = sorted((f for f in forms if len(f) >= SHORT_SECRET), key=len, reverse=True)
        self._short = re.compile("|".join(map(re.escape, short)), re.I) if short else None
        self._long = re.compile("|".join(map(re.escape, long)), re.I) if long else None

    def __call__(self, text: str) -> str:
        """Return ``text`` with every secret form replaced by ``***``.

        A text that contains a secret too short to cut out cleanly is replaced whole by
        a note saying it was withheld.
        """
        if self._short is not None and self._short.search(text):
            return WITHHELD
        if self._long is not None:
            text = self._long.sub(REDACTED, text)
        return text
