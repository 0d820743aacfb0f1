"""``prxmail auth``: get the first refresh token and write it to oauth2_refresh_token_file.

Theory of operation: the configuration says which account, client and scope; the
provider preset (or ``--device-url`` / ``--authorize-url``) says where the flows'
endpoints are. ``--flow device`` runs the device authorization grant (RFC 8628: a
URL and a code to enter on any device, for SSH sessions and headless hosts);
``--flow loopback`` the authorization code flow with PKCE and a redirect to
127.0.0.1 (RFC 8252/7636: a URL to open in a browser on this machine). Without
``--flow`` the device flow is used where the provider allows it for the mail scopes,
else the loopback flow. Either way the refresh token is written to
``oauth2_refresh_token_file`` atomically with mode 0600, and a running ``prxmail
serve`` picks it up at its next refresh. No token is ever printed.

The command's arguments are declared in :mod:`prxmail.cli` (so ``--help`` loads no
trio); the runner :func:`run_auth` lives here.
"""

from __future__ import annotations

import functools
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO

import trio

from prxmail._tls import shared_ssl_context
from prxmail.cli._serve import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, one_line
from prxmail.config import Config, OAuth2Grant, load_config
from prxmail.errors import ConfigError
from prxmail.oauth2 import (
    OAuth2Error,
    TokenResponse,
    get_preset,
    run_device_flow,
    run_loopback_flow,
)

__all__ = ["run_auth"]


def _fail(err: TextIO, text: str, status: int = EXIT_FAILURE) -> int:
    print(f"prxmail auth: {' '.join(text.split())}", file=err)
    return status


def run_auth(
    path: Path,
    *,
    flow: str | None,
    device_url: str | None,
    authorize_url: str | None,
    out: TextIO,
    err: TextIO,
) -> int:
    """Run ``prxmail auth``.

    Args:
        path: The configuration file.
        flow: ``"device"``, ``"loopback"`` or ``None`` (choose by the preset).
        device_url: Overrides the preset's device authorization endpoint.
        authorize_url: Overrides the preset's authorization endpoint.
        out: Where the instructions (URL, code) go.
        err: Where a failure is reported, in one line.

    Returns:
        0 when the refresh token was written; 2 for a configuration that cannot be
        used for this; 1 when the flow failed.
    """
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _fail(err, one_line(exc), EXIT_CONFIG)
    settings = config.oauth2
    problem = _unusable(config)
    if problem or settings is None:
        return _fail(err, problem, EXIT_CONFIG)
    assert settings.token_url is not None
    assert settings.client_id is not None
    assert settings.refresh_token_file is not None
    preset = get_preset(config.provider).oauth2 if config.provider else None
    device_url = device_url or (preset.device_url if preset else None)
    authorize_url = authorize_url or (preset.authorize_url if preset else None)
    chosen = flow or ("device" if device_url else "loopback")
    if chosen == "device" and not device_url:
        return _fail(
            err, "the device flow needs --device-url (this provider has none)", EXIT_CONFIG
        )
    if chosen == "loopback" and not authorize_url:
        return _fail(
            err, "the loopback flow needs --authorize-url (this provider has none)", EXIT_CONFIG
        )

    def show(line: str) -> None:
        print(line, file=out, flush=True)

    context = shared_ssl_context(config.tls_ca_file)
    run: functools.partial[Coroutine[Any, Any, TokenResponse]]
    if chosen == "device":
        assert device_url is not None
        run = functools.partial(
            run_device_flow,
            device_url=device_url,
            token_url=settings.token_url,
            client_id=settings.client_id,
            ssl_context=context,
            refresh_token_file=settings.refresh_token_file,
            client_secret=settings.client_secret,
            scope=settings.scope,
            output=show,
        )
    else:
        assert authorize_url is not None
        extra = dict(preset.authorize_params) if preset else {}
        extra.setdefault("login_hint", config.username)
        run = functools.partial(
            run_loopback_flow,
            authorize_url=authorize_url,
            token_url=settings.token_url,
            client_id=settings.client_id,
            ssl_context=context,
            refresh_token_file=settings.refresh_token_file,
            client_secret=settings.client_secret,
            scope=settings.scope,
            extra_params=extra,
            output=show,
        )
    try:
        trio.run(run)
    except (OAuth2Error, ConfigError, OSError) as exc:
        return _fail(err, one_line(exc))
    return EXIT_OK


def _unusable(config: Config) -> str:
    """Why ``prxmail auth`` cannot run with this configuration, or ``""``."""
    settings = config.oauth2
    if settings is None:
        return "the configuration does not use OAuth 2: set auth = 'oauth2' first"
    if settings.token_command is not None:
        return "oauth2_token_command supplies the tokens: there is no refresh token to get"
    if settings.grant is OAuth2Grant.CLIENT_CREDENTIALS:
        return "oauth2_grant = 'client_credentials' needs no refresh token"
    if settings.refresh_token_file is None:
        return (
            "set oauth2_refresh_token_file (instead of oauth2_refresh_token or"
            " oauth2_refresh_token_env): prxmail auth writes the refresh token there"
        )
    return ""
