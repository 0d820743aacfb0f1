"""Logging an account in: one place that knows password versus OAuth 2, for every caller.

Theory of operation: an :class:`AccountLogin` is built once per account from the
configuration. With ``auth`` or ``smtp_auth`` set to ``"oauth2"`` it holds the
account's one token source (:mod:`prxmail.oauth2`), which the IMAP watcher, the SMTP
sender and doctor share, so a token fetched by one is used by all and a refresh is
one request. :meth:`AccountLogin.imap` and :meth:`AccountLogin.smtp` log a fresh
connection in: with a password as the server prefers it; with OAuth 2 through
:func:`prxmail.oauth2.authenticate_with`, which refreshes the token once when a server
refuses it. Every new connection asks the source for a token, so a connection opened
after the token expired (the sender reconnecting, the watcher after a drop) logs in
with a fresh one. IMAP ID (RFC 2971) follows an IMAP login unless ``imap_id = false``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prxmail._log import log_event
from prxmail.config import AuthMethod, Config, OAuth2Grant
from prxmail.errors import CommandRefusedError
from prxmail.imap import IMAPConnection
from prxmail.smtp import SMTPConnection

if TYPE_CHECKING:
    from prxmail.oauth2 import AccessToken, Grant, TokenSource

__all__ = ["AccountLogin", "build_token_source"]


def build_token_source(
    config: Config, ssl_context: ssl.SSLContext, *, state_dir: Path | None = None
) -> TokenSource | None:
    """The account's token source, or ``None`` when neither protocol uses OAuth 2.

    Args:
        config: The validated configuration.
        ssl_context: Verifies the token endpoint (``tls_ca_file`` or the system store).
        state_dir: Where a rotated refresh token that came from the configuration is
            kept; ``config.state_dir`` by default.

    Returns:
        An :class:`~prxmail.oauth2.EndpointTokenSource` or
        :class:`~prxmail.oauth2.CommandTokenSource`.
    """
    settings = config.oauth2
    if settings is None:
        return None
    # The token sources (and the token endpoint's HTTP client after them) are loaded
    # only for an account that uses OAuth 2: a password login never imports them.
    from prxmail.oauth2._token import CommandTokenSource, EndpointTokenSource  # noqa: PLC0415

    if settings.token_command is not None:
        return CommandTokenSource(settings.token_command)
    assert settings.token_url is not None
    assert settings.client_id is not None
    grant: Grant = (
        "client_credentials"
        if settings.grant is OAuth2Grant.CLIENT_CREDENTIALS
        else "refresh_token"
    )
    return EndpointTokenSource(
        token_url=settings.token_url,
        client_id=settings.client_id,
        ssl_context=ssl_context,
        grant=grant,
        client_secret=settings.client_secret,
        refresh_token=settings.refresh_token,
        refresh_token_file=settings.refresh_token_file,
        scope=settings.scope,
        state_dir=state_dir or config.state_dir,
        account=config.username,
    )


class AccountLogin:
    """Logs IMAP and SMTP connections of one account in (see the module docstring).

    Args:
        config: The validated configuration.
        ssl_context: For the token endpoint.
        token_source: A source to share instead of building one (doctor and tests).

    Attributes:
        token_source: The account's token source, ``None`` without OAuth 2.
    """

    def __init__(
        self,
        config: Config,
        ssl_context: ssl.SSLContext,
        *,
        token_source: TokenSource | None = None,
    ) -> None:
        self._config = config
        self.token_source = token_source or build_token_source(config, ssl_context)

    async def _oauth2(self, login: Callable[[AccessToken], Awaitable[None]]) -> None:
        from prxmail.oauth2._token import authenticate_with  # noqa: PLC0415 (see above)

        assert self.token_source is not None, "OAuth 2 login without a token source"
        await authenticate_with(self.token_source, login)

    async def imap(self, conn: IMAPConnection) -> None:
        """Log ``conn`` in, then send IMAP ID if configured and offered.

        Args:
            conn: A connection in the not-authenticated state.

        Raises:
            AuthenticationError: refused (a token twice), or no token to be had
                (:class:`~prxmail.oauth2.OAuth2Error`).
            TLSError, LocalProtocolError: as for the connection's login methods.
        """
        config = self._config
        if config.auth is AuthMethod.OAUTH2:

            async def login(token: AccessToken) -> None:
                await conn.authenticate_oauth2(
                    config.username, token.reveal(), host=config.imap_host, port=config.imap_port
                )

            await self._oauth2(login)
        else:
            assert config.password is not None
            await conn.authenticate_password(config.username, config.password.reveal())
        if config.imap_id:
            try:
                await conn.send_client_id()
            except CommandRefusedError as exc:
                # ID is a courtesy (required only by a few servers, which then refuse
                # SELECT with a clear text): a server refusing it must not stop us.
                log_event(logging.DEBUG, "IMAP ID refused", error=str(exc))

    async def smtp(self, conn: SMTPConnection) -> None:
        """Authenticate ``conn`` (after EHLO/STARTTLS) with the SMTP credentials.

        Args:
            conn: A connection ready for AUTH.

        Raises:
            AuthenticationError, SMTPTransientError, TLSError: as for the connection.
        """
        config = self._config
        if config.smtp_auth is AuthMethod.OAUTH2:

            async def login(token: AccessToken) -> None:
                await conn.authenticate_oauth2(
                    config.smtp_username,
                    token.reveal(),
                    host=config.smtp_host,
                    port=config.smtp_port,
                )

            await self._oauth2(login)
        else:
            assert config.smtp_password is not None
            await conn.login(config.smtp_username, config.smtp_password.reveal())
