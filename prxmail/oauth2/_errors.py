"""The errors of the OAuth 2 pieces, as part of prxmail's one exception tree.

Both derive from :class:`~prxmail.errors.AuthenticationError` (``protocol="oauth2"``):
to the IMAP watcher and the SMTP sender "no usable token" is a failed login like a
refused password -- logged loudly, retried slowly -- and code that already handles
``AuthenticationError`` needs nothing new. ``transient`` says whether retrying the same
request later can help (endpoint unreachable, 5xx) or whether a person must act first
(``invalid_grant``: run ``prxmail auth``). Messages never contain a token or a secret.
"""

from __future__ import annotations

from prxmail.errors import AuthenticationError

__all__ = ["OAuth2Error", "TokenCommandError", "TokenEndpointError"]


class OAuth2Error(AuthenticationError):
    """No access token could be obtained, or a token was refused twice.

    Attributes:
        hint: What the user should do about it (already part of the message).
        transient: True when the same request may succeed later without any change.
    """

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        transient: bool = False,
        server_text: str = "",
        code: str | None = None,
    ) -> None:
        self.hint = hint
        self.transient = transient
        full = f"{message}; {hint}" if hint else message
        super().__init__(full, protocol="oauth2", server_text=server_text, code=code)


class TokenEndpointError(OAuth2Error):
    """The token endpoint refused the request, could not be reached, or answered nonsense.

    Attributes:
        error: The RFC 6749 §5.2 ``error`` code (``"invalid_grant"``...), or ``None``
            when the endpoint sent none (unreachable, non-JSON, no access token).
        status: The HTTP status, or ``None`` when no response came.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        status: int | None = None,
        hint: str = "",
        transient: bool = False,
        server_text: str = "",
    ) -> None:
        self.error = error
        self.status = status
        super().__init__(
            message, hint=hint, transient=transient, server_text=server_text, code=error
        )


class TokenCommandError(OAuth2Error):
    """``oauth2_token_command`` could not be run, failed, or printed no usable token."""
