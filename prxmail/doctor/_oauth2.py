"""The OAuth 2 chain: the token endpoint's host, then the grant itself.

Theory of operation: with ``auth`` or ``smtp_auth`` set to ``"oauth2"`` the doctor
first resolves the token endpoint's host (``oauth2.dns``) and then asks the account's
token source for an access token (``oauth2.token``): that one request exercises TCP,
TLS (verified like the mail connections), HTTP and the grant, and the token source's
errors already name which of them failed, decoded (``invalid_grant`` means run
``prxmail auth``; ``invalid_client`` a wrong client id or secret; ``invalid_scope`` a
scope the app may not ask for). The token is cached in the same source the IMAP and
SMTP login steps use afterwards, so they log in with it without a second request. A
provider preset's hints are shown as detail lines with any failure.
"""

from __future__ import annotations

import socket
import urllib.parse

import trio

from prxmail.config import Config
from prxmail.doctor._report import Status, Timeouts, _Chain, _server_text
from prxmail.oauth2 import OAuth2Error, TokenEndpointError, TokenSource, get_preset

__all__ = ["_OAUTH2_LOGIN_HINT", "_oauth2_chain", "_oauth2_names", "_preset_hints"]

_OAUTH2_LOGIN_HINT = (
    "the token endpoint issued a token but the mail server refused it: check that"
    " oauth2_scope includes the mail scopes (Microsoft: IMAP.AccessAsUser.All and"
    " SMTP.Send; Google: https://mail.google.com/), that the token is for this"
    " username, and that IMAP/SMTP access is enabled for the mailbox"
)


def _oauth2_names(config: Config) -> list[str]:
    if config.oauth2 is None:
        return []
    if config.oauth2.token_command is not None:
        return ["oauth2.token"]
    return ["oauth2.dns", "oauth2.token"]


def _preset_hints(config: Config) -> tuple[str, ...]:
    """The provider preset's doctor hints, shown with a failure; none without a preset."""
    if config.provider is None:
        return ()
    return tuple(f"{config.provider}: {hint}" for hint in get_preset(config.provider).hints)


def _token_failure(chain: _Chain, step: str, proto: str, config: Config, exc: OAuth2Error) -> bool:
    """The login step's failure when no access token could be had (the shared source
    failed; the ``oauth2.token`` step says why in detail)."""
    return chain.add(
        step,
        Status.FAIL,
        f"no access token for the {proto} login: {_server_text(str(exc))}",
        detail=_preset_hints(config),
        hint=exc.hint or "see the oauth2.token step",
    )


async def _oauth2_chain(
    config: Config, timeouts: Timeouts, chain: _Chain, source: TokenSource | None
) -> None:
    """Check that an access token can be had (see the module docstring)."""
    settings = config.oauth2
    if settings is None or source is None:
        return
    if settings.token_url is not None:
        host = urllib.parse.urlsplit(settings.token_url).hostname or ""
        try:
            with trio.fail_after(timeouts.dns):
                infos = await trio.socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, trio.TooSlowError) as exc:
            chain.add(
                "oauth2.dns",
                Status.FAIL,
                f"the token endpoint's host {host} cannot be resolved:"
                f" {_server_text(str(exc)) or type(exc).__name__}",
                detail=_preset_hints(config),
                hint="check oauth2_token_url (or the provider preset) and the DNS setup",
            )
            return
        addresses = sorted({str(info[4][0]) for info in infos})
        chain.add("oauth2.dns", Status.PASS, f"{host} -> {', '.join(addresses[:4])}")
    where = (
        f"from {settings.token_url}"
        if settings.token_url is not None
        else "from oauth2_token_command"
    )
    try:
        with trio.fail_after(timeouts.chain):
            await source.token()
    except trio.TooSlowError:
        chain.add(
            "oauth2.token",
            Status.FAIL,
            f"no access token {where} within {timeouts.chain:g} s",
            detail=_preset_hints(config),
            hint="the token endpoint or the token command hangs; try again later",
        )
        return
    except OAuth2Error as exc:
        code = f" ({exc.error})" if isinstance(exc, TokenEndpointError) and exc.error else ""
        chain.add(
            "oauth2.token",
            Status.FAIL,
            f"no access token {where}{code}: {_server_text(str(exc))}",
            detail=_preset_hints(config),
            hint=exc.hint or "see the message above",
        )
        return
    grant = "token command" if settings.token_command else settings.grant.value + " grant"
    chain.add("oauth2.token", Status.PASS, f"got an access token {where} ({grant})")
